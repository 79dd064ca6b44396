"""The delivery contract of one source, as a state machine with no sockets and no clock.

The subscriber feeds it what arrives (live batches, replay items, END markers, publisher
info, timeouts) and carries out what it answers: deliver a seq, report a lost range, report
a restart, send a request. Kept apart from the sockets so the contract can be checked over
many thousands of randomized fault schedules (tests/runtime/test_contract.py).

The contract, per source and per epoch (an epoch is one publisher instance as seen here):

- delivered seqs strictly increase;
- every seq the publisher sent, up to the newest this subscriber received anything about, is
  delivered exactly once or lies in exactly one reported lost range; ranges are disjoint and
  never overlap a delivery;
- a restart is reported exactly once, and the new instance's stream is delivered from its
  first seq still available (what is older is reported lost);
- with snapshots (a kvevents publisher started with them, and `heal` on): once history is
  lost, the publisher's live block set is asked for and delivered as one snapshot at seq S,
  after every delivery and at or past the last delivered seq; every seq up to S not
  delivered before it is covered by it, and deliveries go on from S + 1. A consumer that
  replaces its state with each snapshot then holds the publisher's state again. Live
  batches are held while a snapshot streams (so it is never outrun); past `max_buffered`
  they are delivered and a newer snapshot is asked for after a pause that doubles each
  time; one over `max_snapshot_bytes` (or, in the subscriber, too long) is abandoned.

Restarts are seen by the publisher's instance id (the info request, which kvevents
publishers answer) or, against a publisher without it (vLLM's, SGLang's own), by a live seq
going backwards. The live wire carries no instance id: batches held across a restart that
info reveals, and that cannot be placed in either instance, are reported lost in the old
epoch rather than guessed (`ambiguous`), and the new instance's replay brings them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec
from xxhash import xxh3_64_intdigest

JoinPolicy = Literal["start", "first_seen", "none"]


# -- what the sequencer answers: typed events, the only way its decisions leave it ----------


class Deliver(msgspec.Struct, frozen=True, gc=False):
    """Hand this batch to the consumer."""

    seq: int
    payload: bytes


class Lost(msgspec.Struct, frozen=True, gc=False):
    """Seqs first..last (inclusive) of `epoch` will never be delivered."""

    first: int
    last: int
    reason: str
    epoch: int


class Reset(msgspec.Struct, frozen=True, gc=False):
    """The publisher restarted: `epoch` is the new instance's."""

    epoch: int
    reason: str


class Gap(msgspec.Struct, frozen=True, gc=False):
    """A live seq skipped ahead of `expected`; a repair is under way."""

    expected: int
    got: int


class Repaired(msgspec.Struct, frozen=True, gc=False):
    next_seq: int


class Overflow(msgspec.Struct, frozen=True, gc=False):
    """Live batches held during a repair or a snapshot reached the bound; the request in
    flight is abandoned (its late answers must be dropped: a fresh DEALER)."""

    held: int


class RequestReplay(msgspec.Struct, frozen=True, gc=False):
    start: int


class RequestInfo(msgspec.Struct, frozen=True, gc=False):
    pass


class RequestSnapshot(msgspec.Struct, frozen=True, gc=False):
    """`retry`: how many snapshots in a row were abandoned before completing (the
    subscriber waits longer before each new one, so a source too busy to snapshot is not
    asked in a loop)."""

    retry: int = 0


class SnapshotAbandoned(msgspec.Struct, frozen=True, gc=False):
    """The snapshot in flight was given up (too large, or too long); like `Overflow`, its
    late answers must be dropped. It is asked for again when the source is next quiet."""

    reason: str


class Snapshot(msgspec.Struct, frozen=True, gc=False):
    """The publisher's live blocks as of `seq`, as the batches it sent them in."""

    seq: int
    payloads: list[bytes]


class Holding(msgspec.Struct, frozen=True, gc=False):
    """Live input is held from now until the publisher says who it is (after a reconnect, or
    a batch under a delivered seq with other bytes): nothing is delivered meanwhile. The
    request in flight is abandoned (its answers may predate the reconnect, so they must be
    dropped: a fresh DEALER); a RequestInfo follows."""

    held: int


