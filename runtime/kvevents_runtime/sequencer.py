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
  replaces its state with each snapshot then holds the publisher's state again.

Restarts are seen by the publisher's instance id (the info request, which kvevents
publishers answer) or, against a publisher without it (vLLM's, SGLang's own), by a live seq
going backwards. The live wire carries no instance id: batches held across a restart that
info reveals, and that cannot be placed in either instance, are reported lost in the old
epoch rather than guessed (`ambiguous`), and the new instance's replay brings them back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from xxhash import xxh3_64_intdigest

JoinPolicy = Literal["start", "first_seen", "none"]
R = TypeVar("R")

DELIVER = "deliver"
"""(DELIVER, seq, payload)"""
LOST = "history_lost"
"""(LOST, first, last, reason, epoch): first..last inclusive, in that epoch."""
RESET = "reset"
"""(RESET, new epoch, reason)"""
GAP = "gap"
"""(GAP, expected, got): a live seq skipped ahead; a repair is under way."""
REPAIRED = "repaired"
"""(REPAIRED, next seq)"""
REQUEST_REPLAY = "request_replay"
"""(REQUEST_REPLAY, start)"""
REQUEST_INFO = "request_info"
"""(REQUEST_INFO,)"""
OVERFLOW = "overflow"
"""(OVERFLOW, held): live batches held during a repair reached the bound."""
REQUEST_SNAPSHOT = "request_snapshot"
"""(REQUEST_SNAPSHOT,)"""
SNAPSHOT = "snapshot"
"""(SNAPSHOT, seq, payloads): the publisher's live blocks as of seq, as batches."""

RECENT = 4096
_MASK = RECENT - 1

fingerprint: Callable[[bytes], int] = xxh3_64_intdigest
"""What `recent` keeps of a delivered payload. Not the built-in `hash`: SipHash costs 1.5 µs
on a 2 KB payload in the subscriber's loop, xxh3 a fifth of that, and less at every size."""


