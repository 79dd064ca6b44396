"""What a replica does with each message of the stream and each snapshot it reads.

A state machine with no I/O (the replica feeds it and carries out its answers), so that it
can be checked against a reference model over many randomized schedules
(tests/fleet/test_tracker.py). Per worker it keeps the epoch it is in, the next seq it
expects, the stream sequence its last snapshot covers, and whether its state is whole.

The invariant: a worker whose state is whole holds exactly what applying its epoch's batches
from seq 0 (or from a whole snapshot) to `expected - 1` gives, each once and in order.
Anything that breaks it (a seq missing from the stream, a `lost` marker, joining a stream
in the middle, a snapshot the bridge could not vouch for) marks the worker stale until a
whole snapshot or a new epoch starting at seq 0 makes it whole again. Batches keep being
applied while stale (the entries stay close to the engine's; answers flag them).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ..backend import Worker
from . import protocol
from .protocol import SnapshotRecord

# -- what the tracker answers --------------------------------------------------------------


class Apply(msgspec.Struct, frozen=True, gc=False):
    worker: Worker
    payload: bytes


class Clear(msgspec.Struct, frozen=True, gc=False):
    """Drop the worker's entries (a new epoch begins)."""

    worker: Worker


class Resync(msgspec.Struct, frozen=True, gc=False):
    """Replace the worker's entries by these batches; it is whole again."""

    worker: Worker
    payloads: list[bytes]


class MarkStale(msgspec.Struct, frozen=True, gc=False):
    worker: Worker
    reason: str


class Fetch(msgspec.Struct, frozen=True, gc=False):
    """Read the worker's snapshot object and hand it to `snapshot()`."""

    worker: Worker


Action = Apply | Clear | Resync | MarkStale | Fetch


@dataclass
class WorkerTrack:
    epoch: str | None = None
    expected: int = 0
    covers: int = 0
    """Stream sequences up to this one are in the state already (from a snapshot)."""
    whole: bool = False
    last_stream_seq: int = 0


COUNTER_NAMES = (
    "messages",
    "applied",
    "duplicates",
    "covered",
    "gaps",
    "lost_markers",
    "resets",
    "snapshots_loaded",
    "snapshots_skipped",
    "joined_midstream",
    "malformed",
)


