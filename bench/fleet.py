"""The fleet against the direct ZeroMQ path, in one run, on a nats-server from its wheel.

- Throughput: a kvevents publisher (vLLM dialect) sends N batches of 16 new blocks (each
  batch also removes the previous one's, so the index stays small) as fast as it can; the
  direct path ends in a `LiveIndex`, the fleet path goes publisher -> bridge -> JetStream ->
  `FleetIndex`. Rates are N over the time from the first publish to the last batch applied
  (and, for the bridge, to the last publish acknowledged by JetStream).
- Lag: the same, paced (LAG_RATE batches/s), each batch stamped with its publish time; the
  lag is the index's apply time minus that stamp, per batch (p50 / p99).
- Bootstrap: 8 engines holding BOOTSTRAP_BLOCKS blocks in all. The direct path is a
  `LiveIndex` joining engines whose replay buffers no longer hold the history (it heals by
  their snapshots); the fleet path is a new replica reading the bridge's snapshots and the
  stream. Time from start to every worker whole.

Bridge, replica and `LiveIndex` share one event loop and the machine's two cores with the
publishers' threads and the server: these are figures of one node, not of a deployment.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from typing import Any

from .stats import Figure

BLOCKS_PER_BATCH = 16
BLOCK_SIZE = 16
LAG_RATE = 500
LAG_BATCHES = 1_500
BOOTSTRAP_WORKERS = 8


class TimedBackend:
    """An index backend that stamps each applied batch: how many, and each one's lag from
    its `ts` (the publish time this bench writes into it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.applied = 0
        self.lags: list[float] = []
        self.last_applied = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, worker: Any, batch: Any) -> None:
        self.inner.apply(worker, batch)
        now = time.time()
        self.applied += 1
        self.last_applied = time.perf_counter()
        if batch.ts:
            self.lags.append(now - batch.ts)


def _batches(count: int, seed: int, stamp: bool) -> list[Any]:
    from kvevents import vllm

    rng = random.Random(seed)
    out = []
    previous: list[bytes | int] = []
    for _ in range(count):
        hashes: list[bytes | int] = [rng.getrandbits(63) for _ in range(BLOCKS_PER_BATCH)]
        tokens = [rng.randrange(150_000) for _ in range(BLOCKS_PER_BATCH * BLOCK_SIZE)]
        events: list[Any] = [
            vllm.BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=tokens,
                block_size=BLOCK_SIZE,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        ]
        if previous:
            events.append(vllm.BlockRemoved(block_hashes=previous, medium="GPU"))
        previous = hashes
        out.append(vllm.KVEventBatch(ts=0.0 if not stamp else 1.0, events=events))
    return out


def _publisher(buffer_steps: int, snapshots: bool = False) -> Any:
    from kvevents import stable_port, vllm

    return vllm.ZmqEventPublisher(
        0,
        f"tcp://127.0.0.1:{stable_port()}",
        f"tcp://127.0.0.1:{stable_port()}",
        buffer_steps=buffer_steps,
        max_queue_size=1_000_000,
        bind=True,
        queue_full_policy="block",
        block_timeout=5.0,
        snapshots=snapshots,
    )


def _send(publisher: Any, batches: list[Any], rate: float | None) -> None:
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if rate is not None:
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        if batch.ts:
            batch.ts = time.time()
        publisher.publish(batch)


async def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"bench fleet: waited {timeout:g} s for {what}")
        await asyncio.sleep(0.002)


async def _warm(publisher: Any, backend: TimedBackend) -> None:
    """One batch through, so the path is connected before the clock starts."""
    for batch in _batches(1, 99, stamp=False):
        publisher.publish(batch)
    await _wait(lambda: backend.applied >= 1, 30, "the first batch")
    backend.applied, backend.lags = 0, []


