"""End-to-end reliability with real sockets: gaps repaired, restarts reported, nothing twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

import kvevents
from kvevents import Subscriber, vllm
from tests.support import inproc_endpoint, stable_tcp, wait_until

LOOPBACK = "tcp://127.0.0.1:0"


def batch(n: int = 0) -> vllm.KVEventBatch:
    return vllm.KVEventBatch(
        ts=float(n), events=[vllm.BlockRemoved(block_hashes=[n], medium="GPU")]
    )


def collect(
    sub: Subscriber,
    until,
    timeout: float = 60.0,
    slow_every: int = 0,
    pause: float = 0.01,
    pause_until=None,
):
    got = []
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        for delivery in sub.poll(0.2):
            got.append(delivery)
            if slow_every and len(got) % slow_every == 0:
                # A deliberately slow consumer: a fixed pause, or until a condition holds.
                if pause_until is None:
                    time.sleep(pause)
                else:
                    wait_until(lambda: pause_until(got), pause)
    return got


@pytest.fixture
def small_buffers() -> Iterator[zmq.Context]:
    """A context whose sockets have 16 KB kernel buffers: with the defaults a paused reader's
    TCP buffers hold megabytes (tens of thousands of these small batches), and the PUB
    socket may drop nothing however tiny its HWM. Ask for it before `publishers`, so it is
    torn down after them."""
    context = zmq.Context()
    context.setsockopt(zmq.SNDBUF, 16_384)
    context.setsockopt(zmq.RCVBUF, 16_384)
    yield context
    context.destroy(linger=100)  # not 0: kvevents_runtime.closing says why


@pytest.mark.slow
def test_100k_batches_through_a_tiny_hwm_arrive_exactly_once_in_order(small_buffers, publishers):
    publisher = vllm.ZmqEventPublisher(
        0,
        endpoint=LOOPBACK,
        replay_endpoint=LOOPBACK,
        hwm=20,
        buffer_steps=100_000,
        context=small_buffers,
    )
    publishers.append(publisher)
    notices = []
    total = 100_000
    with Subscriber(
        publisher.connect_endpoint,
        publisher.connect_replay_endpoint,
        rcvhwm=20,
        on_notice=notices.append,
        replay_timeout=10.0,  # a loaded CI machine must not turn a slow replay into a loss
        context=small_buffers,
    ) as sub:

        def produce():
            for n in range(total):
                publisher.publish(batch(n))
                if n % 2000 == 0:
                    time.sleep(0.001)

        producer = threading.Thread(target=produce)
        producer.start()

        # 50 ms pauses: far longer than 20-message pipes take to fill while the producer
        # runs, so drops happen on a fast machine too (10 ms was sometimes not enough).
        # Each pause lasts until the producer is 3,000 batches ahead (at most 2 s): far more
        # than 20-message pipes and 16 KB buffers hold, so drops happen on any machine (a
        # fixed 50 ms was not always enough on a loaded one).
        def ahead(g: list) -> bool:
            published = publisher.counters()["published"]
            return published >= total or published - len(g) > 3000

        got = collect(
            sub,
            lambda g: len(g) >= total,
            timeout=120,
            slow_every=2000,
            pause=2.0,
            pause_until=ahead,
        )
        producer.join()
        stats = dict(sub.stats)
    assert [d.seq for d in got] == list(range(total))
    assert [d.batch.ts for d in got[:3]] == [0.0, 1.0, 2.0]
    # Drops show as live gaps, or as batches that came by replay when they fell inside a
    # repair already under way.
    assert stats["gaps"] + stats["replayed"] > 0, f"the tiny HWM forced no drop: {stats}"
    assert stats["history_lost"] == 0 and stats["resets"] == 0
    print(f"100k e2e: {stats}")


def test_a_publisher_restart_is_reported_and_nothing_is_delivered_twice_as_new(publishers):
    live, replay = stable_tcp(), stable_tcp()  # restarted in place: not an ephemeral port
    first = vllm.ZmqEventPublisher(0, endpoint=live, replay_endpoint=replay)
    notices = []
    with Subscriber(live, replay, on_notice=notices.append) as sub:
        for n in range(50):
            first.publish(batch(n))
        got = collect(sub, lambda g: len(g) >= 50, timeout=10)
        first.shutdown()
        second = vllm.ZmqEventPublisher(0, endpoint=live, replay_endpoint=replay, bind=True)
        publishers.append(second)
        sent = 0
        # The wire has no epoch: a restart shows once a live batch of the new stream arrives,
        # so the new engine keeps stepping (one batch a millisecond, as a real one does)
        # until the subscriber saw it. poll() can return at once while batches are held.
        started = time.monotonic()
        while time.monotonic() < started + 10 and "reset" not in [n.kind for n in notices]:
            second.publish(batch(1000 + sent))
            sent += 1
            got += sub.poll(0.001)
            time.sleep(0.001)
        waited = time.monotonic() - started
        missing = 50 + sent - len(got)
        got += collect(sub, lambda g: len(g) >= missing, timeout=10)
    assert [n.kind for n in notices].count("reset") == 1, f"no restart seen in {waited:.1f} s"
    assert [d.seq for d in got[:50]] == list(range(50))
    assert [d.epoch for d in got[:50]] == [0] * 50
    assert [(d.seq, d.epoch) for d in got[50:]] == [(n, 1) for n in range(sent)]
    assert [d.batch.ts for d in got[50:]] == [float(n) for n in range(1000, 1000 + sent)]


def test_a_payload_that_is_not_a_batch_is_reported_and_the_stream_continues(publishers):
    publisher = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK)
    publishers.append(publisher)
    notices = []

    with Subscriber(
        publisher.connect_endpoint, publisher.connect_replay_endpoint, on_notice=notices.append
    ) as sub:
        publisher.publish(batch(0))
        publisher.publish(vllm.EventBatch(ts=1.0, events=["not an event"]))
        publisher.publish(["not", "a", "batch"])  # queued as it is; encodes as an array of strings
        publisher.publish(batch(3))
        got = collect(sub, lambda g: len(g) >= 3, timeout=10)
        time.sleep(0.3)
        got += sub.poll(0.2)
        stats = dict(sub.stats)
    assert [d.seq for d in got] == [0, 1, 3]
    assert got[1].batch.errors and got[1].batch.errors[0].index == 0
    assert stats["decode_errors"] == 1 and stats["replays_requested"] <= 2
    assert {"decode_error", "event_errors"} <= {n.kind for n in notices}


def test_joining_mid_stream_replays_from_start_or_not(publishers):
    publisher = vllm.ZmqEventPublisher(0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK)
    publishers.append(publisher)
    for n in range(20):
        publisher.publish(batch(n))
    time.sleep(0.2)
    with Subscriber(
        publisher.connect_endpoint, publisher.connect_replay_endpoint, join="start"
    ) as sub:
        got = collect(sub, lambda g: len(g) >= 20, timeout=10)
    assert [d.seq for d in got] == list(range(20))
    with Subscriber(
        publisher.connect_endpoint,
        publisher.connect_replay_endpoint,
        join="first_seen",
        idle_probe=None,
    ) as sub:
        time.sleep(0.3)
        for n in range(20, 25):
            publisher.publish(batch(n))
        got = collect(sub, lambda g: len(g) >= 5, timeout=10)
    assert [d.seq for d in got] == list(range(20, 25))


def test_history_lost_when_the_buffer_no_longer_reaches_back(publishers):
    publisher = vllm.ZmqEventPublisher(
        0, endpoint=LOOPBACK, replay_endpoint=LOOPBACK, buffer_steps=10
    )
    publishers.append(publisher)
    for n in range(30):
        publisher.publish(batch(n))
    time.sleep(0.2)
    notices = []
    with Subscriber(
        publisher.connect_endpoint, publisher.connect_replay_endpoint, on_notice=notices.append
    ) as sub:
        got = collect(sub, lambda g: len(g) >= 10, timeout=10)
    assert [d.seq for d in got] == list(range(20, 30))
    lost = [n for n in notices if n.kind == "history_lost"]
    assert lost and lost[0].detail["first"] == 0 and lost[0].detail["last"] == 19


@pytest.mark.parametrize("dialect", ["sglang", "legacy"])
def test_several_publishers_one_per_dp_rank_and_both_reply_shapes(dialect, publishers):
    module = __import__(f"kvevents.{dialect}", fromlist=["x"])
    name = inproc_endpoint()
    pubs = [
        module.ZmqEventPublisher(rank, endpoint=name, replay_endpoint=name + "-r", hwm=5)
        for rank in range(3)
    ]
    publishers.extend(pubs)
    sources = [(p.endpoint, p.replay_endpoint) for p in pubs]
    with Subscriber(sources=sources) as sub:
        for n in range(300):
            for p in pubs:
                p.publish(kvevents.KVEventBatch(ts=float(n), events=[kvevents.AllBlocksCleared()]))
        got = collect(sub, lambda g: len(g) >= 900, timeout=20)
    for rank in range(3):
        mine = [d for d in got if d.source == rank]
        assert [d.seq for d in mine] == list(range(300))
        assert {d.batch.dp_rank for d in mine} == {rank}


def test_replay_timeouts_are_bounded_when_nobody_answers(sockets):
    import zmq

    pub = sockets(zmq.PUB)
    pub.bind("tcp://127.0.0.1:0")
    live = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    silent = sockets(zmq.ROUTER)  # accepts requests, never answers
    silent.bind("tcp://127.0.0.1:0")
    notices = []
    with Subscriber(
        live,
        silent.getsockopt_string(zmq.LAST_ENDPOINT),
        replay_timeout=0.2,
        replay_attempts=2,
        on_notice=notices.append,
        idle_probe=None,
    ) as sub:
        began = time.monotonic()
        while time.monotonic() - began < 1.5:
            sub.poll(0.1)
        stats = dict(sub.stats)
    # Joining asks who the publisher is (one request, retried once), then gives up: no more.
    assert stats["info_requests"] == 1 and stats["replay_retries"] == 1
    assert stats["replays_requested"] == 0