class Tracker:
    """Per-worker decisions of one replica; the only writer of its tracks."""

    def __init__(self) -> None:
        self.tracks: dict[Worker, WorkerTrack] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

    def _track(self, worker: Worker) -> WorkerTrack:
        track = self.tracks.get(worker)
        if track is None:
            track = self.tracks[worker] = WorkerTrack()
        return track

    def message(
        self, stream_seq: int, worker: Worker, headers: dict[str, str], payload: bytes
    ) -> list[Action]:
        """One stream message of `worker` (its subject), in stream order."""
        counters = self.counters
        counters["messages"] += 1
        track = self._track(worker)
        if stream_seq <= track.covers:
            counters["covered"] += 1
            return []
        track.last_stream_seq = stream_seq
        try:
            kind = headers[protocol.KIND]
            epoch = headers[protocol.EPOCH]
            if kind == protocol.BATCH:
                return self._batch(track, worker, epoch, int(headers[protocol.SEQ]), payload)
            if kind == protocol.RESET:
                return self._reset(track, worker, epoch)
            if kind == protocol.LOST:
                first, last = int(headers[protocol.FIRST]), int(headers[protocol.LAST])
                return self._lost(track, worker, epoch, first, last, headers.get("Kve-Reason"))
            if kind == protocol.SNAPSHOT:
                return self._marker(track, worker, epoch, int(headers[protocol.SEQ]), headers)
            raise ValueError(f"unknown kind {kind!r}")
        except (KeyError, ValueError) as exc:
            # A message the replica cannot place: what it held may now be missing.
            counters["malformed"] += 1
            track.whole = False
            return [MarkStale(worker, f"a message it could not read: {exc!r}")]

    def _batch(
        self, track: WorkerTrack, worker: Worker, epoch: str, seq: int, payload: bytes
    ) -> list[Action]:
        counters = self.counters
        if epoch != track.epoch:
            # No reset marker came first (the replica started inside this epoch).
            actions: list[Action] = [] if track.epoch is None else [Clear(worker)]
            track.epoch = epoch
            if seq == 0:
                track.whole = True
                actions.append(Resync(worker, []))
            else:
                counters["joined_midstream"] += 1
                track.whole = False
                actions.append(
                    MarkStale(
                        worker,
                        f"joined epoch {epoch} at seq {seq}: what came before is not in the stream",
                    )
                )
            track.expected = seq + 1
            counters["applied"] += 1
            actions.append(Apply(worker, payload))
            return actions
        if seq < track.expected:
            counters["duplicates"] += 1
            return []
        actions = []
        if seq > track.expected:
            counters["gaps"] += 1
            track.whole = False
            actions.append(
                MarkStale(
                    worker,
                    f"seqs {track.expected}..{seq - 1} of epoch {epoch} are not in the stream",
                )
            )
        track.expected = seq + 1
        counters["applied"] += 1
        actions.append(Apply(worker, payload))
        return actions

    def _reset(self, track: WorkerTrack, worker: Worker, epoch: str) -> list[Action]:
        if epoch == track.epoch:
            self.counters["duplicates"] += 1
            return []
        self.counters["resets"] += 1
        actions: list[Action] = [] if track.epoch is None else [Clear(worker)]
        track.epoch, track.expected, track.whole = epoch, 0, True
        actions.append(Resync(worker, []))
        return actions

    def _lost(
        self,
        track: WorkerTrack,
        worker: Worker,
        epoch: str,
        first: int,
        last: int,
        reason: str | None,
    ) -> list[Action]:
        if epoch == track.epoch and last < track.expected:
            self.counters["duplicates"] += 1  # this replica has those seqs already
            return []
        self.counters["lost_markers"] += 1
        actions: list[Action] = []
        if epoch != track.epoch:
            if track.epoch is not None:
                actions.append(Clear(worker))
            track.epoch = epoch
        track.whole = False
        track.expected = max(track.expected, last + 1)
        actions.append(
            MarkStale(
                worker, f"seqs {first}..{last} of epoch {epoch} were lost: {reason or 'unknown'}"
            )
        )
        return actions

    def _marker(
        self, track: WorkerTrack, worker: Worker, epoch: str, seq: int, headers: dict[str, str]
    ) -> list[Action]:
        if (
            headers.get(protocol.WHY) == protocol.PERIODIC
            and track.whole
            and epoch == track.epoch
            and seq < track.expected
        ):
            # Nothing was missed: this replica holds that state already.
            self.counters["snapshots_skipped"] += 1
            return []
        return [Fetch(worker)]

    def snapshot(self, worker: Worker, record: SnapshotRecord) -> list[Action]:
        """A snapshot read from the object store (at start-up, or after a marker)."""
        track = self._track(worker)
        if record.epoch == track.epoch and record.seq < track.expected - 1:
            # Older than what this replica applied: loading it would step back.
            self.counters["snapshots_skipped"] += 1
            return []
        self.counters["snapshots_loaded"] += 1
        actions: list[Action] = [Resync(worker, list(record.payloads))]
        track.epoch = record.epoch
        track.expected = record.seq + 1
        track.covers = max(track.covers, record.covers)
        track.whole = record.whole
        if not record.whole:
            actions.append(
                MarkStale(worker, f"its snapshot is not whole: {record.reason or 'unknown'}")
            )
        return actions


def start_sequence(covers: dict[Worker, int], in_stream: set[Worker]) -> int | None:
    """The stream sequence a replica that loaded snapshots covering `covers` (per worker)
    reads from, None for the first message. Every message a loaded snapshot does not cover
    must be read: a worker with messages in the stream (`in_stream`) and no snapshot loaded
    is read from its first message, not joined in the middle of its epoch."""
    if not covers or not in_stream <= covers.keys():
        return None
    return min(covers.values()) + 1
