"""CURVE on kvevents' own hops, with real sockets: allowed clients get the whole stream
(live and replayed), anyone else gets nothing and the publisher counts the refusal."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import zmq

from kvevents import Subscriber, vllm
from kvevents_runtime import security
from kvevents_runtime.security import CurveClient, CurveServer, SecurityError, make_keys
from tests.support import stable_tcp

LOOPBACK = "tcp://127.0.0.1:0"

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def batch(n: int) -> vllm.KVEventBatch:
    return vllm.KVEventBatch(
        ts=float(n), events=[vllm.BlockRemoved(block_hashes=[n], medium="GPU")]
    )


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A publisher pair, an allowed client, and a stranger (a valid pair nobody allowed)."""
    allowed = tmp_path / "allowed"
    server_public, server_secret = make_keys(tmp_path / "server", "publisher")
    client_public, client_secret = make_keys(tmp_path / "client", "router")
    _, stranger_secret = make_keys(tmp_path / "stranger", "stranger")
    allowed.mkdir()
    (allowed / client_public.name).write_bytes(client_public.read_bytes())
    _, other_server_secret = make_keys(tmp_path / "other", "other")
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "client_secret": client_secret,
        "stranger_secret": stranger_secret,
        "other_server_public": tmp_path / "other" / "other.key",
        "allowed": allowed,
    }


@pytest.fixture
def curve_publisher(keys, publishers, monkeypatch):
    """A vLLM-dialect publisher whose CURVE settings come from the environment (its config
    class has no field for them, by design)."""
    monkeypatch.setenv(security.ENV_SERVER_SECRET, str(keys["server_secret"]))
    monkeypatch.setenv(security.ENV_ALLOWED_CLIENTS, str(keys["allowed"]))
    publisher = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK)
    publishers.append(publisher)
    monkeypatch.delenv(security.ENV_SERVER_SECRET)
    monkeypatch.delenv(security.ENV_ALLOWED_CLIENTS)
    return publisher


def received(sub: Subscriber, count: int, timeout: float) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += sub.poll(0.1)
    return got


def published_while_polling(publisher, sub: Subscriber, seconds: float) -> list:
    """Publish a batch every poll for `seconds` (a joiner that can get in sees some); what
    the subscriber delivered."""
    deadline = time.monotonic() + seconds
    got: list = []
    n = 0
    while time.monotonic() < deadline:
        publisher.publish(batch(n))
        n += 1
        got += sub.poll(0.02)
    return got


def test_make_keys_writes_a_pair_zmq_auth_can_read(tmp_path: Path) -> None:
    public, secret = make_keys(tmp_path, "node")
    assert zmq.auth.load_certificate(str(public))[1] is None
    pub_key, secret_key = zmq.auth.load_certificate(str(secret))
    assert secret_key is not None and len(pub_key) == 40
    assert secret.stat().st_mode & 0o077 == 0


def test_an_allowed_client_gets_every_seq_once_in_order_live_and_replayed(
    keys, curve_publisher
) -> None:
    for n in range(30):
        curve_publisher.publish(batch(n))  # before anyone subscribed: only a replay has them
    client = CurveClient.from_files(keys["client_secret"], keys["server_public"])
    with Subscriber(
        curve_publisher.connect_endpoint,
        curve_publisher.connect_replay_endpoint,
        curve=client,
    ) as sub:
        time.sleep(0.3)
        for n in range(30, 60):
            curve_publisher.publish(batch(n))
        got = received(sub, 60, timeout=15)
        stats = dict(sub.stats)
    assert [d.seq for d in got] == list(range(60))
    assert [d.batch.ts for d in got] == [float(n) for n in range(60)]
    assert stats["replayed"] >= 30 and stats["history_lost"] == 0
    assert curve_publisher.counters()["curve_refused"] == 0


@pytest.mark.parametrize("who", ["stranger", "plain"])
def test_a_client_that_is_not_allowed_receives_nothing_and_is_counted(
    keys, curve_publisher, who
) -> None:
    curve = (
        CurveClient.from_files(keys["stranger_secret"], keys["server_public"])
        if who == "stranger"
        else None
    )
    with Subscriber(
        curve_publisher.connect_endpoint,
        curve_publisher.connect_replay_endpoint,
        curve=curve,
        idle_probe=0.2,
    ) as sub:
        got = published_while_polling(curve_publisher, sub, seconds=1.5)
        refused = curve_publisher.counters()["curve_refused"]
    assert got == []
    if who == "stranger":
        assert refused >= 1  # its handshakes reached the allow-list and were turned away


