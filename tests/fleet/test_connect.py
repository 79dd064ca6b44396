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


def test_a_token_in_the_url_and_an_nkey_seed_file_connect(tmp_path: Path) -> None:
    """nats-py's other credentials, as `kvevents bridge` and `kvevents index --source` pass
    them: a token in the URL (nats://TOKEN@host) and an nkey seed file (--nats-nkey)."""
    import argparse
    import os

    import nkeys

    from kvevents_apps.cli import _nats_options

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "router.nk"
    seed_file.write_bytes(seed)
    config = tmp_path / "nkey.conf"
    config.write_text('authorization { users = [ { nkey: "' + public + '" } ] }\n')
    args = argparse.Namespace(
        nats_creds=None, nats_nkey=str(seed_file), nats_ca=None, nats_cert=None, nats_key=None
    )
    with NatsServer(tmp_path / "nkey", extra_args=("-c", str(config))) as server:

        async def nkey() -> None:
            nc, _ = await connect_jetstream(server.url, **_nats_options(args))
            await nc.close()
            with pytest.raises(ConnectionError, match="cannot reach NATS"):
                await connect_jetstream(server.url, connect_timeout=2.0)

        asyncio.run(nkey())
    with NatsServer(tmp_path / "token", extra_args=("--auth", "t0ken-for-tests")) as server:

        async def token() -> None:
            nc, _ = await connect_jetstream(server.url.replace("//", "//t0ken-for-tests@"))
            await nc.close()
            with pytest.raises(ConnectionError, match="cannot reach NATS"):
                await connect_jetstream(server.url, connect_timeout=2.0)

        asyncio.run(token())
