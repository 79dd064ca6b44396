"""The drop-in publishers with real sockets: what vLLM's tests check, and kvevents' fixes."""

from __future__ import annotations

import importlib
import json
import threading
import time

import msgspec
import pytest
import zmq

import kvevents
from kvevents import EndpointError, frames
from kvevents_runtime import publisher as runtime_publisher
from tests.support import inproc_endpoint, make_sub, recv_live, replay, wait_connected, wait_until

DIALECTS = ("vllm", "sglang", "legacy")
LOOPBACK = "tcp://127.0.0.1:0"


def module(dialect: str):
    return importlib.import_module(f"kvevents.{dialect}")


def batch_for(dialect: str, n: int = 0):
    mod = module(dialect)
    extra = {"medium": None, "lora_name": None} if dialect == "vllm" else {}
    stored = mod.BlockStored(
        block_hashes=[n],
        parent_block_hash=None,
        token_ids=[1, 2],
        block_size=2,
        lora_id=None,
        **extra,
    )
    return mod.KVEventBatch(ts=float(n), events=[stored])


def start(publishers, dialect: str, **kwargs):
    kwargs.setdefault("endpoint", LOOPBACK)
    kwargs.setdefault("replay_endpoint", LOOPBACK)
    rank = kwargs.pop("rank", 0)
    publisher = module(dialect).ZmqEventPublisher(rank, **kwargs)
    publishers.append(publisher)
    return publisher


@pytest.mark.parametrize("dialect", DIALECTS)
def test_seqs_start_at_zero_and_replay_from_10_after_19_returns_10_to_18(
    dialect, publishers, sockets
):
    publisher = start(publishers, dialect, buffer_steps=100, topic="test")
    sub = make_sub(sockets, publisher.connect_endpoint, b"test")
    time.sleep(0.3)
    for n in range(19):
        publisher.publish(batch_for(dialect, n))
    live = recv_live(sub, 19)
    assert [seq for _, seq, _ in live] == list(range(19))
    items, end = replay(sockets, publisher.connect_replay_endpoint, 10)
    assert [i.seq for i in items] == list(range(10, 19))
    assert end is not None
    with_topic = dialect != "legacy"
    assert all((i.topic == b"test") if with_topic else (i.topic is None) for i in items)
    assert end == ([b"", b"", frames.END_SEQ, b""] if with_topic else [b"", frames.END_SEQ, b""])
    assert [bytes(i.payload) for i in items] == [bytes(p) for _, _, p in live[10:]]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_buffer_keeps_the_last_buffer_steps_batches(dialect, publishers, sockets):
    publisher = start(publishers, dialect, buffer_steps=100)
    for n in range(110):
        publisher.publish(batch_for(dialect, n))
    assert wait_until(lambda: publisher.counters()["published"] == 110)
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0)
    # A start older than the buffer begins at the oldest kept batch: the first seq says so.
    assert [i.seq for i in items] == list(range(10, 110)) and end is not None
    items, end = replay(sockets, publisher.connect_replay_endpoint, 500)
    assert items == [] and end is not None


def test_topic_filter(publishers, sockets):
    publisher = start(publishers, "vllm", topic="kv@pod-1@model")
    wanted = make_sub(sockets, publisher.connect_endpoint, b"kv@pod-1")
    other = make_sub(sockets, publisher.connect_endpoint, b"kv@pod-2")
    time.sleep(0.3)
    for n in range(5):
        publisher.publish(batch_for("vllm", n))
    assert len(recv_live(wanted, 5)) == 5
    assert not other.poll(200)


