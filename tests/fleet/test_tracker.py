"""The replica's state machine against a reference model, over randomized streams.

The model: one worker's engine goes through epochs; each seq's batch is a distinct id. The
bridge's stream (as the tracker sees it) interleaves batches with faults: batches published
twice (late duplicates), batches never published (with or without a `lost` marker), restarts
with or without their `reset` marker, snapshots (whole or not) announced by markers, and a
replica that bootstraps at any point from the snapshot object of that moment. Applying the
tracker's answers to a plain list must keep the invariant it states: a worker not stale holds
exactly its epoch's batches 0..expected-1, in order, each once. Where a replica starts reading
among many workers' messages is checked on its own (`start_sequence`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvevents_runtime.fleet import protocol
from kvevents_runtime.fleet.protocol import SnapshotRecord
from kvevents_runtime.fleet.tracker import (
    Apply,
    Clear,
    Fetch,
    MarkStale,
    Resync,
    Tracker,
    start_sequence,
)

WORKER = (1, 0)
OPS = st.lists(
    st.sampled_from(
        [
            "next",
            "next",
            "next",
            "dup",
            "skip",
            "skip_lost",
            "restart",
            "restart_silent",
            "snap",
            "snap_periodic",
            "snap_partial",
            "garbage",
        ]
    ),
    max_size=60,
)


def ident(epoch: str, seq: int) -> bytes:
    return f"{epoch}:{seq}".encode()


class World:
    """The engine, the stream and the snapshot object, built from a list of operations."""

    def __init__(self, ops: list[str]) -> None:
        self.epoch_number = 0
        self.epoch = "e0"
        self.next_seq = 0
        self.stream: list[tuple[dict[str, str], bytes]] = []
        self.objects: list[tuple[int, SnapshotRecord]] = []
        """(stream length when written, the record), in the order written."""
        self.stream.append((protocol.reset_headers(*WORKER, self.epoch), b""))
        for op in ops:
            self.apply(op)

    def batch(self, seq: int) -> tuple[dict[str, str], bytes]:
        return protocol.batch_headers(*WORKER, self.epoch, seq, "vllm"), ident(self.epoch, seq)

    def apply(self, op: str) -> None:
        if op == "next":
            self.stream.append(self.batch(self.next_seq))
            self.next_seq += 1
        elif op == "dup" and self.next_seq:
            self.stream.append(self.batch(self.next_seq // 2))
        elif op in ("skip", "skip_lost"):
            if op == "skip_lost":
                headers = protocol.lost_headers(
                    *WORKER, self.epoch, self.next_seq, self.next_seq, "test"
                )
                self.stream.append((headers, b""))
            self.next_seq += 1
        elif op in ("restart", "restart_silent"):
            self.epoch_number += 1
            self.epoch, self.next_seq = f"e{self.epoch_number}", 0
            if op == "restart":
                self.stream.append((protocol.reset_headers(*WORKER, self.epoch), b""))
        elif op.startswith("snap"):
            whole = op != "snap_partial"
            seq = self.next_seq - 1
            payloads = [ident(self.epoch, s) for s in range(seq + 1)]
            if not whole:
                payloads = payloads[::2]
            record = SnapshotRecord(
                model="m",
                worker_id=1,
                dp_rank=0,
                dialect="vllm",
                epoch=self.epoch,
                seq=seq,
                covers=len(self.stream),
                whole=whole,
                reason=None if whole else "partial",
                payloads=payloads,
            )
            self.objects.append((len(self.stream), record))
            why = protocol.PERIODIC if op == "snap_periodic" else protocol.RESYNC
            self.stream.append((protocol.snapshot_headers(*WORKER, self.epoch, seq, why, "n"), b""))
        elif op == "garbage":
            self.stream.append(({protocol.KIND: "batch"}, b"?"))  # no epoch, no seq

    def object_at(self, length: int) -> SnapshotRecord | None:
        written = [record for at, record in self.objects if at <= length]
        return written[-1] if written else None


class Replica:
    """The tracker's answers applied to a list, as the index applies them to a backend."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.tracker = Tracker()
        self.state: list[bytes] = []
        self.stale = False
        self.newest_epoch = -1

    def run(self, actions: list, read_up_to: int) -> None:
        for action in actions:
            if isinstance(action, Apply):
                self.state.append(action.payload)
            elif isinstance(action, Resync):
                self.state, self.stale = list(action.payloads), False
            elif isinstance(action, Clear):
                self.state = []
            elif isinstance(action, MarkStale):
                self.stale = True
            elif isinstance(action, Fetch):
                # The object read is the newest written by then (the replica may lag).
                record = self.world.object_at(len(self.world.stream))
                if record is None:
                    self.stale = True
                else:
                    self.run(self.tracker.snapshot(WORKER, record), read_up_to)

    def read(self, start: int) -> None:
        for position in range(start, len(self.world.stream)):
            headers, payload = self.world.stream[position]
            self.run(self.tracker.message(position + 1, WORKER, headers, payload), position + 1)
            self.check()

    def check(self) -> None:
        track = self.tracker.tracks[WORKER]
        if track.epoch is not None:
            # Never back to an older epoch (a message older than a loaded snapshot is skipped).
            number = int(track.epoch[1:])
            assert number >= self.newest_epoch, (track, self.newest_epoch)
            self.newest_epoch = number
        if not self.stale:
            expected = [ident(track.epoch, s) for s in range(track.expected)] if track.epoch else []
            assert self.state == expected, (self.state, track)


