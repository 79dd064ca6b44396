"""The equality proof across replicas under randomized fault schedules.

Engines (mock engines publishing through kvevents publishers) -> one bridge -> a real
nats-server -> three replicas. A schedule interleaves workload steps with faults: the bridge
restarted, the NATS server restarted (its store kept), a replica restarted mid-stream, an
engine restarted, an engine's cache cleared (AllBlocksCleared), and the bridge's queue
overflowing while NATS is down. At the end every replica, and one started after every engine
has stopped, holds exactly the engines' caches, none of them stale, and all answer every
query alike.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvevents.fleet import Bridge, FleetIndex
from kvevents_apps.natsserver import NatsServer

from .fleetkit import Fleet, mismatches, settle

OPS = st.one_of(
    st.tuples(st.just("steps"), st.integers(1, 6)),
    st.tuples(st.just("bridge_restart"), st.just(0)),
    st.tuples(st.just("nats_restart"), st.just(0)),
    st.tuples(st.just("replica_restart"), st.integers(0, 2)),
    st.tuples(st.just("engine_restart"), st.integers(0, 2)),
    st.tuples(st.just("engine_clear"), st.integers(0, 2)),
    st.tuples(st.just("overflow"), st.just(0)),
)


class Harness:
    def __init__(self, server: Any, seed: int, capacity: int = 64) -> None:
        self.server = server
        self.fleet = Fleet(3, seed=seed, capacity=capacity)
        self.bridge: Bridge | None = None
        self.task: asyncio.Task[None] | None = None
        self.replicas: list[FleetIndex] = []
        # Each schedule its own stream: the server (one per test) outlives a schedule, and a
        # stream keeps a stopped engine's last state, as it should.
        name = uuid.uuid4().hex[:10]
        self.names = {"stream": f"S{name}", "root": f"kvt.{name}"}

    async def start_bridge(self, **options: Any) -> None:
        self.bridge = Bridge(
            self.server.url, self.fleet.specs(), **self.names, snapshot_interval=0.3, **options
        )
        await self.bridge.start()
        self.task = asyncio.create_task(self.bridge.run())

    async def stop_bridge(self) -> None:
        assert self.bridge is not None and self.task is not None
        await self.bridge.close()
        await self.task
        self.bridge = None

    async def replica(self) -> FleetIndex:
        replica = FleetIndex(self.server.url, model=self.fleet.model, block_size=4, **self.names)
        await replica.start()
        return replica

    async def apply(self, op: str, arg: int) -> None:
        fleet = self.fleet
        if op == "steps":
            fleet.step(arg)
            await asyncio.sleep(0.02)
        elif op == "bridge_restart":
            await self.stop_bridge()
            fleet.step(2)  # the engines go on while no bridge follows them
            await self.start_bridge()
        elif op == "nats_restart":
            await asyncio.to_thread(self.server.restart)
        elif op == "replica_restart":
            await self.replicas[arg].close()
            fleet.step(1)
            self.replicas[arg] = await self.replica()
        elif op == "engine_restart":
            fleet.engines[arg].restart()
            fleet.running[arg].clear()
        elif op == "engine_clear":
            fleet.engines[arg].clear()
            fleet.running[arg].clear()
            fleet.engines[arg].step()
        elif op == "overflow":
            # NATS down while the engines go on: the bridge's queue (bounded small here)
            # overflows, drops and resynchronises by snapshots once NATS is back.
            await self.stop_bridge()
            await self.start_bridge(max_queue=4)
            await asyncio.to_thread(self.server.stop)
            fleet.step(6)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(self.server.start)

    async def check(self, replicas: list[FleetIndex]) -> None:
        assert self.bridge is not None
        await settle(self.fleet, [self.bridge], timeout=60)
        for replica in replicas:
            await replica.sync(timeout=60)
        for number, replica in enumerate(replicas):
            assert mismatches(self.fleet, replica) == [], f"replica {number}: {replica.progress()}"
        # No replica is stale, so any loss the bridge met is healed: every worker it has
        # followed is whole.
        bridge = self.bridge
        followed = [key for key in bridge.worker_keys() if bridge.position(key)[0] is not None]
        assert all(bridge.whole(key) for key in followed), followed
        probes = [p + [7] * 4 for p in self.fleet.prefixes]
        answers = [[sorted(r.query(p).items()) for p in probes] for r in replicas]
        assert all(a == answers[0] for a in answers), "replicas answer differently"


async def _schedule(server: Any, seed: int, ops: list[tuple[str, int]]) -> dict[str, int]:
    harness = Harness(server, seed)
    await harness.start_bridge()
    harness.replicas = [await harness.replica() for _ in range(3)]
    try:
        for op, arg in ops:
            await harness.apply(op, arg)
        harness.fleet.step(2)
        await harness.check(harness.replicas)
        assert harness.bridge is not None
        counters = dict(harness.bridge.counters)
        harness.fleet.close()  # every engine stops
        late = await harness.replica()
        harness.replicas.append(late)
        await late.sync(timeout=60)
        assert mismatches(harness.fleet, late) == [], late.progress()
        return counters
    finally:
        for replica in harness.replicas:
            await replica.close()
        if harness.bridge is not None:
            await harness.stop_bridge()
        harness.fleet.close()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), ops=st.lists(OPS, min_size=3, max_size=8))
def test_every_replica_equals_the_engines_under_faults(nats_server, seed, ops) -> None:
    asyncio.run(_schedule(nats_server, seed, ops))


def test_each_fault_alone(nats_server) -> None:
    """Every fault kind once, in a fixed order: a failure names the fault that broke it."""
    for op, arg in [
        ("steps", 3),
        ("engine_clear", 0),
        ("steps", 2),
        ("engine_restart", 1),
        ("steps", 2),
        ("bridge_restart", 0),
        ("replica_restart", 2),
        ("nats_restart", 0),
        ("steps", 2),
        ("overflow", 0),
        ("steps", 2),
    ]:
        asyncio.run(_schedule(nats_server, 7, [(op, arg)]))


async def _overflow(server: Any) -> None:
    harness = Harness(server, 3)
    await harness.start_bridge(max_queue=4)
    assert harness.bridge is not None
    harness.bridge.snapshot_interval = 3600.0  # no periodic snapshot comes to the rescue
    harness.replicas = [await harness.replica()]
    try:
        harness.fleet.step(2)
        await settle(harness.fleet, [harness.bridge])
        await asyncio.to_thread(server.stop)
        harness.fleet.step(8)
        bridge = harness.bridge
        deadline = asyncio.get_running_loop().time() + 30
        while bridge.counters["overflows"] == 0:
            assert asyncio.get_running_loop().time() < deadline, bridge.counters
            await asyncio.sleep(0.05)
        await asyncio.to_thread(server.start)
        await harness.check(harness.replicas)
        assert bridge.counters["dropped"] > 0
        assert bridge.counters["snapshots_written"] >= 1
    finally:
        for replica in harness.replicas:
            await replica.close()
        await harness.stop_bridge()
        harness.fleet.close()


def test_a_full_queue_drops_and_resynchronises_by_snapshot(nats_server) -> None:
    """NATS down, the engines go on: the bridge never blocks them; its queue overflows, the
    messages are dropped (counted), and one snapshot per worker makes the replicas whole."""
    asyncio.run(_overflow(nats_server))


async def _oversize(server: Any) -> None:
    harness = Harness(server, 5, capacity=2048)
    await harness.start_bridge()
    harness.replicas = [await harness.replica()]
    try:
        harness.fleet.step(3)
        engine = harness.fleet.engines[0]
        prompt = [n % 50_000 for n in range(4 * 1200)]  # 1,200 blocks: a batch far over 4 KiB
        assert engine.admit(prompt) is not None
        engine.step()
        harness.fleet.step(2)
        await harness.check(harness.replicas)
        assert harness.bridge is not None and harness.bridge.counters["oversize"] >= 1
        assert harness.replicas[0].tracker.counters["lost_markers"] >= 1
    finally:
        for replica in harness.replicas:
            await replica.close()
        await harness.stop_bridge()
        harness.fleet.close()


def test_a_batch_over_the_servers_max_payload_is_named_lost_and_resynchronised(
    tmp_path: Path,
) -> None:
    """A long prompt's batch can exceed what the server stores in one message: the bridge
    names its seq lost and writes the worker's snapshot (chunked) in its place; it never
    retries it for ever."""
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 4096\n")
    with NatsServer(tmp_path / "nats", extra_args=("-c", str(config))) as server:
        asyncio.run(_oversize(server))