class Counted(msgspec.Struct, frozen=True, gc=False):
    """Batches that needed no delivery: `duplicates`, `late` (an earlier instance's, after
    its epoch closed) or `ambiguous` (placed in neither instance)."""

    name: str
    count: int = 1


Action = (
    Deliver
    | Lost
    | Reset
    | Gap
    | Repaired
    | Overflow
    | RequestReplay
    | RequestInfo
    | RequestSnapshot
    | Snapshot
    | SnapshotAbandoned
    | Holding
    | Counted
)
Actions = list[Action]

RECENT = 4096
_MASK = RECENT - 1

fingerprint: Callable[[bytes], int] = xxh3_64_intdigest
"""What `recent` keeps of a delivered payload. Not the built-in `hash`: SipHash costs 1.5 µs
on a 2 KB payload in the subscriber's loop, xxh3 a fifth of that, and less at every size."""


def _in_arrival_order(*parts: dict[int, bytes]) -> dict[int, bytes]:
    """Held batches from oldest to newest arrival; a seq that arrived again (another
    instance's batch under it) takes its later place."""
    merged: dict[int, bytes] = {}
    for part in parts:
        for seq, payload in part.items():
            merged.pop(seq, None)
            merged[seq] = payload
    return merged


class Sequencer:
    """One source's sequence state, and its only writer. Each input (a method named for what
    happened) returns the actions the caller must carry out, in order; `take` is the one
    shortcut, for the in-order live batch that needs no decision."""

    __slots__ = (
        "can_replay",
        "epoch",
        "expected",
        "info_supported",
        "inline",
        "instance",
        "join",
        "known_next",
        "last_live",
        "max_buffered",
        "outstanding",
        "pending",
        "gap_open",
        "heal",
        "heal_deferred",
        "heal_wanted",
        "held",
        "max_snapshot_bytes",
        "recent",
        "replay_first",
        "replay_progress",
        "snapshot_bytes",
        "snapshot_parts",
        "snapshot_retries",
        "snapshot_seq",
        "snapshots_available",
        "suspect",
        "unverified",
        "verifying",
        "anchored",
        "want_replay",
    )

    def __init__(
        self,
        join: JoinPolicy = "start",
        can_replay: bool = True,
        max_buffered: int = 100_000,
        heal: bool = True,
        max_snapshot_bytes: int = 1 << 30,
    ) -> None:
        self.join = join
        self.heal = heal
        """Ask a publisher that keeps snapshots for one whenever history is lost."""
        self.heal_wanted = False
        """History was lost in this epoch and no snapshot has covered it yet."""
        self.heal_deferred = False
        """A snapshot went unanswered: ask again when the source is next quiet."""
        self.snapshots_available = False
        """The publisher said (info) that it answers snapshot requests."""
        self.snapshot_seq: int | None = None
        """The seq the snapshot in flight is consistent with (its info header says)."""
        self.snapshot_parts: list[bytes] = []
        self.snapshot_bytes = 0
        self.max_snapshot_bytes = max_snapshot_bytes
        """A snapshot larger than this is abandoned (a hostile or broken publisher's never ends)."""
        self.snapshot_retries = 0
        """Snapshots abandoned in a row (live input outran the bound while one was in flight)."""
        self.can_replay = can_replay and join != "none"
        self.max_buffered = max_buffered
        self.epoch = 0
        self.instance: bytes | None = None
        self.known_next = 0
        """The publisher's next seq as it last said (info), so a restart can account for it."""
        self.info_supported: bool | None = None
        """None until the publisher answered an info request; False for upstream publishers."""
        self.expected: int | None = None
        """The next seq to deliver; None until the stream is joined."""
        self.pending: dict[int, bytes] = {}
        """Live batches received ahead of `expected`."""
        self.outstanding: str | None = None
        """The one request in flight: "info", "replay" or None."""
        self.want_replay = False
        """Without info (an upstream publisher), whether the END answering it calls for a replay."""
        self.replay_first = True
        self.replay_progress = False
        self.gap_open = False
        """A GAP was reported and its REPAIRED is still owed."""
        self.last_live: int | None = None
        # (seq, fingerprint of payload) of recent deliveries: a live seq below `expected` whose bytes
        # match is a duplicate; other bytes under a delivered seq mean a new instance.
        self.recent: list[tuple[int, int] | None] = [None] * RECENT
        self.unverified: dict[int, bytes] | None = None
        """After a restart that info revealed: live batches not yet placed, in arrival order.
        The wire carries no instance id, and batches of the old instance can still arrive; a
        replayed batch with the same seq and bytes proves one is the new instance's (and so is
        everything that arrived after it), other bytes prove it is the old one's."""
        self.anchored = False
        """The instance named by info is known to have sent what this epoch delivered."""
        self.verifying = False
        """The replay in flight checks batches received before the publisher first said who
        it is against its own (other bytes under one seq: they were another instance's)."""
        self.suspect = False
        self.held: dict[int, bytes] = {}
        """While `suspect`: live batches since the live socket reconnected, in arrival order,
        held until the publisher says whether it is still the same instance."""
        self.inline = True
        """Nothing is held or replaying: an in-order live batch needs only `expected` moved."""

    # -- inputs: each returns the actions to carry out ------------------------------------

    def start(self) -> Actions:
        """The source was added: with join "start", ask what the publisher has."""
        out: Actions = []
        self._start(out)
        return self._settle(out)

    def reconnected(self) -> Actions:
        """The live socket lost its connection (and makes a new one): the publisher may come
        back as a new instance whose first batch carries exactly the seq the old stream
        expects next. Live batches are held until the publisher says who it is."""
        out: Actions = []
        self._reconnected(out)
        return self._settle(out)

    def take(self, seq: int, payload: bytes) -> bool:
        """The fast path: True when this live batch is the expected one and nothing is held
        or in flight, so the caller delivers it as it is (only the sequencer's watermarks
        move). False: nothing changed; hand it to `live`."""
        if seq != self.expected or not self.inline:
            return False
        self.last_live = seq
        self.expected = seq + 1
        self.recent[seq & _MASK] = (seq, fingerprint(payload))
        return True

    def live(self, seq: int, payload: bytes) -> Actions:
        """A batch from the live socket."""
        out: Actions = []
        self._live(seq, payload, out)
        return self._settle(out)

    def info(self, instance: bytes, next_seq: int, oldest: int, snapshots: bool = False) -> Actions:
        """The publisher's answer to an info request: who it is and what it holds. It also
        heads every replay and snapshot session asked of a publisher that answers info, so
        neither is ever taken from an instance other than the one the epoch belongs to."""
        out: Actions = []
        self._info(instance, next_seq, oldest, snapshots, out)
        return self._settle(out)

    def reply(self, seq: int, payload: bytes) -> Actions:
        """One item of the replay or snapshot session in flight."""
        out: Actions = []
        self._reply(seq, payload, out)
        return self._settle(out)

    def end(self) -> Actions:
        """An END marker: closes the session in flight, or answers an info request the way a
        publisher without info does (vLLM's and SGLang's own reply END to it)."""
        out: Actions = []
        self._end(out)
        return self._settle(out)

    def timeout(self) -> Actions:
        """The request in flight got no answer after its retries: stop waiting for it."""
        out: Actions = []
        self._timeout(out)
        return self._settle(out)

    def abandon_snapshot(self, reason: str) -> Actions:
        """The snapshot in flight ran past its time: give it up (asked again when quiet)."""
        out: Actions = []
        if self.outstanding == "snapshot":
            self._abandon_snapshot(reason, out)
        return self._settle(out)

    def resync(self) -> Actions | None:
        """The consumer found its state inconsistent with the stream (e.g. a block removed
        that it never saw stored): ask for a snapshot. None when the publisher has none."""
        out: Actions = []
        if not self._resync(out):
            return None
        return self._settle(out)

    def probe(self) -> Actions | None:
        """The source was quiet: ask whether the publisher has anything not yet seen (a tail
        the PUB socket dropped is revealed by nothing else). None when nothing was asked."""
        out: Actions = []
        if not self._probe(out):
            return None
        return self._settle(out)

    def _settle(self, out: Actions) -> Actions:
        """After every input: ask for the snapshot history loss calls for once nothing else
        is in flight, and recompute `inline` (whether `take` may deliver without a decision)."""
        if (
            self.heal_wanted
            and self.outstanding is None
            and self.snapshots_available
            and self.expected is not None
            and not self.suspect
            and self.unverified is None
        ):
            self.outstanding = "snapshot"
            self.snapshot_seq = None
            self.snapshot_parts = []
            self.snapshot_bytes = 0
            out.append(RequestSnapshot(self.snapshot_retries))
        self.inline = not (
            self.outstanding in ("replay", "snapshot")
            or self.pending
            or self.unverified is not None
            or self.suspect
        )
        return out

    # -- how each input is handled ------------------------------------------------------

    def _start(self, out: Actions) -> None:
        if self.can_replay and self.join == "start":
            self.expected = 0
            # Live batches wait for the publisher's first answer (the join handshake): one
            # delivered before it could belong to an instance that has already been replaced,
            # and a publisher's buffer need not reach back far enough to tell.
            self.suspect = True
            self.held = {}
            self._repair(out)

    def _reconnected(self, out: Actions) -> None:
        if self.info_supported is False or not self.can_replay or self.expected is None:
            return
        self._hold_until_told(out, renew=True)

    def _live(self, seq: int, payload: bytes, out: Actions) -> None:
        if self.suspect:
            if len(self.held) < self.max_buffered:
                self.held.pop(seq, None)
                self.held[seq] = payload
            return
        last_live = self.last_live
        self.last_live = seq
        expected = self.expected
        if expected is None:
            self._join(seq, payload, out)
            return
        if self.unverified is not None:
            if len(self.unverified) < self.max_buffered:
                self.unverified.pop(seq, None)  # a later arrival is a newer instance's
                self.unverified[seq] = payload
            if self.outstanding is None:
                self._repair(out)
            return
        if seq < expected:
            same = self._same_as_delivered(seq, payload)
            if self.info_supported:
                # Instance ids decide restarts: other bytes under a delivered seq are a late
                # batch of an earlier instance, or a sign to ask who the publisher is now.
                if same is False and not self.anchored:
                    # Two instances for certain, and the one named by info is not known to be
                    # the one delivered from: the newer is the one whose batch came last.
                    self._restart("a live seq went backwards", True, out)
                    self.instance = None
                    self._join(seq, payload, out)
                elif same is False:
                    # The reconnect notice that holds live input can come after the new
                    # instance's first batches (it travels apart from the data): without
                    # this hold, its next batch at the expected seq would be spliced on.
                    out.append(Counted("late"))
                    self._hold_until_told(out)
                else:
                    out.append(Counted("duplicates"))
                return
            if same is not None:
                duplicate = same
            else:
                # Older than the recent window: a live stream lagging behind a replay still
                # moves forward; at or below the live watermark it is a new instance.
                duplicate = last_live is None or seq > last_live
            if duplicate:
                out.append(Counted("duplicates"))
                return
            self._restart("a live seq went backwards", True, out)
            self._join(seq, payload, out)
            return
        if seq == expected and self.outstanding not in ("replay", "snapshot"):
            self._deliver(seq, payload, out)
            if self.pending:
                self._flush(out)
            return
        held = self.pending.pop(seq, None)
        if held is not None and held != payload:
            # Two batches under one seq: two instances are on the wire. The later arrival
            # is the newer one; the arrival order of `pending` is what placement relies on.
            out.append(Counted("late"))
        self.pending[seq] = payload
        if seq == expected and self.outstanding != "snapshot":
            self._flush(out)
            return
        if len(self.pending) > self.max_buffered:
            out.append(Overflow(len(self.pending)))
            if self.outstanding == "snapshot":
                # Live input outran the bound before the snapshot completed: it restarts from
                # a newer cut once what was held is delivered, after a longer pause each time.
                self.snapshot_retries += 1
                self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
            self.outstanding = None
            self._skip_to(min(self.pending), "live buffer overflow during a repair", out)
            self._flush(out)
        if self.pending and self.outstanding is None:
            out.append(Gap(expected, seq))
            self.gap_open = True
            self._repair(out)

    def _info(
        self,
        instance: bytes,
        next_seq: int,
        oldest: int,
        snapshots: bool,
        out: Actions,
    ) -> None:
        header = self.outstanding in ("replay", "snapshot")
        self.snapshots_available = snapshots
        if self.outstanding == "info":
            self.outstanding = None
        self.info_supported = True
        expected = self.expected
        first = self.instance is None
        if first:
            # The first answer names the instance. After a reconnect, what was delivered
            # before it may be another instance's (a restart before the join handshake).
            self.anchored = not self.suspect or not expected
        # Batches held since before the first answer may be another instance's too: they are
        # placed by the replay's bytes rather than delivered as they are.
        place_held = first and self.suspect and bool(self.pending or self.held)
        changed = self.instance is not None and instance != self.instance
        unanchored = not self.anchored and not changed
        # Unanchored, everything delivered or pending arrived before this answer was asked
        # for: an instance that has not reached those seqs yet is not the one that sent them.
        behind = unanchored and (
            (expected or 0) > next_seq or any(seq >= next_seq for seq in self.pending)
        )
        if changed or behind:
            reason = (
                "the publisher's instance changed"
                if changed
                else "the publisher's next seq is behind what was received"
            )
            self._restart(reason, False, out)
            self.instance = instance
            self.anchored = True
            self.known_next = next_seq
            if self.can_replay:
                self.expected = 0
                self._request_replay(out)
            return
        self.known_next = max(self.known_next, next_seq)
        self.instance = instance
        if header:
            # A replay starts at the last seq delivered: its bytes there anchor the instance.
            self.verifying = unanchored and self.outstanding == "replay"
            if self.outstanding == "snapshot":
                self.snapshot_seq = next_seq - 1
            self._release(out)
            return
        self.want_replay = False
        if self.expected is None:
            return
        if not self.unverified:
            # Nothing awaits placement, and the replay that was to end the placing was given
            # up (a reconnect): left empty, it would keep the fast path and any snapshot off.
            self.unverified = None
        if self.pending or self.unverified or self.held or self.expected < next_seq or unanchored:
            # Unanchored, the replay starts at the last seq delivered: bytes other than the
            # ones delivered under it reveal a new instance (`_reply`), and what arrived since
            # is placed by the replay's bytes like batches held across a restart.
            self.verifying = unanchored
            if (unanchored or place_held) and (self.pending or self.held):
                self.unverified = _in_arrival_order(self.unverified or {}, self.pending, self.held)
                self.pending.clear()
                self.held = {}
            self._request_replay(out)
        elif self.gap_open:
            self.gap_open = False
            out.append(Repaired(self.expected))
        self._release(out)

    def _reply(self, seq: int, payload: bytes, out: Actions) -> None:
        # A replay starts one seq early when that seq was delivered: its bytes must match, or
        # the publisher restarted under us.
        if self.outstanding == "snapshot" and self.snapshot_seq is not None:
            self.snapshot_bytes += len(payload)
            if self.snapshot_bytes > self.max_snapshot_bytes:
                self._abandon_snapshot(f"larger than {self.max_snapshot_bytes} bytes", out)
            elif len(self.snapshot_parts) >= self.max_buffered:
                self._abandon_snapshot(f"more than {self.max_buffered} parts", out)
            else:
                self.snapshot_parts.append(payload)
            return
        if self.outstanding != "replay" or self.expected is None:
            return
        if self.unverified is not None and seq in self.unverified:
            self._place(seq, payload, out)
        if seq < self.expected:
            same = self._same_as_delivered(seq, payload)
            if same and self.verifying:
                self.anchored = True  # this instance sent what was delivered
            elif same is False:
                self._restart(
                    "a replayed batch differs from the one delivered under its seq", False, out
                )
                if self.can_replay:
                    self.expected = 0
                    self._request_replay(out)
            return
        if seq > self.expected:
            reason = (
                "replay began after the requested seq"
                if self.replay_first
                else "replay skipped seqs"
            )
            self._skip_to(seq, reason, out)
        self.replay_first = False
        self.replay_progress = True
        self.pending.pop(seq, None)
        self._deliver(seq, payload, out)

    def _end(self, out: Actions) -> None:
        if self.outstanding == "info":
            self.outstanding = None
            self.info_supported = False
            if self.expected is not None and (self.want_replay or self.pending):
                self._request_replay(out)
            self._release(out)
            return
        if self.outstanding == "snapshot":
            self.outstanding = None
            self._apply_snapshot(out)
            self._after_repair(out)
            return
        if self.outstanding != "replay":
            return
        self.outstanding = None
        self.verifying = False
        if self.unverified is not None:
            expected = self.expected
            assert expected is not None
            if not self.replay_progress or not any(seq >= expected for seq in self.unverified):
                # What the replay covered was placed; the rest the new instance never had.
                if self.unverified:
                    out.append(Counted("ambiguous", len(self.unverified)))
                self.unverified = None
            else:
                self.unverified = {
                    s: p for s, p in self.unverified.items() if s >= expected
                } or None
                if self.unverified is not None:
                    self._repair(out)
                    return
        self._flush(out)
        if self.pending:
            if self.replay_progress:
                # The session ended at the publisher's newest seq when it was asked; what is
                # still missing may be newer than that: ask again from here.
                self._repair(out)
                return
            self._skip_to(min(self.pending), "replay returned nothing before the live stream", out)
            self._flush(out)
            if self.pending:
                self._repair(out)
                return
        elif self.replay_progress and self.expected is not None and self.expected < self.known_next:
            # The replay ended at the publisher's byte budget, short of the newest seq its
            # header announced: ask again from here (it made progress, so this ends).
            self._request_replay(out)
            return
        self._after_repair(out)

    def _timeout(self, out: Actions) -> None:
        kind, self.outstanding = self.outstanding, None
        if kind == "info" and self.suspect and self.info_supported:
            # A publisher that said who it was before and is silent after a reconnect is
            # most likely restarting (its replay socket not bound yet): releasing the hold
            # would splice the new instance's batches onto the old epoch (CI saw it on a
            # loaded machine). Hold on (bounded by `max_buffered`; a replay or a lost range
            # covers what does not fit) and ask again.
            self.outstanding = "info"
            out.append(Counted("info_unanswered"))
            out.append(RequestInfo())
            return
        self.verifying = False
        if kind == "info" and self.info_supported is None:
            self.info_supported = False
        if self.unverified is not None:
            if self.unverified:
                out.append(Counted("ambiguous", len(self.unverified)))
            self.unverified = None
        while self.pending:
            self._skip_to(min(self.pending), f"{kind or 'request'} timed out", out)
            self._flush(out)
        if kind == "snapshot" or self.heal_wanted:
            # Live batches are held while a snapshot is in flight: a publisher that cannot
            # answer one is asked again only when the source is next quiet (probe).
            self.heal_deferred = True
            self.heal_wanted = False
        self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
        self.gap_open = False
        self.want_replay = False
        if self.suspect and kind != "info":
            # What arrived since the reconnect may be a new instance's: only an info answer
            # may release it (an unanswered info request does: the publisher cannot say).
            self.outstanding = "info"
            out.append(RequestInfo())
            return
        self._release(out)

    def _abandon_snapshot(self, reason: str, out: Actions) -> None:
        """Give up the snapshot in flight (too large, or too long): what was held is delivered,
        and a snapshot is asked for again only when the source is next quiet."""
        self.outstanding = None
        self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
        out.append(SnapshotAbandoned(reason))
        self.heal_deferred = self.heal_deferred or self.heal_wanted
        self.heal_wanted = False
        self._flush(out)
        if self.pending:
            self._repair(out)
        else:
            self._after_repair(out)

    def _resync(self, out: Actions) -> bool:
        if not self.snapshots_available or self.expected is None or not self.can_replay:
            return False
        self.heal_wanted = True
        return True

    def _probe(self, out: Actions) -> bool:
        if not self.can_replay or self.outstanding is not None or self.expected is None:
            return False
        if self.heal_deferred and self.snapshots_available:
            self.heal_deferred = False
            self.heal_wanted = True
            return True  # asked for on the way out (_settle)
        if self.info_supported is False:
            self._request_replay(out)
        else:
            self.want_replay = True
            self.outstanding = "info"
            out.append(RequestInfo())
        return True

    # -- internals ----------------------------------------------------------------------

    def _after_repair(self, out: Actions) -> None:
        if self.gap_open and self.expected is not None:
            self.gap_open = False
            out.append(Repaired(self.expected))
        if self.suspect:
            # The session's header came before the reconnect: ask who the publisher is now.
            self.outstanding = "info"
            out.append(RequestInfo())

    def _apply_snapshot(self, out: Actions) -> None:
        """The snapshot in flight is complete: it covers every seq up to its own, and what
        was held past it is delivered after it."""
        seq, parts = self.snapshot_seq, self.snapshot_parts
        self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
        expected = self.expected
        # Live input is held while a snapshot is in flight, so its cut is never behind what
        # was delivered; without a header (a publisher that answered END alone) it is unusable.
        if seq is not None and expected is not None and seq >= expected - 1:
            for held in [s for s in self.pending if s <= seq]:
                del self.pending[held]
            self.expected = seq + 1
            self.heal_wanted = self.heal_deferred = False
            self.snapshot_retries = 0
            out.append(Snapshot(seq, parts))
        else:
            self.heal_deferred = self.heal_deferred or self.heal_wanted
            self.heal_wanted = False
        self._flush(out)
        if self.pending:
            self._repair(out)

    def _release(self, out: Actions) -> None:
        """The instance is settled: what was held since the reconnect is live input again."""
        if not self.suspect:
            return
        self.suspect = False
        held, self.held = self.held, {}
        for seq, payload in held.items():
            self._live(seq, payload, out)

    def _join(self, seq: int, payload: bytes, out: Actions) -> None:
        if seq == 0 or self.join != "start" or not self.can_replay:
            self.expected = seq
            self._deliver(seq, payload, out)
            return
        self.expected = 0
        self.pending[seq] = payload
        self._repair(out)

    def _repair(self, out: Actions) -> None:
        if not self.can_replay:
            while self.pending:
                self._skip_to(min(self.pending), "no replay endpoint", out)
                self._flush(out)
            self.gap_open = False
            return
        if self.info_supported is False:
            self._request_replay(out)
            return
        self.want_replay = True
        self.outstanding = "info"
        out.append(RequestInfo())

    def _request_replay(self, out: Actions) -> None:
        expected = self.expected
        assert expected is not None
        self.want_replay = False
        self.outstanding = "replay"
        self.replay_first = True
        self.replay_progress = False
        entry = self.recent[(expected - 1) & _MASK] if expected else None
        overlap = entry is not None and entry[0] == expected - 1
        out.append(RequestReplay(expected - 1 if overlap else expected))

    def _hold_until_told(self, out: Actions, renew: bool = False) -> None:
        """Hold live batches until the publisher says who it is (an info answer). `renew`: the
        connection was lost (again): an answer asked for before it no longer says who is there now."""
        if self.suspect and not renew:
            return
        if not self.suspect:
            self.held = {}
        self.suspect = True
        self.verifying = False
        # An answer already on its way may have been written by the instance that just went
        # away (seen on a loaded machine: it released the hold and the new instance's batches
        # were spliced onto the old epoch). The subscriber replaces its DEALER on Holding, so
        # the request in flight is abandoned and asked afresh; a replay or snapshot it stood
        # for is asked again once the answer comes (pending batches, `heal_wanted`).
        if self.outstanding == "snapshot":
            self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
        self.want_replay = self.want_replay or self.outstanding == "replay"
        self.outstanding = "info"
        out.append(Holding(len(self.pending)))
        out.append(RequestInfo())

    def _same_as_delivered(self, seq: int, payload: bytes) -> bool | None:
        """Whether `payload` has the bytes delivered under `seq`; None when `seq` is outside
        the recent window (or was never delivered), so nothing can be said."""
        entry = self.recent[seq & _MASK]
        if entry is None or entry[0] != seq:
            return None
        return entry[1] == fingerprint(payload)

    def _deliver(self, seq: int, payload: bytes, out: Actions) -> None:
        self.expected = seq + 1
        self.recent[seq & _MASK] = (seq, fingerprint(payload))
        out.append(Deliver(seq, payload))

    def _flush(self, out: Actions) -> None:
        pending = self.pending
        while self.expected in pending:
            seq = self.expected
            assert seq is not None
            self._deliver(seq, pending.pop(seq), out)

    def _skip_to(self, target: int, reason: str, out: Actions) -> None:
        """Move `expected` to `target`: held batches below it are delivered in order, every
        seq in between that is not held is reported lost."""
        assert self.expected is not None
        missing_from = self.expected
        for seq in sorted(s for s in self.pending if s < target):
            payload = self.pending.pop(seq)
            if seq > missing_from:
                out.append(Lost(missing_from, seq - 1, reason, self.epoch))
                self.heal_wanted = self.heal
            self._deliver(seq, payload, out)
            missing_from = seq + 1
        if target > missing_from:
            out.append(Lost(missing_from, target - 1, reason, self.epoch))
            self.heal_wanted = self.heal
        self.expected = target

    def _place(self, seq: int, payload: bytes, out: Actions) -> None:
        """A replayed batch met a held one under the same seq: decide which instance holds what."""
        assert self.unverified is not None
        order = list(self.unverified)
        index = order.index(seq)
        same = self.unverified[seq] == payload
        old = order[: index + (0 if same else 1)]
        if old:
            out.append(Counted("late", len(old)))
        if same:
            expected = self.expected
            assert expected is not None
            for held in order[index:]:
                if held >= expected:
                    self.pending[held] = self.unverified[held]
            self.unverified = None
        else:
            self.unverified = {s: self.unverified[s] for s in order[index + 1 :]} or None
            if self.unverified is None:
                self.unverified = {}

    def _restart(self, reason: str, seen_live: bool, out: Actions) -> None:
        """Close the current epoch and open the next. Held batches are the old instance's
        when the restart showed as a live seq going backwards (everything held arrived before
        it); when info revealed it, they are reported lost in the old epoch and placed in the
        new one by its replay where they are its own."""
        held: dict[int, bytes] = {}
        if self.expected is not None:
            if self.pending and seen_live:
                self._skip_to(max(self.pending) + 1, "held across a publisher restart", out)
            else:
                # Which instance sent a held batch is unknown (the live wire carries no id, and
                # an unseen instance may have come and gone): the old epoch reports them lost,
                # and the new instance's replay places those that are its own.
                held = _in_arrival_order(self.unverified or {}, self.pending, self.held)
            end = max(self.known_next, max(held) + 1 if held else 0)
            if end > self.expected:
                out.append(
                    Lost(
                        self.expected,
                        end - 1,
                        "not received before the publisher restarted",
                        self.epoch,
                    )
                )
                self.expected = end
        self.pending.clear()
        self.known_next = 0
        self.suspect = False
        self.verifying = False
        self.held = {}
        self.outstanding = None
        self.want_replay = False
        self.gap_open = False
        self.heal_wanted = self.heal_deferred = False
        self.snapshot_seq, self.snapshot_parts, self.snapshot_bytes = None, [], 0
        self.snapshot_retries = 0
        self.epoch += 1
        self.expected = None
        self.last_live = None
        self.recent = [None] * RECENT
        self.unverified = None if seen_live else held
        out.append(Reset(self.epoch, reason))
