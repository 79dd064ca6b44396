"""Engines -> bridge -> a real nats-server -> replicas: every replica equals the engines,
with token ids on the wire or (`redact`) local block hashes in their place."""

from __future__ import annotations

import asyncio

import nats
import pytest

from kvevents.fleet import Bridge, FleetIndex, protocol
from kvevents_runtime.fleet.redact import is_redacted, unredact

from .fleetkit import Fleet, mismatches, settle


async def _stored_payloads(url: str) -> tuple[list[bytes], list[bytes]]:
    """Every batch payload in the stream, and every payload of every snapshot object."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(protocol.STREAM)
    batches = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(protocol.STREAM, seq)
        if (msg.headers or {}).get(protocol.KIND) == protocol.BATCH:
            batches.append(msg.data)
    objects = await js.object_store(protocol.bucket_name(protocol.STREAM))
    snapshots = []
    for entry in await objects.list(ignore_deletes=True):
        record = protocol.decode_snapshot((await objects.get(entry.name)).data)
        snapshots += record.payloads
    await nc.close()
    return batches, snapshots


async def _run(nats_url: str, redact: bool) -> None:
    fleet = Fleet(3, seed=1)
    bridge = Bridge(nats_url, fleet.specs(), snapshot_interval=0.5, redact=redact)
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
            probes = [p + [7] * 4 for p in fleet.prefixes]
            assert [late.query(p) for p in probes] == [replica.query(p) for p in probes]
        finally:
            await late.close()
        batches, snapshots = await _stored_payloads(nats_url)
        assert batches and snapshots
        for payload in batches + snapshots:
            assert is_redacted(payload) == redact
            if redact:
                events = unredact(payload).events
                assert all(not hasattr(e, "token_ids") for e in events)
    finally:
        await replica.close()
        await bridge.close()
        running.cancel()
        fleet.close()


@pytest.mark.parametrize("redact", [False, True], ids=["token_ids", "redacted"])
def test_replicas_equal_the_engines(nats_server, redact: bool) -> None:
    asyncio.run(_run(nats_server.url, redact))


async def _missing_snapshot(nats_url: str) -> None:
    fleet = Fleet(2, seed=2)
    bridge = Bridge(nats_url, fleet.specs(), snapshot_interval=3600)
    await bridge.start()
    running = asyncio.create_task(bridge.run())
    nc = await nats.connect(nats_url)
    try:
        fleet.step(8)
        await settle(fleet, [bridge])
        bridge.snapshot_all()
        await settle(fleet, [bridge])
        # Worker 2's snapshot is gone (not written yet, or unreadable), worker 1's covers every
        # message of worker 2: a replica starting after worker 1's cover would miss them.
        objects = await nc.jetstream().object_store(protocol.bucket_name(protocol.STREAM))
        await objects.delete(protocol.snapshot_object("m", *fleet.key(1)))
        late = FleetIndex(nats_url, model="m", block_size=4)
        await late.start()
        try:
            await late.sync()
            assert late.snapshots_at_start == 1
            assert mismatches(fleet, late) == []
        finally:
            await late.close()
    finally:
        await nc.close()
        await bridge.close()
        running.cancel()
        fleet.close()


def test_a_worker_without_a_snapshot_is_read_from_its_first_message(nats_server) -> None:
    asyncio.run(_missing_snapshot(nats_server.url))
