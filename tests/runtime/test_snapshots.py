"""State snapshots: the publisher's live block set, served and applied.

Invariants checked:
- the block set equals a reference model of what was published (stores minus removals per
  tier, emptied by AllBlocksCleared), tokens and extra keys included;
- a snapshot rebuilt from it, applied to an empty state, gives that same state, for every
  dialect's event shape (vLLM's tiers and extra keys, SGLang's token pairs);
- over real sockets, a consumer that loses history (a replay buffer too small, a slow
  consumer whose live socket overflows, a late join) ends with exactly the publisher's state.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvevents import Subscriber, sglang, vllm
from kvevents.sglang.snapshot import SHAPE as SGLANG_SHAPE
from kvevents.vllm.snapshot import SHAPE as VLLM_SHAPE
from kvevents_runtime.blockset import MAX_BLOCKS_PER_BATCH, BlockSet
from tests.support import wait_until

LOOPBACK = "tcp://127.0.0.1:0"
BLOCK = 4

Reference = dict[Any, dict[int, tuple[Any, tuple[Any, ...], Any]]]
"""tier (medium) -> block hash -> (parent, tokens, extra key), in store order."""


def apply_reference(state: Reference, event: Any) -> None:
    kind = type(event).__name__
    if kind == "AllBlocksCleared":
        state.clear()
        return
    tier = state.setdefault(getattr(event, "medium", None), {})
    if kind == "BlockRemoved":
        for h in event.block_hashes:
            tier.pop(h, None)
        return
    parent = event.parent_block_hash
    extra = getattr(event, "extra_keys", None)
    for i, h in enumerate(event.block_hashes):
        tokens = tuple(event.token_ids[i * BLOCK : (i + 1) * BLOCK])
        tier.pop(h, None)
        tier[h] = (parent, tokens, None if extra is None else extra[i])
        parent = h


def live_state(state: Reference) -> Reference:
    return {tier: blocks for tier, blocks in state.items() if blocks}


def operations(pairs: bool):
    token = st.tuples(st.integers(0, 9), st.integers(0, 9)) if pairs else st.integers(0, 2**32 - 1)
    store = st.tuples(
        st.just("store"),
        st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True),
        st.booleans(),  # chained to the previous store's last block
        st.sampled_from(["GPU", "CPU"]),
        st.lists(token, min_size=6 * BLOCK, max_size=6 * BLOCK),
        st.sampled_from([None, 1]),
    )
    remove = st.tuples(
        st.just("remove"), st.lists(st.integers(0, 40), max_size=6), st.sampled_from(["GPU", "CPU"])
    )
    return st.lists(st.one_of(store, store, remove, st.tuples(st.just("clear"))), max_size=40)


def build_events(ops: list[tuple], structs: Any, with_extra: bool) -> list[Any]:
    events: list[Any] = []
    last = None
    for op in ops:
        if op[0] == "store":
            hashes, chained, medium, tokens, lora = op[1:]
            extra = {
                "extra_keys": [("k", h) if h % 2 else None for h in hashes],
                "lora_name": None,
            }
            events.append(
                structs.BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=last if chained else None,
                    token_ids=tokens[: len(hashes) * BLOCK],
                    block_size=BLOCK,
                    lora_id=lora,
                    medium=medium,
                    **(extra if with_extra else {}),
                )
            )
            last = hashes[-1]
        elif op[0] == "remove":
            events.append(structs.BlockRemoved(block_hashes=op[1], medium=op[2]))
        else:
            events.append(structs.AllBlocksCleared())
    return events


def as_reference(blocks: BlockSet) -> Reference:
    out: Reference = {}
    for events in blocks.freeze():
        for event in events:
            apply_reference(out, event)
    return out


def check_rebuild(structs: Any, shape: Any, ops: list[tuple], with_extra: bool) -> None:
    events = build_events(ops, structs, with_extra=with_extra)
    blocks = BlockSet(shape)
    truth: Reference = {}
    for event in events:
        blocks.apply(structs.KVEventBatch(ts=0.0, events=[event]))
        apply_reference(truth, event)
    assert blocks.untracked == 0
    assert len(blocks) == sum(len(t) for t in truth.values())
    assert live_state(as_reference(blocks)) == live_state(truth)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations(pairs=False))
def test_a_vllm_snapshot_rebuilds_the_published_state(ops: list[tuple]) -> None:
    check_rebuild(vllm, VLLM_SHAPE, ops, with_extra=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations(pairs=True))
def test_an_sglang_snapshot_with_token_pairs_rebuilds_the_published_state(ops: list[tuple]) -> None:
    check_rebuild(sglang, SGLANG_SHAPE, ops, with_extra=False)


def test_snapshot_batches_are_bounded_and_unknown_events_are_counted() -> None:
    blocks = BlockSet(VLLM_SHAPE)
    hashes = list(range(3 * MAX_BLOCKS_PER_BATCH + 5))
    stored = vllm.BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=[1] * (len(hashes) * BLOCK),
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    blocks.apply(vllm.KVEventBatch(ts=0.0, events=[stored, "not an event"]))
    assert blocks.untracked == 1
    sizes = [sum(len(e.block_hashes) for e in part) for part in blocks.freeze()]
    assert sizes == [MAX_BLOCKS_PER_BATCH] * 3 + [5]


# -- over real sockets ------------------------------------------------------------------


def random_batches(count: int, seed: int) -> list[vllm.KVEventBatch]:
    import random

    rng = random.Random(seed)
    out = []
    for n in range(count):
        events: list[Any] = []
        base = rng.randrange(0, 400)
        hashes = [base * 8 + i for i in range(rng.randint(1, 4))]
        events.append(
            vllm.BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=[rng.randrange(50_000) for _ in range(len(hashes) * BLOCK)],
                block_size=BLOCK,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        )
        if rng.random() < 0.4:
            events.append(
                vllm.BlockRemoved(
                    block_hashes=[rng.randrange(0, 400) * 8 + i for i in range(2)], medium="GPU"
                )
            )
        if n == count // 3:
            events.append(vllm.AllBlocksCleared())
        out.append(vllm.KVEventBatch(ts=float(n), events=events))
    return out


class Consumer:
    """What a router keeps: the blocks per source, rebuilt from deliveries and snapshots."""

    def __init__(self) -> None:
        self.state: Reference = {}
        self.snapshots = 0

    def take(self, delivery: Any) -> None:
        if delivery.snapshot:
            self.state = {}
            self.snapshots += 1
        for event in delivery.batch.events:
            apply_reference(self.state, event)


def truth_of(batches: list[vllm.KVEventBatch]) -> Reference:
    truth: Reference = {}
    for b in batches:
        for event in b.events:
            apply_reference(truth, event)
    return live_state(truth)


def drive(sub: Subscriber, consumer: Consumer, until: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        for delivery in sub.poll(0.05):
            consumer.take(delivery)


@pytest.mark.parametrize("join", ["start", "first_seen"])
def test_a_late_subscriber_heals_from_a_snapshot(publishers, join: str) -> None:
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True)
    publishers.append(pub)
    batches = random_batches(300, seed=1)
    for b in batches:
        pub.publish(b)
    assert wait_until(lambda: pub.counters()["next_seq"] >= len(batches), 10)
    consumer = Consumer()
    with Subscriber(pub.connect_endpoint, pub.connect_replay_endpoint, join=join) as sub:  # type: ignore[arg-type]
        if join == "first_seen":
            tail = random_batches(5, seed=2)
            batches += tail

            drive(sub, consumer, lambda: False, timeout=0.3)
            for b in tail:
                pub.publish(b)
        drive(sub, consumer, lambda: live_state(consumer.state) == truth_of(batches))
        stats = dict(sub.stats)
    assert live_state(consumer.state) == truth_of(batches), stats
    if join == "start":
        assert stats["history_lost"] > 0 and stats["snapshots"] == 1, stats


def test_a_slow_consumer_that_overflows_heals(publishers) -> None:
    """Both high-water marks are tiny and the consumer does not read while 2,000 batches go
    out: the PUB drops most of them, the replay buffer reaches back 16, and only the snapshot
    brings the consumer's state back to the publisher's."""
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=16, hwm=8, snapshots=True)
    publishers.append(pub)
    consumer = Consumer()
    batches = random_batches(2000, seed=3)
    with Subscriber(
        pub.connect_endpoint,
        pub.connect_replay_endpoint,  # type: ignore[arg-type]
        rcvhwm=8,
        idle_probe=0.2,
    ) as sub:
        drive(sub, consumer, lambda: False, timeout=0.5)  # joined and connected
        for b in batches:
            pub.publish(b)
        time.sleep(0.5)
        drive(sub, consumer, lambda: live_state(consumer.state) == truth_of(batches))
        stats = dict(sub.stats)
    assert live_state(consumer.state) == truth_of(batches), stats
    assert stats["history_lost"] > 0 and consumer.snapshots >= 1, stats


def test_without_snapshots_the_loss_is_only_reported(publishers) -> None:
    """The same late join against a publisher without snapshots: history_lost, and no
    snapshot is asked for (the info reply says the publisher has none)."""
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8)
    publishers.append(pub)
    batches = random_batches(100, seed=4)
    for b in batches:
        pub.publish(b)
    assert wait_until(lambda: pub.counters()["next_seq"] >= len(batches), 10)
    consumer = Consumer()
    with Subscriber(pub.connect_endpoint, pub.connect_replay_endpoint) as sub:  # type: ignore[arg-type]
        drive(sub, consumer, lambda: sub.stats["delivered"] >= 8, timeout=10)
        stats = dict(sub.stats)
    assert stats["history_lost"] == 92 and stats["snapshots_requested"] == 0, stats
    assert live_state(consumer.state) != truth_of(batches)


def big_state(publisher: Any, batches: int = 60) -> list[vllm.KVEventBatch]:
    """`batches` x 1,000 blocks: a snapshot of many publisher rounds."""
    out = []
    for n in range(batches):
        hashes = list(range(n * 1000, (n + 1) * 1000))
        stored = vllm.BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=[h % 50_000 for h in hashes for _ in range(BLOCK)],
            block_size=BLOCK,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        out.append(vllm.KVEventBatch(ts=float(n), events=[stored]))
    for b in out:
        publisher.publish(b)
    assert wait_until(lambda: publisher.counters()["next_seq"] >= len(out), 20)
    return out


def test_a_snapshot_larger_than_one_publisher_round_heals_under_live_traffic(publishers) -> None:
    """The livelock: with more live blocks than one publisher round sends, live batches arrive
    while the snapshot streams. They used to be delivered past its cut, so every snapshot was
    thrown away as out of date and asked for again (108 requests in 12 s, none applied). Now
    they are held until it ends: one request, applied, and the state equals the publisher's."""
    import threading

    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True)
    publishers.append(pub)
    batches = big_state(pub, 60)  # 60,000 live blocks: several publisher rounds
    stop = threading.Event()
    trickle = random_batches(400, seed=5)
    sent: list[vllm.KVEventBatch] = []

    def keep_publishing() -> None:
        for b in trickle:  # 50 batches/s while the subscriber joins and heals
            if stop.wait(0.02):
                return
            pub.publish(b)
            sent.append(b)

    feeder = threading.Thread(target=keep_publishing)
    consumer = Consumer()
    with Subscriber(pub.connect_endpoint, pub.connect_replay_endpoint) as sub:  # type: ignore[arg-type]
        feeder.start()
        try:
            drive(sub, consumer, lambda: consumer.snapshots >= 1, timeout=30)
        finally:
            stop.set()
            feeder.join(10)
        everything = batches + sent
        drive(sub, consumer, lambda: live_state(consumer.state) == truth_of(everything), 20)
        stats = dict(sub.stats)
    assert consumer.snapshots == 1 and stats["snapshots_requested"] == 1, stats
    assert live_state(consumer.state) == truth_of(everything), stats