@pytest.mark.parametrize(
    ("dialect", "field"),
    [("vllm", "data_parallel_rank"), ("sglang", "attn_dp_rank"), ("legacy", "attn_dp_rank")],
)
def test_dp_rank_is_stamped_and_ports_are_offset(dialect, field, publishers, sockets):
    name = inproc_endpoint()
    publisher = start(publishers, dialect, endpoint=name, replay_endpoint=name + "-replay", rank=2)
    assert publisher.endpoint == f"{name}_dp2"
    sub = make_sub(sockets, publisher.endpoint)
    time.sleep(0.2)
    publisher.publish(batch_for(dialect))
    ((_, _, payload),) = recv_live(sub, 1)
    assert kvevents.decode(payload).dp_rank == 2
    assert msgspec.msgpack.decode(payload)[2] == 2
    assert getattr(batch_for(dialect), field) is None


def test_offset_rules():
    offset = module("vllm").ZmqEventPublisher.offset_endpoint_port
    assert offset("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert offset("tcp://*:0", 3) == "tcp://*:0"  # port 0 is left for the OS in every dialect
    assert offset("inproc://cache", 1) == "inproc://cache_dp1"
    assert (
        offset("ipc:///tmp/kv", 2) == "ipc:///tmp/kv_dp2"
    )  # upstream raises; each rank gets its own file
    assert offset(None, 2) is None
    with pytest.raises(ValueError):
        offset("udp://x:1", 1)


def test_bind_or_connect_rule():
    from kvevents_runtime.endpoints import should_bind

    assert should_bind("tcp://0.0.0.0:5557")  # vLLM connects here; it is a wildcard
    assert should_bind("tcp://*:5557") and should_bind("tcp://[::]:5557")
    assert not should_bind("tcp://[fe80::1]:5557")  # vLLM's "::" substring test would bind it
    assert not should_bind("tcp://10.0.0.5:5557")
    assert should_bind("tcp://127.0.0.1:0")  # nothing to connect to on port 0
    assert should_bind("ipc:///tmp/x") and should_bind("inproc://x")
    assert should_bind("tcp://10.0.0.5:5557", bind=True) and not should_bind(
        "tcp://*:5557", bind=False
    )


def test_port_zero_resolves_to_distinct_bound_endpoints(publishers):
    first = start(publishers, "vllm", endpoint="tcp://*:0", rank=0)
    second = start(publishers, "vllm", endpoint="tcp://*:0", rank=1)
    assert first.endpoint != second.endpoint and not first.endpoint.endswith(":0")
    assert first.get_publisher_config().endpoint == first.endpoint
    assert first.connect_endpoint.startswith("tcp://127.0.0.1:")


def test_ipc_transport_and_rank_suffix(publishers, sockets, ipc_endpoint):
    publisher = start(
        publishers, "sglang", endpoint=ipc_endpoint, replay_endpoint=ipc_endpoint + "-r", rank=1
    )
    assert publisher.endpoint.endswith("_dp1")
    sub = make_sub(sockets, publisher.endpoint)
    wait_connected(publisher, sub, lambda: batch_for("sglang"))
    publisher.publish(batch_for("sglang", 7))
    assert len(recv_live(sub, 1)) == 1
    assert publisher.describe_local_source(16)["endpoint"] == publisher.endpoint


def test_port_in_use_is_a_clear_error(publishers):
    first = start(publishers, "vllm")
    with pytest.raises(EndpointError, match="in use"):
        start(publishers, "vllm", endpoint=first.endpoint, bind=True)


def wrap_socket_send(monkeypatch, make_wrapper) -> None:
    """Wrap the send the publisher thread and its replay service take from the runtime (the
    unwrapped backend send of each socket) before the publisher starts."""
    original = runtime_publisher.unwrapped_send
    monkeypatch.setattr(
        runtime_publisher, "unwrapped_send", lambda sock: make_wrapper(original(sock))
    )


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest", "block"])
def test_a_full_queue_never_blocks_publish_and_every_drop_is_counted(
    policy, publishers, monkeypatch
):
    gate = threading.Event()

    def stalled(send):  # a stalled transport: the queue fills up behind it
        def slow_send(*args, **kwargs):
            gate.wait(5)
            return send(*args, **kwargs)

        return slow_send

    wrap_socket_send(monkeypatch, stalled)
    publisher = start(
        publishers, "vllm", max_queue_size=10, queue_full_policy=policy, block_timeout=0.001
    )
    worst = 0.0
    for n in range(2000):
        began = time.perf_counter()
        publisher.publish(batch_for("vllm", n))
        worst = max(worst, time.perf_counter() - began)
    gate.set()
    assert worst < 0.5
    assert wait_until(lambda: publisher.flushed_next_seq() is not None)
    counters = publisher.counters()
    dropped = (
        counters["dropped_queue_full"]
        + counters["dropped_oldest"]
        + counters["dropped_block_timeout"]
    )
    assert dropped > 0
    assert counters["next_seq"] + dropped == 2000
    assert publisher.shutdown() == 0


def test_flushed_next_seq_waits_for_a_batch_taken_off_the_queue_but_not_yet_sent(
    publishers, monkeypatch
):
    """Invariant: `flushed_next_seq()` is None until every batch published before the call has
    a seq. The queue alone cannot say so: the thread takes a batch off it before it sends it
    and counts its seq (the end-of-run check of `kvevents simulate` compared states with a
    batch still in the thread's hands when it trusted the queue depth)."""
    in_send = threading.Event()
    gate = threading.Event()

    def held(send):  # the thread stops inside its send, holding the batch it took
        def held_send(*args, **kwargs):
            in_send.set()
            gate.wait(10)
            return send(*args, **kwargs)

        return held_send

    wrap_socket_send(monkeypatch, held)
    publisher = start(publishers, "vllm")
    publisher.publish(batch_for("vllm", 0))
    try:
        assert in_send.wait(10)
        counters = publisher.counters()
        assert (counters["queue_depth"], counters["next_seq"]) == (0, 0)  # the trap
        assert publisher.flushed_next_seq() is None
    finally:
        gate.set()
    assert wait_until(lambda: publisher.flushed_next_seq() == 1)
    publisher.shutdown()
    assert publisher.flushed_next_seq() == 1


def test_an_encode_failure_spends_no_seq(publishers, sockets, caplog):
    publisher = start(publishers, "vllm")
    sub = make_sub(sockets, publisher.connect_endpoint)
    time.sleep(0.3)
    publisher.publish(batch_for("vllm", 0))
    bad = batch_for("vllm", 1)
    bad.events[0].block_hashes = [object()]  # msgspec cannot encode it
    publisher.publish(bad)
    publisher.publish(batch_for("vllm", 2))
    live = recv_live(sub, 2)
    assert [seq for _, seq, _ in live] == [0, 1]
    assert kvevents.decode(live[1][2]).ts == 2.0
    assert publisher.counters()["encode_failures"] == 1
    assert "not encoded" in caplog.text


def test_a_failed_send_stays_replayable(publishers, sockets, monkeypatch):
    calls = {"n": 0}

    def failing(send):
        def failing_send(data, flags=0, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # the first frame of the second batch
                raise zmq.ZMQError(zmq.EAGAIN)
            return send(data, flags, **kwargs)

        return failing_send

    wrap_socket_send(monkeypatch, failing)
    publisher = start(publishers, "vllm")
    for n in range(3):
        publisher.publish(batch_for("vllm", n))
    assert wait_until(lambda: publisher.counters()["next_seq"] == 3)
    assert publisher.counters()["send_failures"] == 1
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0)
    assert [i.seq for i in items] == [0, 1, 2] and end is not None


@pytest.mark.parametrize(
    "bad", [[b"a", b"b", b"c"], [b"\x00" * 9], [b""], [b"", b"\x00" * 9], [b"x" * 2000, b"y"]]
)
def test_malformed_replay_requests_are_counted_and_ignored(bad, publishers, sockets):
    publisher = start(publishers, "vllm")
    dealer = sockets(zmq.DEALER)
    dealer.connect(publisher.connect_replay_endpoint)
    dealer.send_multipart(bad)
    big = len(b"".join(bad)) > 1024  # over MAXMSGSIZE: libzmq drops the peer before we see it
    assert wait_until(lambda: big or publisher.counters()["replay_invalid"] == 1, 3)
    assert not dealer.poll(100)  # no reply, as upstream
    publisher.publish(batch_for("vllm"))
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0)
    assert [i.seq for i in items] == [0] and end is not None