def _replay(ops: list[str], join: int, earlier: float, aged_out: bool = True) -> Replica:
    """A replica that joins when the stream is `join` messages long: it loads the snapshot
    object of that moment and reads from a point at or before what it covers (with several
    workers, the lowest cover of all of them), then to the end. With no snapshot it reads
    from the first message the stream still holds: `join` when older ones aged out."""
    world = World(ops)
    join = min(join, len(world.stream))
    replica = Replica(world)
    record = world.object_at(join)
    start = 0
    if join and record is not None:
        replica.run(replica.tracker.snapshot(WORKER, record), join)
        start = int(record.covers * earlier)
        replica.check()
    elif join and aged_out:
        start = join
    replica.read(start)
    return replica


@settings(max_examples=3000, deadline=None)
@given(ops=OPS, join=st.integers(0, 80), earlier=st.floats(0, 1))
def test_a_worker_not_stale_holds_exactly_its_epochs_batches(
    ops: list[str], join: int, earlier: float
) -> None:
    _replay(ops, join, earlier)


CLEAN = st.lists(
    st.sampled_from(["next", "next", "dup", "restart", "snap", "snap_periodic"]), max_size=40
)


@settings(max_examples=2000, deadline=None)
@given(ops=CLEAN, join=st.integers(0, 60), earlier=st.floats(0, 1))
def test_without_faults_every_replica_ends_whole_at_the_engines_state(
    ops: list[str], join: int, earlier: float
) -> None:
    """A stream that lost nothing leaves no replica stale, wherever it joined."""
    replica = _replay(ops, join, earlier, aged_out=False)
    world = replica.world
    track = replica.tracker.tracks[WORKER]
    assert not replica.stale, track
    assert (track.epoch, track.expected) == (world.epoch, world.next_seq)


def test_a_gap_marks_stale_and_a_whole_snapshot_heals() -> None:
    world = World(["next", "skip", "next"])
    replica = Replica(world)
    replica.read(0)
    assert replica.stale
    world.apply("snap")
    replica.read(len(world.stream) - 1)
    assert not replica.stale and replica.state == [ident("e0", s) for s in range(3)]


@given(
    stream=st.lists(st.integers(0, 4), max_size=60),
    snapshots=st.dictionaries(st.integers(0, 5), st.floats(0, 1)),
)
def test_a_replica_starts_where_no_message_a_snapshot_misses_is_skipped(
    stream: list[int], snapshots: dict[int, float]
) -> None:
    """`stream`: the worker of each message (stream sequences from 1). `snapshots`: the
    workers whose snapshot the replica loaded, each covering the stream up to a point (a
    worker may have a snapshot and no messages left). Every message a loaded snapshot does
    not cover is at or after the start."""
    covers = {(w, 0): int(f * len(stream)) for w, f in snapshots.items()}
    in_stream = {(w, 0) for w in stream}
    start = start_sequence(covers, in_stream) or 1
    for seq, worker in enumerate(stream, start=1):
        if seq > covers.get((worker, 0), 0):
            assert seq >= start, f"message {seq} of worker {worker} skipped (start {start})"
