"""Connecting to NATS: credentials in the URL, a clear error when refused or too old."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kvevents.fleet import FleetIndex
from kvevents_apps.natsserver import NatsServer
from kvevents_runtime.fleet.natsio import connect_jetstream


def test_credentials_in_the_url_and_a_refusal_is_one_error(tmp_path: Path) -> None:
    with NatsServer(
        tmp_path / "auth", extra_args=("--user", "router", "--pass", "s3cret")
    ) as server:
        good = server.url.replace("nats://", "nats://router:s3cret@")
        bad = server.url.replace("nats://", "nats://router:wrong@")

        async def run() -> None:
            nc, _ = await connect_jetstream(good)
            await nc.close()
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="cannot reach NATS"):
                await connect_jetstream(bad, connect_timeout=2.0)
            assert time.monotonic() - started < 10

        asyncio.run(run())


def test_a_replica_without_a_stream_says_so(nats_server) -> None:
    async def run() -> None:
        replica = FleetIndex(nats_server.url, "m", stream="NOSUCH")
        with pytest.raises(TimeoutError, match="no stream 'NOSUCH'"):
            await replica.start(timeout=0.5)
        await replica.close()

    asyncio.run(run())