def test_upstream_start_rule_two_bytes_and_empty(publishers, sockets):
    publisher = start(publishers, "vllm")
    for n in range(6):
        publisher.publish(batch_for("vllm", n))
    assert wait_until(lambda: publisher.counters()["published"] == 6)
    assert [i.seq for i in replay(sockets, publisher.connect_replay_endpoint, b"\x00\x04")[0]] == [
        4,
        5,
    ]
    assert [i.seq for i in replay(sockets, publisher.connect_replay_endpoint, b"")[0]] == list(
        range(6)
    )


def test_reply_shape_can_be_chosen(publishers, sockets):
    publisher = start(publishers, "vllm", replay_reply_topic=False)
    publisher.publish(batch_for("vllm"))
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0)
    assert items[0].topic is None and end == [b"", frames.END_SEQ, b""]


def test_a_long_replay_does_not_stall_live_publishing(publishers, sockets):
    publisher = start(publishers, "vllm", buffer_steps=20_000, hwm=0)
    payload_batch = batch_for("vllm")
    payload_batch.events[0].token_ids = list(range(500))
    for _ in range(20_000):
        publisher.publish(payload_batch)
    assert wait_until(lambda: publisher.counters()["published"] == 20_000, 20)
    sub = make_sub(sockets, publisher.connect_endpoint)
    wait_connected(publisher, sub, lambda: batch_for("vllm"))
    dealers = []
    for _ in range(4):  # four full replays in flight, nobody reading them yet
        dealer = sockets(zmq.DEALER)
        dealer.setsockopt(zmq.RCVHWM, 100)
        dealer.connect(publisher.connect_replay_endpoint)
        dealer.send_multipart(frames.pack_replay_request(0))
        dealers.append(dealer)
    time.sleep(0.2)
    began = time.monotonic()
    publisher.publish(batch_for("vllm", 99))
    assert recv_live(sub, 1, timeout=2.0)
    assert time.monotonic() - began < 0.5
    received = 0
    for dealer in dealers:  # every replay still completes, END included (sglang#38945)
        while dealer.poll(2000):
            if frames.parse_replay_reply(dealer.recv_multipart()).is_end:
                received += 1
                break
    assert received == 4


