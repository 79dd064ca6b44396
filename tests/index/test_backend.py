"""The backend seam: `LiveIndex(backend=...)` is the one object the service uses, and it
reaches its backend through `IndexBackend` alone. The service runs here on a backend that is
nothing but the protocol (tests/index/protocol_only.py); the reference-model fuzz runs on it
too (tests/index/test_prefix_index.py)."""

from __future__ import annotations

import random

import pytest

from kvevents import vllm
from kvevents.index import IndexBackend, LiveIndex, PrefixIndex
from tests.index.protocol_only import ProtocolOnly
from tests.index.test_service import BS, chain, publish, register, score, service, stored
from tests.support import wait_until

pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")

__all__ = ["service"]  # the fixture, shared with test_service
LOOPBACK = "tcp://127.0.0.1:0"


def test_both_backends_satisfy_the_protocol() -> None:
    assert isinstance(PrefixIndex(BS), IndexBackend)
    assert isinstance(ProtocolOnly(BS), IndexBackend)
    assert not isinstance(object(), IndexBackend)


def test_a_backend_of_another_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size 8 differs from the backend's 16"):
        LiveIndex(8, backend=PrefixIndex(16))


def test_the_service_works_on_a_backend_that_is_only_the_protocol(service, publishers) -> None:
    """Every route that reads the index (query, query_by_hash, dump, workers, metrics) and a
    stale worker healing, with nothing but IndexBackend reachable behind LiveIndex."""
    server = service(backend_factory=ProtocolOnly)
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=64, snapshots=True)
    publishers.append(pub)
    rng = random.Random(5)
    tokens, hashes = chain(rng, 4)
    register(server, 7, pub)
    publish(pub, stored(hashes, tokens))
    assert wait_until(lambda: score(server, tokens) == {"7": {"0": 4 * BS}}, 10)
    app = server.server.config.app
    (live,) = app.indexes.values()
    assert isinstance(live.backend, ProtocolOnly)
    status, body = server.call("POST", "/query_by_hash", {"block_hashes": [], "model_name": "m"})
    assert status == 200, body
    status, dump = server.call("GET", "/dump")
    assert status == 200 and len(dump["m:default"]["events"]) == 4, dump
    status, workers = server.call("GET", "/workers")
    assert status == 200 and workers[0]["listeners"]["0"]["status"] == "active", workers
    status, metrics = server.call("GET", "/metrics")
    entries = 'kvevents_index_entries{model_name="m",routing_group="default"} 4.0'
    assert status == 200 and entries in metrics, metrics
    # A removal of a block it never stored: stale, a snapshot asked for, healed.
    publish(pub, vllm.BlockRemoved(block_hashes=[rng.getrandbits(64)], medium="GPU"))
    assert wait_until(lambda: live.all_counters()["snapshots"] >= 1, 10), live.all_counters()
    assert wait_until(lambda: not live.stale, 10), dict(live.stale)
    assert score(server, tokens) == {"7": {"0": 4 * BS}}
