"""The subscriber against real sockets and hostile or restarting peers: restarts seen by
instance id, the END marker on the live socket, other topics, short messages, busy replies,
removing a source."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvevents
from kvevents import Subscriber, frames, vllm
from tests.support import stable_tcp, wait_until

LOOPBACK = "tcp://127.0.0.1:0"


def batch(n: int, instance: int = 0) -> vllm.KVEventBatch:
    removed = vllm.BlockRemoved(block_hashes=[n], medium=None)
    return vllm.KVEventBatch(ts=instance * 1_000_000 + n, events=[removed])


def collect(sub: Subscriber, until, timeout: float = 15.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        got += sub.poll(0.05)
    return got


def test_a_restart_past_the_old_seq_is_seen_by_instance_id(publishers) -> None:
    """The old subscriber spliced a restarted publisher that had run past the old seq onto
    the old stream; the instance id in the info reply tells them apart."""
    live, replay = stable_tcp(), stable_tcp()  # restarted in place: not an ephemeral port
    first = vllm.ZmqEventPublisher(0, live, replay)
    notices: list = []
    with Subscriber(live, replay, on_notice=notices.append, idle_probe=0.2) as sub:
        for n in range(5):
            first.publish(batch(n))
        got = collect(sub, lambda g: len(g) >= 5)
        assert [d.seq for d in got] == [0, 1, 2, 3, 4]
        first.shutdown()
        second = vllm.ZmqEventPublisher(0, live, replay)
        publishers.append(second)
        for n in range(20):  # past the old seq, before the subscriber looks
            second.publish(batch(n, instance=1))
        after = collect(sub, lambda g: len([d for d in g if d.epoch == 1]) >= 20)
    resets = [n for n in notices if n.kind == "reset"]
    assert len(resets) == 1 and "instance" in resets[0].detail["reason"]
    new = [d for d in after if d.epoch == 1]
    assert [d.seq for d in new] == list(range(20))
    assert all(d.batch.ts >= 1_000_000 for d in new), "a batch of the old instance in the new epoch"
    assert not [d for d in after if d.epoch == 0]


def test_the_end_marker_on_the_live_socket_is_malformed_input(sockets) -> None:
    pub = sockets(zmq.PUB)
    pub.bind(LOOPBACK)
    notices: list = []
    with Subscriber(
        pub.getsockopt_string(zmq.LAST_ENDPOINT), join="first_seen", on_notice=notices.append
    ) as sub:
        time.sleep(0.3)
        good = kvevents.encode(kvevents.KVEventBatch(ts=1.0, events=[]), "vllm")
        pub.send_multipart([b"", frames.END_SEQ, good])
        pub.send_multipart([b"", frames.seq_bytes(0), good])
        got = collect(sub, lambda g: len(g) >= 1, timeout=5)
        assert [d.seq for d in got] == [0]
        assert sub.stats["malformed"] == 1
    assert any("END marker" in n.detail.get("reason", "") for n in notices)


def test_a_prefix_matching_topic_is_not_this_sources(sockets) -> None:
    pub = sockets(zmq.PUB)
    pub.bind(LOOPBACK)
    with Subscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), topic="kv", join="first_seen") as sub:
        time.sleep(0.3)
        good = kvevents.encode(kvevents.KVEventBatch(ts=1.0, events=[]), "vllm")
        for seq in range(3):
            pub.send_multipart(
                [b"kvX", frames.seq_bytes(100 + seq), good]
            )  # ZeroMQ's prefix match lets it in
        pub.send_multipart([b"kv", frames.seq_bytes(0), good])
        got = collect(sub, lambda g: len(g) >= 1, timeout=5)
        assert [d.seq for d in got] == [0]
        assert sub.stats["other_topic"] == 3 and sub.stats["gaps"] == 0


def test_short_messages_never_merge_with_their_neighbours(sockets) -> None:
    """[topic] then [seq, payload] look like one good message to a reader that only checks
    the last frame's `more` flag; each frame's flag is read, so both are dropped."""
    pub = sockets(zmq.PUB)
    pub.bind(LOOPBACK)
    with Subscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), join="first_seen") as sub:
        time.sleep(0.3)
        payload = kvevents.encode(kvevents.KVEventBatch(ts=7.0, events=[]), "vllm")
        pub.send_multipart([b""])
        pub.send_multipart([frames.seq_bytes(5), payload])
        pub.send_multipart([b"", frames.seq_bytes(0)])
        pub.send_multipart([payload])
        pub.send_multipart([b"", frames.seq_bytes(0), payload])
        got = collect(sub, lambda g: len(g) >= 1, timeout=5)
        time.sleep(0.2)
        got += sub.poll(0.1)
        assert [(d.seq, d.batch.ts) for d in got] == [(0, 7.0)]
        assert sub.stats["malformed"] == 4


def test_a_peer_that_never_reads_holds_one_replay_and_others_are_told_busy(
    publishers, sockets, monkeypatch
) -> None:
    """One DEALER asking for full replays and never reading used to take every replay slot
    while others got no answer. Now it holds one; with every slot taken (one, here), a
    subscriber is told busy, backs off and asks again, and its live stream goes on."""
    from kvevents_runtime.replay import ReplayService

    monkeypatch.setattr(ReplayService, "MAX_SESSIONS", 1)
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=1000)
    publishers.append(publisher)
    tokens = list(
        range(1_000_000, 1_002_000)
    )  # 10 kB a batch: a replay outgrows the socket buffers
    for n in range(1000):
        stored = vllm.BlockStored(
            block_hashes=[n],
            parent_block_hash=None,
            token_ids=tokens,
            block_size=16,
            lora_id=None,
            medium=None,
            lora_name=None,
        )
        publisher.publish(vllm.KVEventBatch(ts=float(n), events=[stored]))
    assert wait_until(lambda: publisher.counters()["next_seq"] == 1000)
    hostile = sockets(zmq.DEALER)
    hostile.setsockopt(zmq.RCVHWM, 1)
    hostile.connect(publisher.connect_replay_endpoint)
    for _ in range(4):  # the ROUTER queues two full replays; the third stays in flight
        hostile.send_multipart(frames.pack_replay_request(0))
        time.sleep(0.1)
    assert wait_until(lambda: publisher.counters()["replay_rejected_busy"] >= 1, timeout=5)
    notices: list = []
    with Subscriber(
        publisher.connect_endpoint, publisher.connect_replay_endpoint, on_notice=notices.append
    ) as sub:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(n.kind == "busy" for n in notices):
            sub.poll(0.05)
        assert sub.stats["busy"] >= 1
        publisher.publish(batch(1000))
        deadline = time.monotonic() + 5
        busy_before = sub.stats["busy"]
        while time.monotonic() < deadline and sub.stats["busy"] == busy_before:
            sub.poll(0.05)
        assert sub.stats["busy"] > busy_before, "the refused replay is asked for again"


def test_removing_a_source_stops_its_deliveries(publishers) -> None:
    publishers.extend(vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK) for _ in range(2))
    a, b = publishers
    with Subscriber(
        sources=[(p.connect_endpoint, p.connect_replay_endpoint) for p in (a, b)]
    ) as sub:
        for n in range(3):
            a.publish(batch(n))
            b.publish(batch(n))
        got = collect(sub, lambda g: len(g) >= 6)
        assert sorted({d.source for d in got}) == [0, 1]
        sub.remove_source(1)
        sub.remove_source(1)  # idempotent
        assert [s.index for s in sub.sources] == [0]
        for n in range(3, 6):
            a.publish(batch(n))
            b.publish(batch(n))
        later = collect(sub, lambda g: len(g) >= 3)
        time.sleep(0.3)
        later += sub.poll(0.1)
    assert {d.source for d in later} == {0}


def test_against_a_publisher_without_info_the_subscriber_says_so(sockets) -> None:
    """vLLM's and SGLang's publishers answer the info request with a bare END: the source
    falls back to seeing restarts by a live seq going backwards, and its stats say so."""
    pub, router = sockets(zmq.PUB), sockets(zmq.ROUTER)
    pub.bind(LOOPBACK)
    router.bind(LOOPBACK)
    with Subscriber(
        pub.getsockopt_string(zmq.LAST_ENDPOINT), router.getsockopt_string(zmq.LAST_ENDPOINT)
    ) as sub:
        deadline = time.monotonic() + 5
        answered = False
        while time.monotonic() < deadline and sub.sources[0].info_supported is None:
            sub.poll(0.05)
            if not answered and router.poll(0):
                identity, _, start = router.recv_multipart()
                assert start == frames.END_SEQ
                router.send_multipart([identity, b"", b"", frames.END_SEQ, b""])
                answered = True
        assert sub.sources[0].info_supported is False


def test_notices_for_a_silent_source(sockets) -> None:
    pub = sockets(zmq.PUB)
    pub.bind(LOOPBACK)
    notices: list = []
    with Subscriber(
        pub.getsockopt_string(zmq.LAST_ENDPOINT),
        join="first_seen",
        stale_after=0.3,
        on_notice=notices.append,
    ) as sub:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(n.kind == "stale" for n in notices):
            sub.poll(0.05)
        payload = kvevents.encode(kvevents.KVEventBatch(ts=1.0, events=[]), "vllm")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(n.kind == "alive" for n in notices):
            pub.send_multipart([b"", frames.seq_bytes(0), payload])
            sub.poll(0.05)
    kinds = [n.kind for n in notices]
    assert kinds.count("stale") == 1 and "alive" in kinds


def test_a_flood_of_bad_events_is_one_decode_error() -> None:
    """4 MB of empty arrays as events: past the per-batch cap it is one DecodeError with the
    count, not four million error objects (12 s and 300 bytes per payload byte before)."""
    count = 4_000_000
    payload = (
        b"\x93\xcb" + b"\x00" * 8 + b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count + b"\xc0"
    )
    assert len(msgspec.msgpack.decode(payload)[1]) == count  # a well-formed batch of bad events
    with pytest.raises(
        kvevents.DecodeError, match=f"more than {kvevents.MAX_EVENT_ERRORS} undecodable events"
    ):
        kvevents.decode(payload)
    few = b"\x93\xcb" + b"\x00" * 8 + b"\x92\x90\x90\xc0"
    assert len(kvevents.decode(few).errors) == 2


@settings(
    max_examples=int(os.environ.get("KVEVENTS_REAL_SCHEDULES", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    schedule=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(1, 40)),
            st.tuples(st.just("stall"), st.integers(50, 400)),  # published while nobody reads
            st.tuples(st.just("restart"), st.sampled_from([8, 64, 10_000])),
            st.tuples(st.just("poll"), st.integers(1, 5)),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_the_contract_holds_with_the_real_publisher(schedule) -> None:
    """The contract of test_contract.py, with real sockets: a kvevents publisher with a tiny
    HWM (the PUB drops while the subscriber stalls), restarted on the same ports at random with
    buffers that may not reach back. Each batch's ts names its instance and seq."""
    instance = 0
    buffer_steps = 10_000
    live, replay = stable_tcp(), stable_tcp()  # restarted in place: not an ephemeral port
    publisher = vllm.ZmqEventPublisher(0, live, replay, hwm=20, buffer_steps=buffer_steps)
    notices: list = []
    got: list = []
    sent = [0]

    def publish(count: int) -> None:
        for _ in range(count):
            publisher.publish(batch(sent[instance], instance))
            sent[instance] += 1

    try:
        with Subscriber(live, replay, on_notice=notices.append, rcvhwm=20, idle_probe=0.2) as sub:
            for step in schedule:
                if step[0] == "publish":
                    publish(step[1])
                    got += sub.poll(0.01)
                elif step[0] == "stall":
                    publish(step[1])
                    time.sleep(0.05)
                elif step[0] == "restart":
                    publisher.shutdown()
                    instance += 1
                    sent.append(0)
                    publisher = vllm.ZmqEventPublisher(
                        0, live, replay, hwm=20, buffer_steps=step[1]
                    )
                else:
                    for _ in range(step[1]):
                        got += sub.poll(0.02)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                got += sub.poll(0.05)
                if sub.sources[0].expected == sent[instance] and sub.sources[0].request is None:
                    break
            final_expected = sub.sources[0].expected
            final_epoch = sub.sources[0].epoch
    finally:
        publisher.shutdown()
    epoch_owner: dict[int, int] = {}
    by_epoch: dict[int, list[int]] = {}
    for delivery in got:
        owner, seq = divmod(int(delivery.batch.ts), 1_000_000)
        assert seq == delivery.seq, "a seq delivered with another seq's batch"
        assert epoch_owner.setdefault(delivery.epoch, owner) == owner, "an epoch mixes instances"
        by_epoch.setdefault(delivery.epoch, []).append(seq)
    owners = [epoch_owner[e] for e in sorted(epoch_owner)]
    assert owners == sorted(set(owners))
    for seqs in by_epoch.values():
        assert seqs == sorted(set(seqs)), "deliveries out of order or twice"
    lost: dict[int, set[int]] = {}
    for notice in notices:
        if notice.kind == "history_lost":
            span = set(range(notice.detail["first"], notice.detail["last"] + 1))
            epoch_lost = lost.setdefault(notice.detail["epoch"], set())
            assert not span & epoch_lost, "lost ranges overlap"
            assert not span & set(by_epoch.get(notice.detail["epoch"], [])), (
                "a lost seq was delivered"
            )
            epoch_lost |= span
    resets = sum(n.kind == "reset" for n in notices)
    assert resets <= instance
    assert final_expected == sent[instance], (
        f"the last instance's stream ended at {final_expected} of {sent[instance]}"
    )
    if epoch_owner.get(final_epoch) == instance:
        covered = set(by_epoch[final_epoch]) | lost.get(final_epoch, set())
        assert covered >= set(range(sent[instance])), (
            "a seq of the last instance neither delivered nor lost"
        )