def test_replay_of_10k_batches_of_2kb_delivers_all_and_the_end(publishers, sockets):
    publisher = start(publishers, "sglang", buffer_steps=10_000)
    big = batch_for("sglang")
    big.events[0].token_ids = list(range(1000, 1000 + 680))  # about 2 KB
    for _ in range(10_000):
        publisher.publish(big)
    assert wait_until(lambda: publisher.counters()["published"] == 10_000, 20)
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0, timeout=30)
    assert len(items) == 10_000 and end is not None
    assert len(items[0].payload) >= 2000
    assert [i.seq for i in items] == list(range(10_000))


def test_shutdown_drains_is_idempotent_and_closes(publishers, sockets):
    publisher = start(publishers, "legacy")
    sub = make_sub(sockets, publisher.connect_endpoint)
    wait_connected(publisher, sub, lambda: batch_for("legacy"))
    before = publisher.counters()["published"]
    for n in range(1000):
        publisher.publish(batch_for("legacy", n))
    assert publisher.shutdown() == 0
    assert publisher.shutdown() == 0
    assert publisher.counters()["published"] == before + 1000
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(batch_for("legacy"))
    assert publisher.closed


def test_context_manager(sockets):
    with module("vllm").ZmqEventPublisher(0, endpoint=LOOPBACK) as publisher:
        publisher.publish(batch_for("vllm"))
    assert publisher.closed and publisher.shutdown() == 0


