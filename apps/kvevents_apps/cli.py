"""The `kvevents` command: `tap` prints any engine's stream as JSON lines, `demo` runs the
whole plane on loopback and shows a gap and a restart repaired."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Literal

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


def _stderr_notice(notice: Notice) -> None:
    print(f"kvevents: {notice}", file=sys.stderr, flush=True)


def tap(args: argparse.Namespace) -> int:
    """Print every event as one JSON line; notices go to stderr."""
    encoder = msgspec.json.Encoder(enc_hook=_json_default)
    write = sys.stdout.buffer.write
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
    with Subscriber(
        args.endpoint,
        args.replay,
        args.topic,
        join=join,
        on_notice=_stderr_notice,
        stale_after=args.silent or None,
    ) as sub:
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
    from .demo import run_demo

    return run_demo(batches=args.batches, dialect=args.dialect, port=args.port, quiet=args.quiet)


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
    return serve(
        host=args.host,
        port=args.port,
        block_size=args.block_size,
        model_name=args.model_name,
        routing_group=args.routing_group,
        workers=workers,
        replay=replay,
    )


def simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import simulate as sim

    options = sim.Options(
        workers=args.workers,
        block_size=args.block_size,
        capacity_blocks=args.capacity,
        dialect=args.dialect,
        seed=args.seed,
        check_every=args.check_every,
        faults=args.faults,
        progress=not args.json,
    )
    if args.trace:
        path = Path(args.trace)
        if not path.is_file():
            print(f"kvevents simulate: no trace file {path}", file=sys.stderr)
            return 2
        requests = list(sim.mooncake(path, args.limit))
        title = f"{path.name}, {len(requests):,} requests, {args.workers} workers"
    else:
        requests = list(sim.synthetic(args.limit or 2000, args.seed))
        title = f"synthetic, {len(requests):,} requests, {args.workers} workers"
    policies = args.policy or list(sim.POLICIES)
    results = sim.run_policies(policies, requests, options)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(sim.table(results))
    if args.png and not sim.chart(results, Path(args.png), title):
        print("kvevents simulate: no PNG: pip install matplotlib", file=sys.stderr)
    mismatched = [r for r in results if r["mismatches"] and not r["stale_workers"]]
    if mismatched:
        print(
            "kvevents simulate: the index differs from the engines with no worker marked stale",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvevents", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_tap = commands.add_parser("tap", help="print every event of a stream as one JSON line")
    p_tap.add_argument("endpoint", help="live PUB endpoint, e.g. tcp://127.0.0.1:5557")
    p_tap.add_argument(
        "--replay", metavar="EP", help="replay ROUTER endpoint, e.g. tcp://127.0.0.1:5558"
    )
    p_tap.add_argument("--topic", default="", help="topic prefix to subscribe to")
    p_tap.add_argument(
        "--from-start", action="store_true", help="replay the publisher's buffer on joining"
    )
    p_tap.add_argument("--count", type=int, default=0, help="exit after this many batches")
    p_tap.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="exit 1 if nothing arrives within this many seconds",
    )
    p_tap.add_argument(
        "--silent",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="warn on stderr when a source says nothing for this long (0: never; default 10)",
    )
    p_tap.set_defaults(func=tap)
    p_demo = commands.add_parser("demo", help="publish and repair a synthetic stream on loopback")
    p_demo.add_argument(
        "--batches", type=int, default=20_000, help="batches to publish (default 20000)"
    )
    p_demo.add_argument("--dialect", choices=("vllm", "sglang", "legacy"), default="vllm")
    p_demo.add_argument(
        "--port", type=int, default=0, help="live port (replay uses port+1); 0 picks free ports"
    )
    p_demo.add_argument("--quiet", action="store_true", help="no progress lines")
    p_demo.set_defaults(func=demo)
    p_index = commands.add_parser(
        "index", help="serve a KV prefix index over HTTP with Dynamo's standalone indexer API"
    )
    p_index.add_argument("--port", type=int, default=8090, help="HTTP port (default 8090)")
    p_index.add_argument(
        "--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p_index.add_argument(
        "--block-size", type=int, default=16, help="block size of --workers (default 16)"
    )
    p_index.add_argument(
        "--workers",
        metavar="LIST",
        help='initial workers as "id[:dp_rank]=tcp://host:port,..." (Dynamo\'s syntax)',
    )
    p_index.add_argument(
        "--replay", metavar="LIST", help="their replay endpoints, in the same form as --workers"
    )
    p_index.add_argument("--model-name", default="default", help="model of --workers")
    p_index.add_argument("--routing-group", default="default", help="routing group of --workers")
    p_index.set_defaults(func=index)
    p_sim = commands.add_parser(
        "simulate", help="mock engines, a KV index over loopback and a router, in simulated time"
    )
    p_sim.add_argument("--trace", help="a Mooncake FAST'25 trace (JSONL); default: synthetic")
    p_sim.add_argument("--limit", type=int, help="use only the first N requests")
    p_sim.add_argument("--workers", type=int, default=8, help="mock engines (default 8)")
    p_sim.add_argument("--block-size", type=int, default=16)
    p_sim.add_argument(
        "--capacity", type=int, default=65_536, help="KV cache blocks per engine (default 65536)"
    )
    p_sim.add_argument("--dialect", choices=("vllm", "sglang", "legacy"), default="vllm")
    p_sim.add_argument(
        "--policy",
        action="append",
        choices=("round_robin", "random", "kv", "oracle"),
        help="run only this policy (repeatable); default: all four",
    )
    p_sim.add_argument("--seed", type=int, default=0)
    p_sim.add_argument(
        "--check-every",
        type=int,
        default=0,
        metavar="N",
        help="also check index == engines every N requests",
    )
    p_sim.add_argument(
        "--faults",
        action="store_true",
        help="inject a subscriber stall (PUB drops, history lost), a subscriber restart, "
        "an engine restart and an AllBlocksCleared",
    )
    p_sim.add_argument("--json", action="store_true", help="print the results as JSON")
    p_sim.add_argument("--png", default="simulate.png", help="chart path ('' for none)")
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
