"""Engines -> bridge -> a real nats-server -> replicas: every replica equals the engines."""

from __future__ import annotations

import asyncio

from kvevents.fleet import Bridge, FleetIndex

from .fleetkit import Fleet, mismatches, settle


async def _run(nats_url: str) -> None:
    fleet = Fleet(3, seed=1)
    bridge = Bridge(nats_url, fleet.specs(), snapshot_interval=0.5)
    await bridge.start()
    running = asyncio.create_task(bridge.run())
    replica = FleetIndex(nats_url, model="m", block_size=4)
    await replica.start()
    try:
        for _ in range(20):
            fleet.step(5)
            await asyncio.sleep(0.01)
        await settle(fleet, [bridge])
        await replica.sync()
        assert mismatches(fleet, replica) == []
        bridge.snapshot_all()
        await settle(fleet, [bridge])
        assert bridge.counters["snapshots_written"] >= 3
        late = FleetIndex(nats_url, model="m", block_size=4)
        await late.start()
        try:
            await late.sync()
            assert mismatches(fleet, late) == []
            assert late.snapshots_at_start == 3
        finally:
            await late.close()
    finally:
        await replica.close()
        await bridge.close()
        running.cancel()
        fleet.close()


def test_replicas_equal_the_engines(nats_server) -> None:
    asyncio.run(_run(nats_server.url))