def test_canonical_batches_are_accepted(publishers, sockets):
    publisher = start(publishers, "sglang", rank=0)
    publisher.publish(
        kvevents.KVEventBatch(
            ts=1.0, events=[kvevents.BlockRemoved(block_hashes=[5], medium="GPU")]
        )
    )
    items, _ = replay(sockets, publisher.connect_replay_endpoint, 0)
    assert msgspec.msgpack.decode(items[0].payload) == [
        1.0,
        [{"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU"}],
        0,
    ]


def test_vllm_factory_takes_a_config_object(publishers):
    mod = module("vllm")
    assert isinstance(mod.EventPublisherFactory.create(None), mod.NullEventPublisher)
    assert isinstance(
        mod.EventPublisherFactory.create(mod.KVEventsConfig()), mod.NullEventPublisher
    )
    config = mod.KVEventsConfig(enable_kv_cache_events=True, endpoint=LOOPBACK, buffer_steps=7)
    assert config.publisher == "zmq"
    publisher = mod.EventPublisherFactory.create(config, data_parallel_rank=0)
    publishers.append(publisher)
    assert isinstance(publisher, mod.ZmqEventPublisher) and publisher.buffer_steps == 7
    with pytest.raises(ValueError, match="Input should be 'null' or 'zmq'"):
        mod.KVEventsConfig(enable_kv_cache_events=True, publisher="kafka")
    for not_a_config in ('{"enable_kv_cache_events": true}', {"enable_kv_cache_events": True}):
        with pytest.raises(TypeError, match="takes a KVEventsConfig"):
            mod.EventPublisherFactory.create(not_a_config)
    with pytest.raises(KeyError):
        mod.EventPublisherFactory.register_publisher("zmq", mod.ZmqEventPublisher)


@pytest.mark.parametrize("dialect", ["sglang", "legacy"])
def test_sglang_factories_take_the_cli_json(dialect, publishers):
    mod = module(dialect)
    assert isinstance(mod.EventPublisherFactory.create(""), mod.NullEventPublisher)
    options = {"publisher": "zmq", "endpoint": LOOPBACK, "topic": "kv"}
    if dialect == "sglang":
        options.update(format="dynamo", bind=True)
    publisher = mod.EventPublisherFactory.create(json.dumps(options), attn_dp_rank=0)
    publishers.append(publisher)
    assert isinstance(publisher, mod.ZmqEventPublisher) and publisher.topic == "kv"


def test_the_null_publisher_accepts_anything():
    null = module("vllm").NullEventPublisher()
    null.publish(batch_for("vllm"))
    null.shutdown()


def test_a_hostile_client_flooding_the_replay_socket_costs_nothing(publishers, sockets):
    publisher = start(publishers, "vllm", buffer_steps=1000, hwm=0, max_queue_size=200_000)
    sub = make_sub(sockets, publisher.connect_endpoint, hwm=0)
    wait_connected(publisher, sub, lambda: batch_for("vllm"))
    base = publisher.counters()["next_seq"]
    stop = threading.Event()

    def flood():
        ctx = zmq.Context.instance()
        hostile = ctx.socket(zmq.DEALER)
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.setsockopt(zmq.SNDHWM, 1000)
        hostile.connect(publisher.connect_replay_endpoint)
        garbage = [[b"junk"], [b"", b"\xff" * 12], [b"a", b"b", b"c"], [b"", b""]]
        n = 0
        try:
            while not stop.is_set():
                try:
                    hostile.send_multipart(garbage[n % 4], zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.0005)
                n += 1
        finally:
            hostile.close(linger=0)

    flooder = threading.Thread(target=flood)
    flooder.start()
    total = 100_000
    seen = []
    try:
        for n in range(total):
            publisher.publish(batch_for("vllm", n))
            if n % 512 == 0:
                while sub.poll(0):
                    seen.append(frames.parse_seq(sub.recv_multipart()[1]))
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            if sub.poll(100):
                seen.append(frames.parse_seq(sub.recv_multipart()[1]))
    finally:
        stop.set()
        flooder.join(5)
    assert seen == list(range(base, base + total))
    counters = publisher.counters()
    assert counters["replay_invalid"] > 0
    assert counters["dropped_queue_full"] == 0