def test_peers_asking_at_the_same_seq_share_one_copy_of_the_block_set(
    publishers, monkeypatch
) -> None:
    """300 peers each asking once used to hold 256 frozen copies (+1.77 GB). A peer that
    never reads keeps the cut open here (its pipe is far smaller than the snapshot), so every
    later request at the same seq meets it."""
    import zmq

    from kvevents_runtime.replay import ReplayService

    monkeypatch.setattr(ReplayService, "PEER_QUEUE_MESSAGES", 8)
    # Small kernel buffers too: loopback's own take megabytes, the whole snapshot.
    pub_context = zmq.Context()
    pub_context.setsockopt(zmq.SNDBUF, 16_384)
    pub = vllm.ZmqEventPublisher(
        0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True, context=pub_context
    )
    publishers.append(pub)
    big_state(pub, 40)
    context = zmq.Context()
    request = Subscriber.wire.pack_snapshot_request(0)
    parse = Subscriber.wire.parse_replay_reply
    peers = []
    try:
        for number in range(13):
            peer = context.socket(zmq.DEALER)
            if number == 0:
                peer.setsockopt(zmq.RCVHWM, 1)
                peer.setsockopt(zmq.RCVBUF, 4096)
            peer.connect(pub.connect_replay_endpoint)  # type: ignore[arg-type]
            peer.send_multipart(request)
            peers.append(peer)
            if number == 0:
                assert wait_until(lambda: pub.counters()["snapshot_requests"] == 1, 10)
        parts = []
        for peer in peers[1:]:
            count = 0
            while True:
                assert peer.poll(10_000), "a snapshot stopped before its END"
                item = parse(peer.recv_multipart())
                if item.is_end:
                    break
                count += 0 if item.is_info else 1
            parts.append(count)
        counters = pub.counters()
    finally:
        for peer in peers:
            peer.close(linger=0)
        context.term()
        pub.shutdown()
        pub_context.destroy(linger=100)  # not 0: kvevents_runtime.closing says why
    assert counters["snapshot_requests"] == 13 and counters["snapshot_cuts"] == 1, counters
    assert len(set(parts)) == 1 and parts[0] >= 40, parts


