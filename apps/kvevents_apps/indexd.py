"""`kvevents index`: the prefix index as an HTTP service with the API of Dynamo's standalone
indexer (`python -m dynamo.indexer`), so its clients can point at it unchanged.

Endpoints, bodies and status codes are Dynamo 1.6.1's (../shared/reference/index_router.md):
POST /register, /unregister, /query, /query_by_hash; GET /workers, /dump, /health, /metrics.
Differences, on purpose: every error body is one line of JSON (Dynamo answers a malformed
body in plain text), stale workers are left out of `scores` and listed under `stale`, and
/metrics names are `kvevents_index_*`.

A raw ASGI application on uvicorn, except the hot path: a /query or /query_by_hash of at most
LARGE_QUERY bytes, with nothing pipelined before it, is answered by the HTTP protocol itself
in one write (no ASGI cycle, task or chunked framing). JSON in and out with msgspec, one `LiveIndex` per
(model_name, routing_group), all fed by one `IndexFeed` (one subscriber, one poll, one task)
under supervision: a failure is logged with its traceback, counted in /metrics, marks the
workers it concerns stale in every answer and is retried; /health answers 503 with the
reason while the feed cannot recover, or when its task has ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import socket
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kvevents import CurveClient, EndpointError, SecurityError, SourceLimitError, check_endpoint
from kvevents.fleet import FleetIndex
from kvevents.index import (
    IndexBackend,
    IndexFeed,
    LiveIndex,
    Match,
    WorkerState,
    local_block_hashes,
)

from .apiauth import CHALLENGE, ApiTokens, Refusal, authorization_of

logger = logging.getLogger("kvevents.index")

UNHEALTHY_AFTER = 5.0
"""Seconds of failed polls in a row after which /health answers 503."""
BODY_TIMEOUT = 10.0
"""Seconds a request body may take to arrive (a client dripping bytes holds nothing longer)."""
MAX_CONNECTIONS = 1024
"""Concurrent connections and requests; past it the server answers 503 at once."""
MAX_QUERY_TOKENS = 1 << 20
"""Tokens in one /query (1M: 65,536 blocks of 16; hashing it holds the loop ~0.1 s)."""
MAX_QUERY_HASHES = 1 << 16
LARGE_QUERY = 64 * 1024
"""Body bytes (about 10,000 tokens) up to which a /query is decoded and hashed on the event
loop (under a millisecond); a larger one is decoded and hashed in the large-query process."""
MAX_LARGE_QUERIES = 16
"""Large queries waiting for (or in) the large-query process; past it /query answers 503."""
MAX_NAME = 256
"""Characters in a model name, routing group or topic."""
MAX_ENDPOINT = 1024
MAX_SOURCES = 4096
"""(worker, dp_rank) sources followed at most; past it /register answers 503."""
MAX_BODY = 8 * 1024 * 1024
"""Request bodies over 8 MiB (Dynamo's limit) are refused with 413 before they are parsed."""
U64 = (1 << 64) - 1
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


InstanceId = Annotated[int, Meta(ge=0)]
"""At most 2^64 - 1 too (msgspec bounds stop at int64: checked by `_instance`)."""
Name = Annotated[str, Meta(max_length=MAX_NAME)]
Endpoint = Annotated[str, Meta(max_length=MAX_ENDPOINT)]


class Register(msgspec.Struct, kw_only=True):
    instance_id: InstanceId
    endpoint: Endpoint
    model_name: Name = "default"
    block_size: Annotated[int, Meta(ge=1, le=2**32 - 1)] | None = None
    dp_rank: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 0
    replay_endpoint: Endpoint | None = None
    routing_group: Name = "default"
    topic: Name | None = None
    """None (Dynamo's /register has none): every topic, as Dynamo's indexer reads them."""
    curve_server_key: Annotated[str, Meta(min_length=40, max_length=40)] | None = None
    """kvevents' own: the publisher's CURVE public key (z85), when its sockets use CURVE; this
    service's pair comes from KVEVENTS_CURVE_CLIENT_SECRET."""
    tenant_id: Any = None
    additional_salt: Any = None
    additionalsalt: Any = None


class Unregister(msgspec.Struct, kw_only=True):
    instance_id: InstanceId
    model_name: Name = "default"
    routing_group: Name = "default"
    dp_rank: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None


class Query(msgspec.Struct, kw_only=True):
    token_ids: Annotated[list[int], Meta(max_length=MAX_QUERY_TOKENS)]
    """u32 each: checked when they are packed for hashing (a bound per element here would
    double the decode time of a 1,024-token body)."""
    model_name: Name = "default"
    routing_group: Name = "default"
    lora_name: Name | None = None
    cache_salt: Annotated[str, Meta(max_length=4096)] | None = None


class QueryByHash(msgspec.Struct, kw_only=True):
    block_hashes: Annotated[list[int], Meta(max_length=MAX_QUERY_HASHES)]
    """Dynamo LocalBlockHash values, signed (as Dynamo sends them) or unsigned 64-bit."""
    model_name: Name = "default"
    routing_group: Name = "default"
    cache_salt: Any = msgspec.UNSET


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []

    def __reduce__(self) -> Any:  # raised in the large-query process, re-raised here
        return (HttpError, (self.status, str(self), self.headers))


_decoders = {
    kind: msgspec.json.Decoder(kind) for kind in (Register, Unregister, Query, QueryByHash)
}
_encode = msgspec.json.Encoder().encode
_JSON = [(b"content-type", b"application/json")]


class IndexService:
    """The ASGI application. `workers` and `replay` are `--workers`/`--replay` entries
    registered at start-up under `model_name`/`routing_group` with `block_size`."""

    def __init__(
        self,
        block_size: int = 16,
        model_name: str = "default",
        routing_group: str = "default",
        workers: list[tuple[int, int, str]] = (),  # type: ignore[assignment]
        replay: dict[tuple[int, int], str] | None = None,
        subscriber_options: dict[str, Any] | None = None,
        max_sources: int = MAX_SOURCES,
        max_body: int = MAX_BODY,
        body_timeout: float = BODY_TIMEOUT,
        unhealthy_after: float = UNHEALTHY_AFTER,
        backend_factory: Callable[[int], IndexBackend] | None = None,
        fleet: FleetSource | None = None,
        tokens: ApiTokens | None = None,
    ) -> None:
        self.block_size = block_size
        self.tokens = tokens
        """Bearer tokens required on every route but /health (None: the API is open)."""
        self.refused = 0
        """Requests refused 401/403 for their token."""
        self.fleet = fleet
        """Read the engines from NATS JetStream instead of ZeroMQ: workers come from the
        stream, and /register, /unregister answer 409."""
        self.model_name = model_name
        self.routing_group = routing_group
        self.initial = list(workers)
        self.initial_replay = dict(replay or {})
        self.subscriber_options = dict(subscriber_options or {})
        self.max_body = max_body
        self.max_sources = max_sources
        self.body_timeout = body_timeout
        self.unhealthy_after = unhealthy_after
        self.backend_factory = backend_factory
        """Makes each model's index backend from its block size (in memory by default)."""
        self.indexes: dict[tuple[str, str], LiveIndex | FleetIndex] = {}
        self.feed: IndexFeed | None = None
        self._feeder: asyncio.Task[None] | None = None
        self.requests = 0
        self.errors = 0
        self.large_queries_refused = 0
        self._large_queries = 0
        # One worker process, first come first served: decoding a long prompt and packing
        # its tokens are single C calls that hold the GIL for tens of milliseconds each, so
        # on a thread they would still stall the loop; in a process of their own short
        # queries are answered meanwhile, on the other core.
        self._large_lane: concurrent.futures.Executor | None = None
        self.large_lane_factory: Callable[[], concurrent.futures.Executor] = _large_query_process
        self._routes: dict[tuple[str, str], Callable[[bytes, Scope], Awaitable[tuple[int, Any]]]]
        self._routes = {
            ("POST", "/register"): self.register,
            ("POST", "/unregister"): self.unregister,
            ("POST", "/query"): self.query,
            ("POST", "/query_by_hash"): self.query_by_hash,
            ("GET", "/workers"): self.workers,
            ("GET", "/dump"): self.dump,
            ("GET", "/health"): self.health,
        }

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.fleet is not None:
            await self._start_fleet(self.fleet)
        self.feed = IndexFeed(self.max_sources, **self.subscriber_options)
        self._feeder = asyncio.get_running_loop().create_task(self.feed.run())
        for worker_id, dp_rank, endpoint in self.initial:
            replay = self.initial_replay.get((worker_id, dp_rank))
            live = self._index_for(self.model_name, self.routing_group, self.block_size)
            await live.register(worker_id, endpoint, replay, dp_rank)

    async def stop(self) -> None:
        for live in self.indexes.values():
            await live.close()
        self.indexes.clear()
        lane, self._large_lane = self._large_lane, None
        if lane is not None:
            # Waited for on a thread: the worker process is gone when the service has stopped.
            await asyncio.to_thread(lane.shutdown, wait=True, cancel_futures=True)
        if self.feed is not None:
            await self.feed.close()
        if self._feeder is not None:
            try:
                await asyncio.wait_for(self._feeder, 5)
            except BaseException:
                self._feeder.cancel()

    async def _start_fleet(self, fleet: FleetSource) -> None:
        for model in fleet.models:
            backend = (
                None if self.backend_factory is None else self.backend_factory(self.block_size)
            )
            replica = FleetIndex(
                fleet.servers,
                model,
                block_size=self.block_size,
                backend=backend,
                stream=fleet.stream,
                root=fleet.root,
                nats_options=fleet.nats_options,
            )
            self.indexes[(model, self.routing_group)] = replica
            await replica.start(timeout=fleet.start_timeout)

    def _index_for(self, model: str, group: str, block_size: int) -> LiveIndex:
        key = (model, group)
        live = self.indexes.get(key)
        if self.fleet is not None or isinstance(live, FleetIndex):
            raise HttpError(409, FLEET_ONLY)
        if live is None:
            assert self.feed is not None, "the service has not started"
            backend = None if self.backend_factory is None else self.backend_factory(block_size)
            live = LiveIndex(block_size, backend=backend, feed=self.feed)
            self.indexes[key] = live
        return live

    def trouble(self) -> str | None:
        """Why the service cannot vouch for its answers, or None."""
        feeder, feed = self._feeder, self.feed
        if feeder is None or feed is None:
            return "not started"
        if feeder.done():
            error = None if feeder.cancelled() else feeder.exception()
            return f"the feed has stopped: {error!r}" if error else "the feed has stopped"
        lost = [
            m
            for (m, _), live in self.indexes.items()
            if isinstance(live, FleetIndex) and not live.connected
        ]
        if lost:
            return f"NATS connection lost (replicas of {', '.join(sorted(lost))}); reconnecting"
        since = feed.failing_since
        if since is not None and time.monotonic() - since > self.unhealthy_after:
            return f"the feed has failed for over {self.unhealthy_after:g} s: {feed.last_failure}"
        return None

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        self.requests += 1
        path = scope["path"]
        method = scope["method"]
        if self.tokens is not None:
            try:
                self.tokens.check(path, authorization_of(scope["headers"]))
            except Refusal as exc:
                self.errors += 1
                self.refused += 1
                headers = _JSON + (CHALLENGE if exc.status == 401 else [])
                await _respond(send, exc.status, _encode({"error": str(exc)}), headers)
                return
        if path == "/metrics" and method == "GET":
            body, content_type = self.metrics()
            await _respond(send, 200, body, [(b"content-type", content_type.encode())])
            return
        route = self._routes.get((method, path))
        headers = _JSON
        try:
            if route is None:
                allowed = sorted({m for m, p in self._routes if p == path})
                if path == "/metrics":
                    allowed = ["GET"]
                if allowed:
                    allow = [(b"allow", ", ".join(allowed).encode())]
                    raise HttpError(405, f"{method} not allowed on {path}", allow)
                raise HttpError(404, f"no route {method} {path}")
            body = await self._read(scope, receive)
            status, answer = await route(body, scope)
        except HttpError as exc:
            self.errors += 1
            status, answer = exc.status, {"error": str(exc)}
            headers = _JSON + exc.headers
        if isinstance(answer, _Streamed):
            await _stream(send, status, answer)
            return
        await _respond(send, status, _encode(answer), headers)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body
        for name, value in scope["headers"]:
            if name == b"content-length" and int(value or 0) > limit:
                raise HttpError(413, f"request body over {limit} bytes")
        chunks = []
        size = 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                waited = f"{self.body_timeout:g} s"
                raise HttpError(408, f"request body not received within {waited}") from None
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client went away before its body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- handlers -----------------------------------------------------------------------

    async def register(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        request = _parse(Register, body)
        _instance(request.instance_id)
        for endpoint in filter(None, (request.endpoint, request.replay_endpoint)):
            _check_scheme(endpoint)
        key = (request.model_name, request.routing_group)
        existing = self.indexes.get(key)
        block_size = request.block_size or (existing.block_size if existing else None)
        if block_size is None:
            raise HttpError(400, "block_size is required for the first worker of a model")
        if existing is not None and existing.block_size != block_size:
            raise HttpError(
                400,
                f"block_size {block_size} differs from {existing.block_size} "
                f"of model={request.model_name} routing_group={request.routing_group}",
            )
        curve = None
        if request.curve_server_key is not None:
            try:
                curve = CurveClient.own_keys_from_env(request.curve_server_key)
            except SecurityError as exc:
                raise HttpError(400, str(exc)) from None
        live = self._index_for(*key, block_size)
        try:
            await live.register(
                request.instance_id,
                request.endpoint,
                request.replay_endpoint,
                request.dp_rank,
                request.topic,
                curve,
            )
        except KeyError as exc:
            raise HttpError(409, exc.args[0]) from None
        except SourceLimitError as exc:
            raise HttpError(503, f"cannot follow another source: {exc}") from None
        except (ValueError, OSError) as exc:
            raise HttpError(400, f"invalid ZMQ endpoint: {exc}") from None
        return 201, {"status": "ok"}

    async def unregister(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        request = _parse(Unregister, body)
        _instance(request.instance_id)
        live = self.indexes.get((request.model_name, request.routing_group))
        if self.fleet is not None or isinstance(live, FleetIndex):
            raise HttpError(409, FLEET_ONLY)
        removed = 0 if live is None else await live.unregister(request.instance_id, request.dp_rank)
        if not removed:
            rank = "" if request.dp_rank is None else f" dp_rank {request.dp_rank}"
            raise HttpError(404, f"instance {request.instance_id}{rank} is not registered")
        return 200, {"status": "ok"}

    def answer_small_query(self, body: bytes) -> tuple[int, Any]:
        """A /query of at most LARGE_QUERY bytes, answered at once on the loop."""
        request = _parse(Query, body)
        live = self._live(request.model_name, request.routing_group)
        return 200, _scores(live.match(_hashes(request, live.block_size)), live.block_size)

    async def query(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        if len(body) <= LARGE_QUERY:
            return self.answer_small_query(body)
        # Decoding and hashing a long prompt are pure functions of the request: off the
        # loop (matching stays on the loop, the only writer of the index).
        model, group, hashes = await self._off_loop(body)
        live = self._live(model, group)
        return 200, _scores(live.match(hashes), live.block_size)

    async def _off_loop(self, body: bytes) -> tuple[str, str, list[int]]:
        if self._large_queries >= MAX_LARGE_QUERIES:
            self.large_queries_refused += 1
            raise HttpError(503, f"over {MAX_LARGE_QUERIES} large queries waiting: retry")
        if self._large_lane is None:
            self._large_lane = self.large_lane_factory()
        lane = self._large_lane
        self._large_queries += 1
        try:
            block_sizes = {key: live.block_size for key, live in self.indexes.items()}
            model, group, packed = await asyncio.get_running_loop().run_in_executor(
                lane, _parse_and_hash, body, block_sizes
            )
        except concurrent.futures.BrokenExecutor:
            logger.exception("kvevents: the large-query worker died; it is started again")
            if self._large_lane is lane:
                self._large_lane = None
            raise HttpError(503, "the large-query worker died: retry") from None
        finally:
            self._large_queries -= 1
        return model, group, array("Q", packed).tolist()

    async def query_by_hash(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        return self.answer_query_by_hash(body)

    def answer_query_by_hash(self, body: bytes) -> tuple[int, Any]:
        request = _parse(QueryByHash, body)
        if request.cache_salt is not msgspec.UNSET:
            raise HttpError(400, "cache_salt is not supported by query_by_hash: salt the hashes")
        if any(not -(2**63) <= h <= U64 for h in request.block_hashes):
            raise HttpError(422, "block_hashes must be 64-bit integers")
        live = self._live(request.model_name, request.routing_group)
        answer = live.match([h & U64 for h in request.block_hashes])
        return 200, _scores(answer, live.block_size)

    async def workers(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        wanted = _query_string(scope)
        out: dict[int, dict[str, Any]] = {}
        for (model, group), live in self.indexes.items():
            if wanted.get("model_name", model) != model:
                continue
            if wanted.get("routing_group", group) != group:
                continue
            for (worker_id, dp_rank), (endpoint, replay) in live.endpoints.items():
                entry = out.setdefault(
                    worker_id,
                    {
                        "instance_id": worker_id,
                        "source": "zmq",
                        "status": "active",
                        "model_name": model,
                        "routing_group": group,
                        "block_size": live.block_size,
                        "endpoints": {},
                        "listeners": {},
                    },
                )
                state = live.state((worker_id, dp_rank))
                status, silent_for = _liveness(state)
                entry["endpoints"][str(dp_rank)] = endpoint
                entry["listeners"][str(dp_rank)] = {
                    "endpoint": endpoint,
                    "replay_endpoint": replay,
                    "status": status,
                    "last_message_seconds_ago": silent_for,
                }
                if status != "active":
                    entry["status"] = status
        return 200, list(out.values())

    async def dump(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        """Every entry as Dynamo's stored events, streamed a worker at a time so a large
        dump never holds the event loop (other clients are answered between the parts)."""
        return 200, _Streamed(self._dump_parts())

    def _dump_parts(self) -> Iterator[bytes]:
        yield b"{"
        for number, ((model, group), live) in enumerate(list(self.indexes.items())):
            head = _encode(f"{model}:{group}") + b':{"block_size":'
            yield (b"," if number else b"") + head + _encode(live.block_size) + b',"events":['
            event_id = 0
            for worker_id, dp_rank in live.workers:
                events = []
                for parent, blocks in live.chains((worker_id, dp_rank)):
                    event_id += 1
                    stored = {
                        "parent_hash": None if parent is None else _u64(parent),
                        "blocks": [
                            {"block_hash": _u64(h), "tokens_hash": key} for h, key in blocks
                        ],
                    }
                    events.append(
                        {
                            "worker_id": worker_id,
                            "event": {
                                "event_id": event_id,
                                "data": {"stored": stored},
                                "dp_rank": dp_rank,
                            },
                        }
                    )
                if events:
                    part = _encode(events)[1:-1]
                    yield (b"," if event_id > len(events) else b"") + part
            yield b"]}"
        yield b"}"

    async def health(self, body: bytes, scope: Scope) -> tuple[int, Any]:
        trouble = self.trouble()
        if trouble is not None:
            return 503, {"status": "unhealthy", "reason": trouble}
        if self.fleet is None:
            return 200, {"status": "ok"}
        # A replica answers ready once it has read what the server held (a load balancer
        # keeps traffic away while it catches up).
        progress = {
            model: live.progress()
            for (model, _), live in self.indexes.items()
            if isinstance(live, FleetIndex)
        }
        if not all(p["caught_up"] for p in progress.values()):
            return 503, {"status": "catching_up", "fleet": progress}
        return 200, {"status": "ok", "fleet": progress}

    def _live(self, model: str, group: str) -> LiveIndex | FleetIndex:
        live = self.indexes.get((model, group))
        if live is None:
            raise HttpError(404, f"no indexer for model={model} routing_group={group}")
        return live

    # -- metrics ------------------------------------------------------------------------

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

        service = self

        class Collector:
            def collect(self) -> Any:
                labels = ["model_name", "routing_group"]
                counters = CounterMetricFamily(
                    "kvevents_index_events",
                    "Index anomalies and work, by kind",
                    labels=[*labels, "kind"],
                )
                entries = GaugeMetricFamily(
                    "kvevents_index_entries", "(worker, block) entries held", labels=labels
                )
                stale = GaugeMetricFamily(
                    "kvevents_index_stale_workers", "Workers marked stale", labels=labels
                )
                workers = GaugeMetricFamily(
                    "kvevents_index_workers", "Registered (worker, dp_rank) pairs", labels=labels
                )
                silence = GaugeMetricFamily(
                    "kvevents_index_worker_silence_seconds",
                    "Seconds since a worker's last message (-1: never heard from)",
                    labels=[*labels, "worker_id", "dp_rank"],
                )
                limits = GaugeMetricFamily(
                    "kvevents_index_limit", "Configured limits of the service", labels=["name"]
                )
                limits.add_metric(["max_sources"], service.max_sources)
                limits.add_metric(["max_body_bytes"], service.max_body)
                limits.add_metric(["max_connections"], MAX_CONNECTIONS)
                limits.add_metric(["max_query_tokens"], MAX_QUERY_TOKENS)
                limits.add_metric(["max_large_queries"], MAX_LARGE_QUERIES)
                for (model, group), live in service.indexes.items():
                    for kind, value in live.all_counters().items():
                        counters.add_metric([model, group, kind], value)
                    entries.add_metric([model, group], live.entries())
                    stale.add_metric([model, group], len(live.stale))
                    workers.add_metric([model, group], len(live.workers))
                    for worker in live.workers:
                        _, silent_for = _liveness(live.state(worker))
                        silence_value = -1.0 if silent_for is None else silent_for
                        silence.add_metric(
                            [model, group, str(worker[0]), str(worker[1])], silence_value
                        )
                requests = CounterMetricFamily(
                    "kvevents_index_http_requests",
                    "HTTP requests, and those answered with an error",
                    labels=["outcome"],
                )
                requests.add_metric(["all"], service.requests)
                requests.add_metric(["error"], service.errors)
                requests.add_metric(["large_query_refused"], service.large_queries_refused)
                feed = service.feed
                failures = CounterMetricFamily(
                    "kvevents_index_feed_failures", "Polls of the subscriber that raised"
                )
                failures.add_metric([], feed.poll_failures if feed else 0)
                healthy = GaugeMetricFamily(
                    "kvevents_index_healthy", "1 when /health answers 200, else 0"
                )
                healthy.add_metric([], 0 if service.trouble() else 1)
                yield from (counters, entries, stale, workers, silence, limits, requests)
                yield from (failures, healthy)
                yield from _fleet_metrics(service.indexes)

        registry = CollectorRegistry()
        registry.register(Collector())  # type: ignore[arg-type]
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _fleet_metrics(indexes: dict[tuple[str, str], LiveIndex | FleetIndex]) -> Iterator[Any]:
    """Each NATS replica's place in the stream: what it read, what it has yet to, whether it
    caught up and how long that took."""
    from prometheus_client.core import GaugeMetricFamily

    replicas = [
        (model, live) for (model, _), live in indexes.items() if isinstance(live, FleetIndex)
    ]
    if not replicas:
        return
    families = {
        "position": GaugeMetricFamily(
            "kvevents_index_fleet_position", "Newest stream sequence read", labels=["model_name"]
        ),
        "lag": GaugeMetricFamily(
            "kvevents_index_fleet_lag",
            "Messages the server holds that this replica has not read (-1: none read yet)",
            labels=["model_name"],
        ),
        "caught_up": GaugeMetricFamily(
            "kvevents_index_fleet_caught_up",
            "1 once the replica has read what the server held",
            labels=["model_name"],
        ),
        "caught_up_after": GaugeMetricFamily(
            "kvevents_index_fleet_catch_up_seconds",
            "Seconds from start to first caught up (-1: not yet)",
            labels=["model_name"],
        ),
        "connected": GaugeMetricFamily(
            "kvevents_index_fleet_connected", "1 while connected to NATS", labels=["model_name"]
        ),
    }
    for model, replica in replicas:
        progress = replica.progress()
        for name, family in families.items():
            value = progress[name]
            family.add_metric([model], -1.0 if value is None else float(value))
    yield from families.values()


def _liveness(state: WorkerState | None) -> tuple[str, float | None]:
    """A listener's status and seconds since its last message (a worker unregistered while
    the answer was made reads as connecting)."""
    if state is None:
        return "connecting", None
    return state.status, state.silent_for


def _scores(answer: dict[Any, Match], block_size: int) -> dict[str, Any]:
    scores: dict[str, dict[str, int]] = {}
    instances: dict[str, dict[str, Any]] = {}
    stale: dict[str, dict[str, int]] = {}
    for (worker_id, dp_rank), match in answer.items():
        tokens = match.blocks * block_size
        worker, rank = str(worker_id), str(dp_rank)
        if match.stale:
            stale.setdefault(worker, {})[rank] = tokens
            continue
        entry = instances.get(worker)
        gpu, cpu, disk = match.gpu * block_size, match.cpu * block_size, match.disk * block_size
        if entry is None:
            scores[worker] = {rank: tokens}
            instances[worker] = {
                "longest_matched": tokens,
                "gpu": gpu,
                "cpu": cpu,
                "disk": disk,
                "dp": {rank: tokens},
            }
        else:
            scores[worker][rank] = tokens
            entry["longest_matched"] = max(entry["longest_matched"], tokens)
            entry["gpu"] = max(entry["gpu"], gpu)
            entry["cpu"] = max(entry["cpu"], cpu)
            entry["disk"] = max(entry["disk"], disk)
            entry["dp"][rank] = tokens
    out: dict[str, Any] = {"scores": scores, "frequencies": [], "instances": instances}
    if stale:
        out["stale"] = stale
    return out


def _parse(kind: type[Any], body: bytes) -> Any:
    try:
        return _decoders[kind].decode(body)
    except msgspec.ValidationError as exc:
        raise HttpError(422, f"invalid {kind.__name__.lower()} request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"malformed JSON body: {exc}") from None


def _large_query_process() -> concurrent.futures.Executor:
    # spawn, not fork: the service's process has ZeroMQ's and the event loop's threads.
    context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=context)


def _parse_and_hash(body: bytes, block_sizes: dict[tuple[str, str], int]) -> tuple[str, str, bytes]:
    """A large /query's work off the loop: its model, routing group and block hashes (packed,
    so that carrying them back costs one copy). An unknown model is hashed at nothing: the
    loop answers it 404 as it does a short query's."""
    request = _parse(Query, body)
    key = (request.model_name, request.routing_group)
    block_size = block_sizes.get(key)
    hashes = [] if block_size is None else _hashes(request, block_size)
    return key[0], key[1], array("Q", hashes).tobytes()


def _hashes(request: Query, block_size: int) -> list[int]:
    try:
        return local_block_hashes(
            request.token_ids, block_size, request.lora_name, request.cache_salt
        )
    except OverflowError:
        raise HttpError(422, "token_ids must be unsigned 32-bit integers") from None


def _instance(instance_id: int) -> None:
    if instance_id > U64:
        raise HttpError(422, f"instance_id {instance_id} is over 2^64 - 1")


def _check_scheme(endpoint: str) -> None:
    """Dynamo's wording for an endpoint without a scheme; the subscriber checks the rest."""
    if "://" not in endpoint:
        raise HttpError(400, f"invalid ZMQ endpoint {endpoint!r}: missing scheme")


def _u64(value: Any) -> int:
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & U64
    return int(value) & U64


def _query_string(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


class _Streamed:
    """A JSON answer sent in parts (HTTP chunked), the loop free between them."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts


async def _stream(send: Send, status: int, answer: _Streamed) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    for part in answer.parts:
        await send({"type": "http.response.body", "body": part, "more_body": True})
        await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b""})


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    # A declared length: without it uvicorn frames the body in chunks.
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_workers(text: str) -> list[tuple[int, int, str]]:
    """Dynamo's `--workers` syntax: "id[:dp]=endpoint,id2=endpoint2" (ValueError when not)."""
    out = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, sep, endpoint = entry.partition("=")
        if not sep or not endpoint:
            raise ValueError(f"worker entry {entry!r} is not id[:dp_rank]=endpoint")
        worker, _, rank = key.partition(":")
        try:
            out.append((int(worker), int(rank or 0), endpoint))
        except ValueError:
            raise ValueError(f"worker entry {entry!r}: id and dp_rank must be integers") from None
        try:
            check_endpoint(endpoint)
        except EndpointError as exc:
            raise ValueError(f"worker entry {entry!r}: {exc}") from None
    return out


FLEET_ONLY = "this index follows NATS JetStream: its workers come from the stream"


@dataclass(frozen=True)
class FleetSource:
    """`kvevents index --source nats://...`: one replica per model, read from JetStream."""

    servers: str | list[str]
    models: tuple[str, ...] = ("default",)
    stream: str = "KVEVENTS"
    root: str = "kve.v1"
    nats_options: dict[str, Any] = field(default_factory=dict)
    start_timeout: float = 30.0


def serve(
    host: str,
    port: int,
    block_size: int,
    model_name: str,
    routing_group: str,
    workers: list[tuple[int, int, str]],
    replay: dict[tuple[int, int], str],
    fleet: FleetSource | None = None,
    tokens: ApiTokens | None = None,
    tls: tuple[str, str] | None = None,
) -> int:
    """Run the service until interrupted (uvicorn, httptools, uvloop when installed).
    `tokens`: bearer tokens the API requires (apiauth); `tls`: (certificate, key) files."""
    try:
        import uvicorn
    except ImportError:
        print("kvevents index needs its extra: pip install 'kvevents[index]'", file=sys.stderr)
        return 2
    # Bound here, before anything claims to serve: a busy port is one line, not a traceback
    # from inside the server.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError as exc:
        print(f"kvevents index: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    app = IndexService(
        block_size, model_name, routing_group, workers, replay, fleet=fleet, tokens=tokens
    )
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]}
    config = server_config(app, log_level="warning", **options)
    server = uvicorn.Server(config)
    bound = listener.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    origin = (
        f"{len(workers)} workers"
        if fleet is None
        else f"replica of {', '.join(fleet.models)} from NATS stream {fleet.stream}"
    )
    scheme = "http" if tls is None else "https"
    if tokens is None and host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning(
            "kvevents index: the API on %s is open to anyone who reaches it (set %s)",
            host,
            "KVEVENTS_INDEX_TOKENS",
        )
    print(
        f"kvevents index: serving on {scheme}://{shown}:{bound} ({origin})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
    return 0 if server.started else 1  # not started: the lifespan startup failed and said why


HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send a request's headers (a client dripping them)."""


def server_config(
    app: IndexService,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **options: Any,
) -> Any:
    """uvicorn's settings for the service: a short keep-alive, and a protocol that caps
    connections, times out slow headers and answers malformed requests in JSON."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=_guarded_protocol(header_timeout, max_connections, app),
        lifespan="on",
        access_log=False,
        # The protocol caps connections (HTTP/1.1 runs one request per connection at a
        # time, so that caps requests too); uvicorn's own cap answers in plain text.
        limit_concurrency=None,
        timeout_keep_alive=5,
        **options,
    )


def _guarded_protocol(
    header_timeout: float, max_connections: int, service: IndexService | None = None
) -> type:
    """uvicorn's HTTP/1.1 protocol (its C parser when httptools is installed), with four
    changes: a connection past `max_connections` open is answered 503 and closed at once; a
    request whose headers are not complete within `header_timeout` seconds of the connection
    (or of the previous response) is answered 408 and closed; a request the parser rejects is
    answered 400, all three in the service's JSON, not uvicorn's plain text; and with httptools,
    a short /query or /query_by_hash is answered by the protocol itself (the fast lane)."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

        service = None  # the fast lane reads httptools' parser
    fast_routes: dict[bytes, Callable[[bytes], tuple[int, Any]]] = (
        {}
        if service is None
        else {
            b"/query": service.answer_small_query,
            b"/query_by_hash": service.answer_query_by_hash,
        }
    )

    class GuardedProtocol(Base):  # type: ignore[misc, valid-type]
        _requests_begun = 0
        _fast_route: Callable[[bytes], tuple[int, Any]] | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._json_error(503, f"over the limit of {max_connections} open connections")
                return
            self._watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            self._began = True
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # A request pipelined behind one just answered: the keep-alive timer armed by
            # that answer must not close the connection under this one.
            self._unset_keepalive_if_required()

        def on_headers_complete(self) -> None:
            self._requests_begun += 1
            if self.url in fast_routes and self._fast_lane_fits():
                self._fast_route = fast_routes[self.url]
                self._fast_body: list[bytes] = []
                self._fast_keep_alive = (
                    self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                )
                self._watch_body()
                return
            super().on_headers_complete()

        def _fast_lane_fits(self) -> bool:
            """A POST with a short declared body, nothing in flight before it, nothing to
            negotiate: everything else takes uvicorn's ASGI path."""
            if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
                return False
            if self.expect_100_continue or self.parser.should_upgrade():
                return False
            if self.parser.get_method() != b"POST":
                return False
            if service is not None and service.tokens is not None:
                # Refusals (and their counting) are the ASGI path's.
                if service.tokens.role(authorization_of(self.headers)) is None:
                    return False
            for name, value in self.headers:
                if name == b"content-length":
                    return value.isdigit() and int(value) <= LARGE_QUERY
                if name == b"transfer-encoding":
                    return False
            return False

        def on_body(self, body: bytes) -> None:
            if self._fast_route is None:
                super().on_body(body)
            else:
                self._fast_body.append(body)

        def on_message_complete(self) -> None:
            route = self._fast_route
            if route is None:
                super().on_message_complete()
                return
            assert service is not None
            self._fast_route = None
            self._body_timer.cancel()
            service.requests += 1
            try:
                status, answer = route(b"".join(self._fast_body))
            except HttpError as exc:
                service.errors += 1
                status, answer = exc.status, {"error": str(exc)}
            except Exception:
                logger.exception("kvevents: a query failed")
                service.errors += 1
                status, answer = 500, {"error": "internal error (logged by the service)"}
            self._write_json(status, answer, close=not self._fast_keep_alive)
            if not self.transport.is_closing():
                self.on_response_complete()

        def _watch_headers(self) -> None:
            self._began = False
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            waiting_for = self._requests_begun
            self._header_timer = self.loop.call_later(
                header_timeout, lambda: self._headers_late(waiting_for)
            )

        def _headers_late(self, waiting_for: int) -> None:
            if self._requests_begun != waiting_for or self.transport.is_closing():
                return  # a request began in time
            if not self._began:
                self.transport.close()  # idle, not one byte of a request: close as keep-alive does
                return
            waited = f"{header_timeout:g} s"
            self._json_error(408, f"request headers not received within {waited}")

        def _watch_body(self) -> None:
            assert service is not None
            waiting_for = self._requests_begun
            self._body_timer = self.loop.call_later(
                service.body_timeout, lambda: self._body_late(waiting_for)
            )

        def _body_late(self, waiting_for: int) -> None:
            if self._fast_route is None or self._requests_begun != waiting_for:
                return
            assert service is not None
            service.errors += 1
            waited = f"{service.body_timeout:g} s"
            self._json_error(408, f"request body not received within {waited}")

        def send_400_response(self, msg: str) -> None:
            self._json_error(400, f"invalid HTTP request: {msg}")

        def connection_lost(self, exc: Exception | None) -> None:
            for name in ("_header_timer", "_body_timer"):
                timer = getattr(self, name, None)
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _json_error(self, status: int, message: str) -> None:
            self._write_json(status, {"error": message}, close=True)

        def _write_json(self, status: int, answer: Any, close: bool) -> None:
            """One write per response: head and body together."""
            body = _encode(answer)
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (
                status,
                _REASONS.get(status, b"Error"),
            )
            if close:
                head += b"connection: close\r\n"
            self.transport.write(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
            if close:
                self.transport.close()

    return GuardedProtocol


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