def big_batch(n: int):
    """About 2 KB of payload."""
    big = batch_for("sglang", n)
    big.events[0].token_ids = list(range(1000, 1000 + 680))
    return big


def test_a_replay_ends_at_its_byte_budget_and_a_subscriber_asks_again_for_the_rest(
    publishers, sockets, monkeypatch
):
    """A replay used to be bounded by entry count only: a peer asking for the whole ring was
    sent all of it unread. Now one request gets at most MAX_SESSION_BYTES (and at least one
    entry) before its END; an honest subscriber reads it and asks again from there."""
    from kvevents_runtime.replay import ReplayService

    monkeypatch.setattr(ReplayService, "MAX_SESSION_BYTES", 20_000)
    publisher = start(publishers, "sglang", buffer_steps=1000)
    for n in range(100):
        publisher.publish(big_batch(n))
    assert wait_until(lambda: publisher.counters()["published"] == 100, 10)
    items, end = replay(sockets, publisher.connect_replay_endpoint, 0, timeout=10)
    assert end is not None, "no END"
    assert 5 <= len(items) <= 12, len(items)  # about 20 KB of 2 KB batches, then END
    assert [i.seq for i in items] == list(range(len(items)))
    with kvevents.Subscriber(
        publisher.connect_endpoint, publisher.connect_replay_endpoint, join="start"
    ) as sub:
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 100 and time.monotonic() < deadline:
            got.extend(sub.poll(0.2))
        stats = dict(sub.stats)
    assert [d.seq for d in got] == list(range(100)), stats
    assert stats["history_lost"] == 0 and stats["replays_requested"] >= 8, stats


def test_replays_share_a_global_byte_budget_and_a_peer_that_never_reads_is_dropped(
    publishers, sockets, monkeypatch
):
    """Peers that ask for replays and never read once pinned the whole ring each. Open replays
    together now send at most MAX_REPLAY_BYTES: a further request is told busy (and
    retries); a session without progress for STALL_SECONDS is dropped, which frees its share."""
    from kvevents_runtime.replay import ReplayService

    monkeypatch.setattr(ReplayService, "MAX_REPLAY_BYTES", 40_000)
    monkeypatch.setattr(ReplayService, "STALL_SECONDS", 1.0)
    context = zmq.Context()
    context.setsockopt(zmq.SNDBUF, 4096)
    publisher = start(publishers, "sglang", buffer_steps=2000, context=context)
    for n in range(2000):
        publisher.publish(big_batch(n))
    assert wait_until(lambda: publisher.counters()["published"] == 2000, 20)
    wire = kvevents.Subscriber.wire
    hog = context.socket(zmq.DEALER)
    hog.setsockopt(zmq.RCVHWM, 1)
    hog.setsockopt(zmq.RCVBUF, 4096)
    honest = context.socket(zmq.DEALER)
    try:
        hog.connect(publisher.connect_replay_endpoint)
        hog.send_multipart(wire.pack_replay_request(0))
        assert wait_until(lambda: publisher.counters()["replay_bytes_in_flight"] >= 40_000, 10), (
            publisher.counters()
        )
        honest.connect(publisher.connect_replay_endpoint)
        honest.send_multipart(wire.pack_replay_request_with_info(0))
        assert honest.poll(5000), "no answer"
        answer = wire.parse_replay_reply(honest.recv_multipart())
        assert answer.is_info and wire.decode_info(answer.payload).busy, answer
        assert wait_until(lambda: publisher.counters()["sessions_stalled"] == 1, 10)
        assert publisher.counters()["replay_bytes_in_flight"] == 0, publisher.counters()
        items, end = replay(sockets, publisher.connect_replay_endpoint, 1990, timeout=10)
        assert end is not None and [i.seq for i in items] == list(range(1990, 2000))
    finally:
        hog.close(linger=0)
        honest.close(linger=0)
        publisher.shutdown()
        context.destroy(linger=100)
