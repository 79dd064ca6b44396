"""Ports for publishers restarted in place: below the kernel's ephemeral range, so a
reconnecting subscriber cannot take them while the publisher is down."""

from __future__ import annotations

import random
import socket
import time

import pytest

import kvevents
from kvevents.mock import MockEngine
from kvevents_runtime import ports


def test_a_stable_port_is_free_and_below_the_ephemeral_range() -> None:
    low = ports.ephemeral_low()
    drawn = {kvevents.stable_port() for _ in range(20)}
    assert len(drawn) > 1, "drawn at random, so two callers rarely collide"
    for port in drawn:
        assert 1024 <= port < low
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path, monkeypatch) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", setting)
    assert ports.ephemeral_low() == 40000
    assert all(
        ports.LOWEST <= kvevents.stable_port(rng=random.Random(n)) < 40000 for n in range(20)
    )
    setting.write_text("garbage")
    assert ports.ephemeral_low() == ports.FALLBACK_EPHEMERAL_LOW
    setting.write_text("1024 60999")
    with pytest.raises(kvevents.EndpointError, match="no port below"):
        kvevents.stable_port()


def test_pin_port_replaces_only_port_zero() -> None:
    pinned = ports.pin_port("tcp://127.0.0.1:0")
    host, port = pinned.rsplit(":", 1)
    assert host == "tcp://127.0.0.1" and 0 < int(port) < ports.ephemeral_low()
    assert ports.pin_port("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"
    assert ports.pin_port("ipc:///tmp/x") == "ipc:///tmp/x"
    assert ports.pin_port("tcp://*:0").startswith("tcp://*:")


def test_a_mock_engine_restarts_on_its_ports_while_a_subscriber_reconnects() -> None:
    """The engine's default port 0 is pinned below the ephemeral range; five restarts while
    a subscriber keeps reconnecting every 100 ms all bind again, and each new instance's
    stream reaches the subscriber."""
    engine = MockEngine(capacity_blocks=64)
    try:
        live = engine.publisher.connect_endpoint
        assert int(live.rsplit(":", 1)[1]) < ports.ephemeral_low()
        epochs = set()
        notices: list = []
        with kvevents.Subscriber(
            live, engine.publisher.connect_replay_endpoint, on_notice=notices.append
        ) as sub:
            for restart in range(6):
                if restart:
                    engine.publisher.shutdown()
                    time.sleep(0.3)  # down: the SUB retries its connection meanwhile
                    engine.restart()
                    assert engine.publisher.connect_endpoint == live
                deadline = time.monotonic() + 10
                while restart not in epochs and time.monotonic() < deadline:
                    engine.admit(list(range(restart * 100, restart * 100 + 32)))
                    engine.step(float(restart))
                    epochs |= {d.epoch for d in sub.poll(0.1)}
            stats = dict(sub.stats)
        # On failure: what the subscriber saw, and whether the last publisher sent anything
        # and heard any request (seen once in several full runs, never alone: unexplained).
        assert epochs == set(range(6)), (
            stats,
            engine.publisher.counters(),
            "\n".join(str(n) for n in notices[-15:]),
        )
        # Each lost connection was said: live input held until the publisher said who it is.
        assert stats["holds"] >= 1 and any(n.kind == "holding" for n in notices), stats
    finally:
        engine.close()