def test_a_peer_that_asks_for_a_snapshot_and_never_reads_holds_up_no_replay(publishers) -> None:
    """It used to stop every other replay: snapshots were served first, and its session never
    ended (a 10-seq replay got no END in 10 s)."""
    import zmq

    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True)
    publishers.append(pub)
    batches = big_state(pub, 150)  # a snapshot of ~5 MB: more than the hog's pipe and buffers
    context = zmq.Context()
    hog = context.socket(zmq.DEALER)
    hog.setsockopt(zmq.RCVHWM, 1)
    hog.setsockopt(zmq.RCVBUF, 4096)
    hog.connect(pub.connect_replay_endpoint)  # type: ignore[arg-type]
    try:
        hog.send_multipart(Subscriber.wire.pack_snapshot_request(0))
        assert wait_until(lambda: pub.counters()["snapshot_requests"] == 1, 10)
        time.sleep(0.5)  # its session is now stuck on a full pipe
        consumer = Consumer()
        with Subscriber(pub.connect_endpoint, pub.connect_replay_endpoint) as sub:  # type: ignore[arg-type]
            # The joiner's replay (the last 8 batches) and then its own snapshot are served
            # beside the hog's stuck session: healed well within one replay timeout (2 s x 3).
            drive(sub, consumer, lambda: live_state(consumer.state) == truth_of(batches), 5)
            stats = dict(sub.stats)
        assert live_state(consumer.state) == truth_of(batches), stats
        assert stats["replay_retries"] == 0 and stats["snapshots"] == 1, stats
    finally:
        hog.close(linger=0)
        context.term()