async def _direct(batches: list[Any], rate: float | None) -> dict[str, Any]:
    from kvevents.index import LiveIndex, PrefixIndex

    publisher = _publisher(len(batches) + 16)
    backend = TimedBackend(PrefixIndex(BLOCK_SIZE))
    live = LiveIndex(BLOCK_SIZE, backend=backend)  # type: ignore[arg-type]
    feeding = asyncio.create_task(live.run())
    try:
        await live.register(1, publisher.connect_endpoint, publisher.connect_replay_endpoint)
        await _warm(publisher, backend)
        started = time.perf_counter()
        sender = threading.Thread(target=_send, args=(publisher, batches, rate))
        sender.start()
        await _wait(lambda: backend.applied >= len(batches), 300, "the direct path")
        sender.join()
        return {"seconds": backend.last_applied - started, "lags": backend.lags}
    finally:
        await live.close()
        feeding.cancel()
        publisher.shutdown()


async def _fleet(url: str, batches: list[Any], rate: float | None, stream: str) -> dict[str, Any]:
    from kvevents.fleet import Bridge, EngineSpec, FleetIndex
    from kvevents.index import PrefixIndex

    publisher = _publisher(len(batches) + 16)
    root = f"kvb.{stream}"
    bridge = Bridge(
        url,
        [EngineSpec(publisher.connect_endpoint, publisher.connect_replay_endpoint, 1, model="b")],
        stream=stream,
        root=root,
        snapshot_interval=3600.0,
    )
    backend = TimedBackend(PrefixIndex(BLOCK_SIZE))
    replica = FleetIndex(url, "b", block_size=BLOCK_SIZE, backend=backend, stream=stream, root=root)  # type: ignore[arg-type]
    await bridge.start()
    following = asyncio.create_task(bridge.run())
    try:
        await replica.start()
        await _warm(publisher, backend)
        started = time.perf_counter()
        sender = threading.Thread(target=_send, args=(publisher, batches, rate))
        sender.start()
        await _wait(
            lambda: bridge.position((1, 0))[1] >= len(batches), 300, "the bridge to take all"
        )
        await _wait(bridge.drained, 300, "the bridge to publish all")
        published = time.perf_counter() - started
        await _wait(lambda: backend.applied >= len(batches), 300, "the replica")
        sender.join()
        return {
            "seconds": backend.last_applied - started,
            "bridge_seconds": published,
            "lags": backend.lags,
        }
    finally:
        await replica.close()
        await bridge.close()
        following.cancel()
        publisher.shutdown()