def test_a_restart_whose_replay_socket_is_silent_is_held_not_spliced(publishers) -> None:
    """The new instance's live socket is up but its replay socket answers nothing for longer
    than every retry (a restart in progress, or a loaded machine: CI saw it). The subscriber
    held live batches, gave up on info after its retries, released the hold, and spliced the
    new instance's batches past the old seq onto the old epoch. Now it holds on and asks
    again, counting each unanswered round; the new instance is delivered only as a new epoch."""
    live, replay = stable_tcp(), stable_tcp()
    first = vllm.ZmqEventPublisher(0, live, replay, bind=True)
    ctx = zmq.Context.instance()
    with Subscriber(live, replay, replay_timeout=0.2, replay_attempts=1, idle_probe=None) as sub:
        for n in range(50):
            first.publish(batch(n))
        got = collect(sub, lambda g: len(g) >= 50)
        assert [d.seq for d in got] == list(range(50))
        first.shutdown()
        silent = ctx.socket(zmq.ROUTER)  # binds the replay port and never answers
        silent.linger = 0
        # libzmq releases the old listener on its own thread: the port may be taken a moment.
        deadline = time.monotonic() + 5
        while True:
            try:
                silent.bind(replay)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        second = vllm.ZmqEventPublisher(0, live, None, bind=True)
        publishers.append(second)
        try:
            started = time.monotonic()
            sent = 0
            while time.monotonic() < started + 1.5:  # past the old seq, many retries long
                second.publish(batch(sent, instance=1))
                sent += 1
                got += sub.poll(0.001)
            got += collect(sub, lambda g: False, timeout=0.3)
            unanswered = sub.stats["info_unanswered"]
        finally:
            silent.close()
    assert sent > 100
    assert [(d.seq, d.epoch) for d in got] == [(n, 0) for n in range(50)], (
        "a batch delivered while the instance was unknown"
    )
    assert all(d.batch.ts < 1_000_000 for d in got)
    assert unanswered >= 2, "the silence was not counted round by round"