def test_a_client_with_the_wrong_server_key_receives_nothing(keys, curve_publisher) -> None:
    client = CurveClient.from_files(keys["client_secret"], keys["other_server_public"])
    with Subscriber(
        curve_publisher.connect_endpoint, curve_publisher.connect_replay_endpoint, curve=client
    ) as sub:
        got = published_while_polling(curve_publisher, sub, seconds=1.5)
    assert got == []


def test_the_subscriber_reads_its_keys_from_the_environment(
    keys, curve_publisher, monkeypatch
) -> None:
    monkeypatch.setenv(security.ENV_CLIENT_SECRET, str(keys["client_secret"]))
    monkeypatch.setenv(security.ENV_SERVER_PUBLIC, str(keys["server_public"]))
    with Subscriber(
        curve_publisher.connect_endpoint, curve_publisher.connect_replay_endpoint
    ) as sub:
        time.sleep(0.3)
        for n in range(5):
            curve_publisher.publish(batch(n))
        got = received(sub, 5, timeout=10)
    assert [d.seq for d in got] == list(range(5))


def test_half_a_setting_or_a_missing_file_is_a_clear_error(keys, monkeypatch) -> None:
    monkeypatch.setenv(security.ENV_SERVER_PUBLIC, str(keys["server_public"]))
    with pytest.raises(SecurityError, match=security.ENV_CLIENT_SECRET):
        CurveClient.from_env()
    monkeypatch.delenv(security.ENV_SERVER_PUBLIC)
    monkeypatch.setenv(security.ENV_CLIENT_SECRET, str(keys["client_secret"]))
    assert CurveClient.from_env() is None  # a pair alone: for server keys given per source
    with pytest.raises(SecurityError, match="cannot read"):
        CurveClient.from_files(keys["client_secret"], "/nonexistent/server.key")
    with pytest.raises(SecurityError, match="no secret key"):
        CurveServer(keys["server_public"], keys["allowed"])
    with pytest.raises(SecurityError, match="does not exist"):
        CurveServer(keys["server_secret"], "/nonexistent/allowed")


def test_binding_every_interface_without_curve_warns_once(caplog, publishers, monkeypatch) -> None:
    monkeypatch.setattr(security, "_warned", __import__("threading").Event())  # a fresh process
    caplog.set_level(logging.WARNING, logger="kvevents.security")
    wildcard = stable_tcp().replace("127.0.0.1", "0.0.0.0")  # port 0 would be made the node's IP
    first = vllm.ZmqEventPublisher(0, endpoint=wildcard, replay_endpoint=None)
    publishers.append(first)
    loopback = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=None)
    publishers.append(loopback)
    again = stable_tcp().replace("127.0.0.1", "0.0.0.0")
    publishers.append(vllm.ZmqEventPublisher(0, endpoint=again, replay_endpoint=None))
    warnings = [r for r in caplog.records if "without CURVE" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()


def test_a_restart_over_curve_is_reported_once_and_nothing_is_spliced(
    keys, publishers, monkeypatch
) -> None:
    """The delivery contract's restart rule over CURVE: a publisher restarted in place (same
    keys) is a new epoch, delivered from its seq 0, reported once."""
    monkeypatch.setenv(security.ENV_SERVER_SECRET, str(keys["server_secret"]))
    monkeypatch.setenv(security.ENV_ALLOWED_CLIENTS, str(keys["allowed"]))
    live, replay = stable_tcp(), stable_tcp()
    first = vllm.ZmqEventPublisher(0, endpoint=live, replay_endpoint=replay)
    publishers.append(first)  # shut down in the test; again at teardown is a no-op
    client = CurveClient.from_files(keys["client_secret"], keys["server_public"])
    notices: list = []
    with Subscriber(live, replay, curve=client, on_notice=notices.append) as sub:
        time.sleep(0.3)
        for n in range(20):
            first.publish(batch(n))
        got = received(sub, 20, timeout=10)
        first.shutdown()
        second = vllm.ZmqEventPublisher(0, endpoint=live, replay_endpoint=replay, bind=True)
        publishers.append(second)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "reset" not in [n.kind for n in notices]:
            second.publish(batch(1000 + sent))
            sent += 1
            got += sub.poll(0.001)
            time.sleep(0.001)
        got += received(sub, 20 + sent - len(got), timeout=10)
    assert [n.kind for n in notices].count("reset") == 1
    assert [(d.seq, d.epoch) for d in got[:20]] == [(n, 0) for n in range(20)]
    assert [(d.seq, d.epoch) for d in got[20:]] == [(n, 1) for n in range(sent)]