async def _bootstrap(url: str, blocks: int, stream: str) -> dict[str, float]:
    from kvevents.fleet import Bridge, EngineSpec, FleetIndex
    from kvevents.index import LiveIndex

    per_worker = blocks // BOOTSTRAP_WORKERS // BLOCKS_PER_BATCH
    publishers = [_publisher(64, snapshots=True) for _ in range(BOOTSTRAP_WORKERS)]
    root = f"kvb.{stream}"
    specs = [
        EngineSpec(p.connect_endpoint, p.connect_replay_endpoint, i + 1, model="b")
        for i, p in enumerate(publishers)
    ]
    bridge = Bridge(url, specs, stream=stream, root=root, snapshot_interval=3600.0)
    await bridge.start()
    following = asyncio.create_task(bridge.run())
    try:
        for i, publisher in enumerate(publishers):
            # Stores only: every block stays, as a long-running engine's cache does.
            for batch in _batches(per_worker, 1000 + i, stamp=False):
                batch.events = batch.events[:1]
                publisher.publish(batch)
        for i in range(len(publishers)):
            await _wait(
                lambda k=(i + 1, 0): bridge.position(k)[1] >= per_worker - 1,
                600,
                "the bridge to take every batch",
            )
        # The bridge's SUB socket can lose part of the flood (sent before it joined, or past
        # its high-water mark) and heals that with the engine's snapshot; the bootstrap
        # measured is from whole snapshots, so the bridge must have healed first (it raced
        # snapshot_all and lost, now and then, before this wait).
        await _wait(
            lambda: all(bridge.whole((i + 1, 0)) for i in range(len(publishers))),
            600,
            "the bridge to heal lost batches with the engines' snapshots",
        )
        await _wait(bridge.drained, 600, "the bridge to publish every batch")
        bridge.snapshot_all()
        await _wait(bridge.drained, 600, "the bridge's snapshots")
        total = per_worker * BLOCKS_PER_BATCH * BOOTSTRAP_WORKERS

        started = time.perf_counter()
        replica = FleetIndex(url, "b", block_size=BLOCK_SIZE, stream=stream, root=root)
        await replica.start()
        await replica.sync(600)
        fleet_seconds = time.perf_counter() - started
        fleet_entries = replica.entries()
        fleet_stale = len(replica.stale)
        await replica.close()

        started = time.perf_counter()
        live = LiveIndex(BLOCK_SIZE)
        feeding = asyncio.create_task(live.run())
        for i, publisher in enumerate(publishers):
            await live.register(
                i + 1, publisher.connect_endpoint, publisher.connect_replay_endpoint
            )
        await _wait(
            lambda: live.entries() >= total and not live.stale, 600, "the direct index's snapshots"
        )
        direct_seconds = time.perf_counter() - started
        await live.close()
        feeding.cancel()
        if fleet_entries != total or fleet_stale:
            raise AssertionError(f"replica holds {fleet_entries} of {total}, {fleet_stale} stale")
        return {"blocks": total, "fleet_seconds": fleet_seconds, "direct_seconds": direct_seconds}
    finally:
        await bridge.close()
        following.cancel()
        for publisher in publishers:
            publisher.shutdown()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(reps: int, batches: int, bootstrap_blocks: int) -> dict[str, Any]:
    from kvevents_apps.natsserver import NatsServer

    out: dict[str, Any] = {
        "direct_batches_per_s": Figure("batches/s"),
        "fleet_batches_per_s": Figure("batches/s"),
        "bridge_batches_per_s": Figure("batches/s"),
        "direct_lag_p50_ms": Figure("ms"),
        "direct_lag_p99_ms": Figure("ms"),
        "fleet_lag_p50_ms": Figure("ms"),
        "fleet_lag_p99_ms": Figure("ms"),
        "bootstrap_fleet_s": Figure("s"),
        "bootstrap_direct_s": Figure("s"),
        "batches": batches,
        "blocks_per_batch": BLOCKS_PER_BATCH,
        "lag_rate": LAG_RATE,
    }
    with tempfile.TemporaryDirectory(prefix="kvevents-bench-nats-") as store:
        server = NatsServer(store)
        server.start()
        out["server"] = server.binary
        try:
            for rep in range(reps):
                flood = _batches(batches, rep, stamp=False)
                direct = asyncio.run(_direct(flood, None))
                fleet = asyncio.run(
                    _fleet(server.url, _batches(batches, rep, stamp=False), None, f"T{rep}")
                )
                out["direct_batches_per_s"].add(batches / direct["seconds"])
                out["fleet_batches_per_s"].add(batches / fleet["seconds"])
                out["bridge_batches_per_s"].add(batches / fleet["bridge_seconds"])
                paced = asyncio.run(_direct(_batches(LAG_BATCHES, rep, stamp=True), LAG_RATE))
                fleet_paced = asyncio.run(
                    _fleet(server.url, _batches(LAG_BATCHES, rep, stamp=True), LAG_RATE, f"L{rep}")
                )
                for name, result in (("direct", paced), ("fleet", fleet_paced)):
                    for q, label in ((0.5, "p50"), (0.99, "p99")):
                        value = _percentile(result["lags"], q)
                        out[f"{name}_lag_{label}_ms"].add(None if value is None else value * 1e3)
            boot = asyncio.run(_bootstrap(server.url, bootstrap_blocks, "BOOT"))
            out["bootstrap_blocks"] = boot["blocks"]
            out["bootstrap_fleet_s"].add(boot["fleet_seconds"])
            out["bootstrap_direct_s"].add(boot["direct_seconds"])
        finally:
            server.stop()
    return out