def test_copies_of_the_block_set_are_bounded_and_stalled_peers_give_theirs_back(
    publishers, monkeypatch
) -> None:
    """Peers asking at different seqs need different copies: at most MAX_CUTS are held, a
    further peer is told busy (and retries), and a peer that never reads is dropped after
    STALL_SECONDS, which frees its copy."""
    import zmq

    from kvevents_runtime.replay import ReplayService

    monkeypatch.setattr(ReplayService, "STALL_SECONDS", 1.0)
    # Pipes far smaller than the snapshot's ~150 batches, so a peer that never reads stalls
    # its session instead of taking the whole snapshot into its pipe.
    monkeypatch.setattr(ReplayService, "PEER_QUEUE_MESSAGES", 8)
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True)
    publishers.append(pub)
    batches = big_state(pub, 150)
    context = zmq.Context()
    wire = Subscriber.wire
    peers = []

    def peer(hog: bool) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        if hog:
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(pub.connect_replay_endpoint)  # type: ignore[arg-type]
        sock.send_multipart(wire.pack_snapshot_request(0))
        peers.append(sock)
        return sock

    def read_until_end(sock: zmq.Socket) -> list[Any]:
        items = []
        while True:
            assert sock.poll(10_000), "no END"
            item = wire.parse_replay_reply(sock.recv_multipart())
            items.append(item)
            if item.is_end or (item.is_info and wire.decode_info(item.payload).busy):
                return items

    try:
        for number in range(2):  # two stuck peers, each at its own seq: two copies
            peer(hog=True)
            assert wait_until(lambda n=number: pub.counters()["snapshot_requests"] == n + 1, 10)
            pub.publish(batches[0])
            assert wait_until(lambda n=number: pub.counters()["next_seq"] == 151 + n, 10)
        refused = read_until_end(peer(hog=False))
        assert wire.decode_info(refused[0].payload).busy, "a third copy was made"
        counters = pub.counters()
        assert counters["snapshot_cuts"] == 2 and counters["replay_rejected_busy"] == 1, counters
        assert wait_until(lambda: pub.counters()["sessions_stalled"] == 2, 10), pub.counters()
        served = read_until_end(peer(hog=False))
        assert served[-1].is_end and len(served) > 100, len(served)
    finally:
        for sock in peers:
            sock.close(linger=0)
        context.term()