def _settles(method: Callable[..., R]) -> Callable[..., R]:
    """After an input is handled, recompute `inline`: whether the next live batch, if it
    carries the expected seq, can be delivered without the sequencer (the subscriber's fast
    path). Only the slow path pays for this."""

    @functools.wraps(method)
    def settled(self: Sequencer, *args: Any) -> R:
        try:
            return method(self, *args)
        finally:
            out = args[-1]
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
                out.append((REQUEST_SNAPSHOT,))
            self.inline = not (
                self.outstanding in ("replay", "snapshot")
                or self.pending
                or self.unverified is not None
                or self.suspect
            )

    return settled


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
    """One source's sequence state. Every method appends its actions to `out`."""

    __slots__ = (
        "ambiguous",
        "can_replay",
        "duplicates",
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
        "late",
        "recent",
        "replay_first",
        "replay_progress",
        "snapshot_parts",
        "snapshot_seq",
        "snapshots_available",
        "suspect",
        "unverified",
        "want_replay",
    )

    def __init__(
        self,
        join: JoinPolicy = "start",
        can_replay: bool = True,
        max_buffered: int = 100_000,
        heal: bool = True,
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
        self.suspect = False
        self.held: dict[int, bytes] = {}
        """While `suspect`: live batches since the live socket reconnected, in arrival order,
        held until the publisher says whether it is still the same instance."""
        self.inline = True
        """Nothing is held or replaying: an in-order live batch needs only `expected` moved."""
        self.duplicates = 0
        self.ambiguous = 0
        """Held batches that could be placed in neither instance (reported lost or dropped)."""
        self.late = 0
        """The old instance's batches that arrived after its epoch was closed."""

    # -- inputs -------------------------------------------------------------------------

    @_settles
    def start(self, out: list[tuple[Any, ...]]) -> None:
        """The source was added: with join "start", ask what the publisher has."""
        if self.can_replay and self.join == "start":
            self.expected = 0
            self._repair(out)

    @_settles
    def reconnected(self, out: list[tuple[Any, ...]]) -> None:
        """The live socket lost its connection (and makes a new one): the publisher may come
        back as a new instance whose first batch carries exactly the seq the old stream
        expects next. Live batches are held until the publisher says who it is."""
        if self.info_supported is False or not self.can_replay or self.expected is None:
            return
        self._hold_until_told(out)

    @_settles
    def live(self, seq: int, payload: bytes, out: list[tuple[Any, ...]]) -> None:
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
                if same is False:
                    # The reconnect notice that holds live input can come after the new
                    # instance's first batches (it travels apart from the data): without
                    # this hold, its next batch at the expected seq would be spliced on.
                    self.late += 1
                    self._hold_until_told(out)
                else:
                    self.duplicates += 1
                return
            if same is not None:
                duplicate = same
            else:
                # Older than the recent window: a live stream lagging behind a replay still
                # moves forward; at or below the live watermark it is a new instance.
                duplicate = last_live is None or seq > last_live
            if duplicate:
                self.duplicates += 1
                return
            self._restart("a live seq went backwards", True, out)
            self._join(seq, payload, out)
            return
        if seq == expected and self.outstanding != "replay":
            self._deliver(seq, payload, out)
            if self.pending:
                self._flush(out)
            return
        held = self.pending.pop(seq, None)
        if held is not None and held != payload:
            # Two batches under one seq: two instances are on the wire. The later arrival
            # is the newer one; the arrival order of `pending` is what placement relies on.
            self.late += 1
        self.pending[seq] = payload
        if seq == expected:
            self._flush(out)
            return
        if len(self.pending) > self.max_buffered:
            out.append((OVERFLOW, len(self.pending)))
            self.outstanding = None
            self._skip_to(min(self.pending), "live buffer overflow during a repair", out)
            self._flush(out)
        if self.pending and self.outstanding is None:
            out.append((GAP, self.expected, seq))
            self.gap_open = True
            self._repair(out)

    @_settles
    def info(
        self,
        instance: bytes,
        next_seq: int,
        oldest: int,
        out: list[tuple[Any, ...]],
        snapshots: bool = False,
    ) -> None:
        """The publisher's answer to an info request: who it is and what it holds. It also
        heads every replay and snapshot session asked of a publisher that answers info, so
        neither is ever taken from an instance other than the one the epoch belongs to."""
        header = self.outstanding in ("replay", "snapshot")
        self.snapshots_available = snapshots
        if self.outstanding == "info":
            self.outstanding = None
        self.info_supported = True
        if self.instance is None or instance == self.instance:
            self.known_next = max(self.known_next, next_seq)
        if self.instance is not None and instance != self.instance:
            self._restart("the publisher's instance changed", False, out)
            self.instance = instance
            self.known_next = next_seq
            if self.can_replay:
                self.expected = 0
                self._request_replay(out)
            return
        self.instance = instance
        if header:
            if self.outstanding == "snapshot":
                self.snapshot_seq = next_seq - 1
            self._release(out)
            return
        self.want_replay = False
        if self.expected is None:
            return
        if self.pending or self.unverified or self.held or self.expected < next_seq:
            self._request_replay(out)
        elif self.gap_open:
            self.gap_open = False
            out.append((REPAIRED, self.expected))
        self._release(out)

    @_settles
    def reply(self, seq: int, payload: bytes, out: list[tuple[Any, ...]]) -> None:
        """One replayed batch of the replay in flight. A replay starts one seq early when that
        seq was delivered: its bytes must match, or the publisher restarted under us."""
        if self.outstanding == "snapshot" and self.snapshot_seq is not None:
            if len(self.snapshot_parts) < self.max_buffered:
                self.snapshot_parts.append(payload)
            else:
                self.snapshot_seq = None  # past the bound: END will find no usable snapshot
            return
        if self.outstanding != "replay" or self.expected is None:
            return
        if self.unverified is not None and seq in self.unverified:
            self._place(seq, payload)
        if seq < self.expected:
            if self._same_as_delivered(seq, payload) is False:
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

    @_settles
    def end(self, out: list[tuple[Any, ...]]) -> None:
        """An END marker: closes the replay in flight, or answers an info request the way a
        publisher without info does (vLLM's and SGLang's own reply END to it)."""
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
        if self.unverified is not None:
            expected = self.expected
            assert expected is not None
            if not self.replay_progress or not any(seq >= expected for seq in self.unverified):
                # What the replay covered was placed; the rest the new instance never had.
                self.ambiguous += len(self.unverified)
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
        self._after_repair(out)

    @_settles
    def timeout(self, out: list[tuple[Any, ...]]) -> None:
        """The request in flight got no answer after its retries: stop waiting for it."""
        kind, self.outstanding = self.outstanding, None
        if kind == "info" and self.info_supported is None:
            self.info_supported = False
        if self.unverified is not None:
            self.ambiguous += len(self.unverified)
            self.unverified = None
        while self.pending:
            self._skip_to(min(self.pending), f"{kind or 'request'} timed out", out)
            self._flush(out)
        if kind == "snapshot" or self.heal_wanted:
            # Live batches are held while a snapshot is in flight: a publisher that cannot
            # answer one is asked again only when the source is next quiet (probe).
            self.heal_deferred = True
            self.heal_wanted = False
        self.snapshot_seq, self.snapshot_parts = None, []
        self.gap_open = False
        self.want_replay = False
        self._release(out)

    @_settles
    def resync(self, out: list[tuple[Any, ...]]) -> bool:
        """The consumer found its state inconsistent with the stream (e.g. a block removed
        that it never saw stored): ask for a snapshot. False when the publisher has none."""
        if not self.snapshots_available or self.expected is None or not self.can_replay:
            return False
        self.heal_wanted = True
        return True

    @_settles
    def probe(self, out: list[tuple[Any, ...]]) -> bool:
        """The source was quiet: ask whether the publisher has anything not yet seen (a tail
        the PUB socket dropped is revealed by nothing else). False when nothing was asked."""
        if not self.can_replay or self.outstanding is not None or self.expected is None:
            return False
        if self.heal_deferred and self.snapshots_available:
            self.heal_deferred = False
            self.heal_wanted = True
            return True  # asked for on the way out (_settles)
        if self.info_supported is False:
            self._request_replay(out)
        else:
            self.want_replay = True
            self.outstanding = "info"
            out.append((REQUEST_INFO,))
        return True

    # -- internals ----------------------------------------------------------------------

    def _after_repair(self, out: list[tuple[Any, ...]]) -> None:
        if self.gap_open:
            self.gap_open = False
            out.append((REPAIRED, self.expected))
        if self.suspect:
            # The session's header came before the reconnect: ask who the publisher is now.
            self.outstanding = "info"
            out.append((REQUEST_INFO,))

    def _apply_snapshot(self, out: list[tuple[Any, ...]]) -> None:
        """The snapshot in flight is complete: it covers every seq up to its own, and what
        was held past it is delivered after it."""
        seq, parts = self.snapshot_seq, self.snapshot_parts
        self.snapshot_seq, self.snapshot_parts = None, []
        expected = self.expected
        if seq is None or expected is None or seq < expected - 1:
            return  # no header, over the bound, or older than what was delivered: not usable
        for held in [s for s in self.pending if s <= seq]:
            del self.pending[held]
        self.expected = seq + 1
        self.heal_wanted = self.heal_deferred = False
        out.append((SNAPSHOT, seq, parts))
        self._flush(out)
        if self.pending:
            self._repair(out)

    def _release(self, out: list[tuple[Any, ...]]) -> None:
        """The instance is settled: what was held since the reconnect is live input again."""
        if not self.suspect:
            return
        self.suspect = False
        held, self.held = self.held, {}
        for seq, payload in held.items():
            self.live(seq, payload, out)

    def _join(self, seq: int, payload: bytes, out: list[tuple[Any, ...]]) -> None:
        if seq == 0 or self.join != "start" or not self.can_replay:
            self.expected = seq
            self._deliver(seq, payload, out)
            return
        self.expected = 0
        self.pending[seq] = payload
        self._repair(out)

    def _repair(self, out: list[tuple[Any, ...]]) -> None:
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
        out.append((REQUEST_INFO,))

    def _request_replay(self, out: list[tuple[Any, ...]]) -> None:
        expected = self.expected
        assert expected is not None
        self.want_replay = False
        self.outstanding = "replay"
        self.replay_first = True
        self.replay_progress = False
        entry = self.recent[(expected - 1) & _MASK] if expected else None
        overlap = entry is not None and entry[0] == expected - 1
        out.append((REQUEST_REPLAY, expected - 1 if overlap else expected))

    def _hold_until_told(self, out: list[tuple[Any, ...]]) -> None:
        """Hold live batches until the publisher says who it is (an info answer)."""
        if self.suspect:
            return
        self.suspect = True
        self.held = {}
        if self.outstanding is None:
            self.outstanding = "info"
            out.append((REQUEST_INFO,))

    def _same_as_delivered(self, seq: int, payload: bytes) -> bool | None:
        """Whether `payload` has the bytes delivered under `seq`; None when `seq` is outside
        the recent window (or was never delivered), so nothing can be said."""
        entry = self.recent[seq & _MASK]
        if entry is None or entry[0] != seq:
            return None
        return entry[1] == fingerprint(payload)

    def _deliver(self, seq: int, payload: bytes, out: list[tuple[Any, ...]]) -> None:
        self.expected = seq + 1
        self.recent[seq & _MASK] = (seq, fingerprint(payload))
        out.append((DELIVER, seq, payload))

    def _flush(self, out: list[tuple[Any, ...]]) -> None:
        pending = self.pending
        while self.expected in pending:
            seq = self.expected
            assert seq is not None
            self._deliver(seq, pending.pop(seq), out)

    def _skip_to(self, target: int, reason: str, out: list[tuple[Any, ...]]) -> None:
        """Move `expected` to `target`: held batches below it are delivered in order, every
        seq in between that is not held is reported lost."""
        assert self.expected is not None
        missing_from = self.expected
        for seq in sorted(s for s in self.pending if s < target):
            payload = self.pending.pop(seq)
            if seq > missing_from:
                out.append((LOST, missing_from, seq - 1, reason, self.epoch))
                self.heal_wanted = self.heal
            self._deliver(seq, payload, out)
            missing_from = seq + 1
        if target > missing_from:
            out.append((LOST, missing_from, target - 1, reason, self.epoch))
            self.heal_wanted = self.heal
        self.expected = target

    def _place(self, seq: int, payload: bytes) -> None:
        """A replayed batch met a held one under the same seq: decide which instance holds what."""
        assert self.unverified is not None
        order = list(self.unverified)
        index = order.index(seq)
        same = self.unverified[seq] == payload
        old = order[: index + (0 if same else 1)]
        self.late += len(old)
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

    def _restart(self, reason: str, seen_live: bool, out: list[tuple[Any, ...]]) -> None:
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
                    (
                        LOST,
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
        self.held = {}
        self.outstanding = None
        self.want_replay = False
        self.gap_open = False
        self.heal_wanted = self.heal_deferred = False
        self.snapshot_seq, self.snapshot_parts = None, []
        self.epoch += 1
        self.expected = None
        self.last_live = None
        self.recent = [None] * RECENT
        self.unverified = None if seen_live else held
        out.append((RESET, self.epoch, reason))