def test_a_snapshot_over_the_byte_bound_is_abandoned_and_live_batches_go_on(publishers) -> None:
    """A publisher's snapshot used to be bounded by part count only (a never-ending one grew
    the subscriber by 7.7 MB/s; 3M blocks were decoded in one poll)."""
    pub = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, buffer_steps=8, snapshots=True)
    publishers.append(pub)
    big_state(pub, 150)
    notices: list = []
    with Subscriber(
        pub.connect_endpoint,
        pub.connect_replay_endpoint,  # type: ignore[arg-type]
        max_snapshot_bytes=200_000,
        on_notice=notices.append,
    ) as sub:
        consumer = Consumer()
        drive(sub, consumer, lambda: sub.stats["snapshots_abandoned"] >= 1, 10)
        tail = random_batches(5, seed=9)
        for b in tail:
            pub.publish(b)
        drive(sub, consumer, lambda: sub.stats["delivered"] >= 5, 10)
        stats = dict(sub.stats)
    assert stats["snapshots_abandoned"] >= 1 and stats["snapshots"] == 0, stats
    assert stats["delivered"] >= 5, stats
    abandoned = [n for n in notices if n.kind == "snapshot_abandoned"]
    assert "larger than 200000 bytes" in abandoned[0].detail["reason"], abandoned
