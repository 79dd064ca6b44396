"""The publisher's replay service: a ROUTER socket, the ring buffer it serves from, and the
replay sessions in flight.

The live sender writes every batch into `ring` (indexed by seq, so a session seeks to its
start in O(1)) before sending it; the publisher thread calls `take_requests` and `serve`
between live chunks. Serving sends at most `chunk` entries per call through the sender
rendered for this publisher's reply shape, so live publishing never waits behind a long
replay. A peer whose pipe is full (EAGAIN under ROUTER_MANDATORY) is paused and resumed
on a later round, so no entry and no END marker is ever silently dropped (sglang#38945).

With snapshots on, a snapshot request is answered from a copy of the live block set taken
when the request is read (so it is consistent as of the newest seq published then), rebuilt
and encoded a batch at a time between live chunks, then END. Every peer that asks while no
new seq was published shares that copy (a cut): 300 peers asking at once cost one copy, not
300. Snapshots and replays are served in the same rounds, so a peer that asks for a snapshot
and never reads holds up no one; a session that makes no progress for `STALL_SECONDS` is
dropped (counted in `stalled`), which frees its share of the cut.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, cast

import zmq

from . import endpoints
from .blockset import BlockSet
from .closing import close_socket
from .errors import FrameError
from .ratelimit import RateLimitedLog
from .security import CurveServer, warn_if_exposed
from .wire import ReplaySession, RingEntry, Wire

logger = logging.getLogger("kvevents.publisher")


class _Cut:
    """The block set as of one seq, rebuilt and encoded a batch at a time as the furthest
    session needs it, and shared by every session that asked for it."""

    __slots__ = ("batches", "done", "next_seq", "payloads", "seq")

    def __init__(self, batches: Iterator[list[Any]], next_seq: int, seq: bytes) -> None:
        self.batches = batches
        self.next_seq = next_seq
        self.seq = seq
        self.payloads: list[bytes] = []
        self.done = False


class _SnapshotSession:
    """One peer's snapshot in flight: how far into its cut it is, and the frames a full peer
    did not take."""

    __slots__ = ("cut", "ending", "frames", "identity", "position", "progressed")

    def __init__(self, identity: bytes, cut: _Cut) -> None:
        self.identity = identity
        self.cut = cut
        self.position = 0
        self.frames: tuple[bytes, ...] | None = None
        self.ending = False
        """Every batch was taken; `frames` is the END marker."""
        self.progressed = time.monotonic()


class ReplayService:
    MAX_REQUESTS_PER_ROUND = 64
    """Requests read per round, so a flood of them cannot starve live publishing."""
    MAX_SESSIONS = 256
    """Replays in flight at once; each peer (DEALER identity) has at most one."""
    SNAPSHOT_CHUNK = 16
    """Snapshot batches (of up to 1024 blocks each) sent between two live chunks."""
    MAX_CUTS = 2
    """Copies of the block set held at once (each shared by every session at its seq)."""
    STALL_SECONDS = 30.0
    """A session (replay or snapshot) whose peer takes nothing for this long is dropped."""
    MAX_SESSION_BYTES = 64 << 20
    """Payload bytes one replay sends before its END; the subscriber reads that END and asks
    again from where it is, so an honest peer gets everything and no peer is sent more than
    this unread per request."""
    MAX_REPLAY_BYTES = 256 << 20
    """Payload bytes all open replays together may have sent; a request beyond it is told
    busy and retries."""
    PEER_QUEUE_MESSAGES = 128
    """ZMQ_SNDHWM of the ROUTER: replies queued per peer before its session pauses."""
    MAX_REQUEST_BYTES = 1024
    """ZMQ_MAXMSGSIZE of the ROUTER: a peer sending a larger frame is disconnected."""

    def __init__(
        self,
        wire: Wire,
        context: zmq.Context,
        endpoint: str | None,
        capacity: int,
        topic: bytes,
        with_topic: bool,
        chunk: int,
        send: Any,
        dialect: str = "",
        blocks: BlockSet | None = None,
        rank: int | None = None,
        curve: CurveServer | None = None,
    ) -> None:
        self.capacity = capacity
        self.blocks = blocks
        """The live block set, when snapshots are on."""
        self._rank = rank
        self.snapshots: deque[_SnapshotSession] = deque()
        self.snapshot_requests = 0
        self.snapshot_batches = 0
        self.snapshot_cuts = 0
        """Copies of the block set taken (sessions asking at the same seq share one)."""
        self.stalled = 0
        self._stall_check = 0.0
        self._cut: _Cut | None = None
        self.instance = os.urandom(16)
        """Drawn at start: an info reply with another instance tells a subscriber of a restart."""
        self._dialect = dialect
        self.ring: list[RingEntry | None] = [None] * capacity
        self.sessions: deque[ReplaySession] = deque()
        self.chunk = chunk
        self.with_topic = with_topic
        self._wire = wire
        self._send_chunk = wire.replay_senders[with_topic]
        self._topic = topic
        self._invalid_log = RateLimitedLog(logger)
        self.requests = 0
        self.info_requests = 0
        self.invalid = 0
        self.rejected_busy = 0
        self.unreachable = 0
        self.replayed = 0
        self.socket: zmq.Socket | None = None
        self.endpoint: str | None = None
        if endpoint is None:
            return
        sock = context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Messages queued per peer: with the byte budgets below this bounds what a peer
            # that never reads pins in its pipe. A full peer pauses its session (EAGAIN), so
            # nothing is lost when a replay is longer than this.
            sock.setsockopt(zmq.SNDHWM, self.PEER_QUEUE_MESSAGES)
            # A full peer makes send raise EAGAIN instead of silently dropping the rest of the
            # replay and its END marker; the session resumes later.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, self.MAX_REQUEST_BYTES)
            if curve is not None:
                curve.apply(sock, context)
            warn_if_exposed(endpoint, curve)
            self.endpoint = endpoints.attach(sock, endpoint, True)
        except BaseException:
            sock.close(linger=0)
            raise
        self.socket = sock
        self._send = send(sock)
        self._encode = wire.new_encoder()

    def oldest(self, next_seq: int) -> int:
        """The oldest seq still in the ring when `next_seq` is the next to be published."""
        return next_seq - self.capacity if next_seq > self.capacity else 0

    def has_requests(self) -> bool:
        assert self.socket is not None
        return bool(cast(int, self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def take_requests(self, next_seq: int) -> None:
        """Read pending requests (a bounded number) into sessions ending at `next_seq`."""
        sock = self.socket
        assert sock is not None
        oldest = self.oldest(next_seq)
        parse = self._wire.parse_replay_request
        info_start = self._wire.end_seq
        for _ in range(self.MAX_REQUESTS_PER_ROUND):
            try:
                request = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.requests += 1
            try:
                identity, start, flag = parse(request)
            except FrameError as exc:
                self.invalid += 1
                self._invalid_log.warning("kvevents: invalid replay request ignored: %s", exc)
                continue
            if start == info_start:
                self.info_requests += 1
                self._send_info(identity, next_seq, busy=False)
                continue
            with_info = flag != ""
            busy = (
                len(self.sessions) + len(self.snapshots) >= self.MAX_SESSIONS
                or (flag != "snapshot" and self.replay_bytes_in_flight() >= self.MAX_REPLAY_BYTES)
                or any(s.identity == identity for s in self.sessions)
                or any(s.identity == identity for s in self.snapshots)
                or (flag == "snapshot" and self._needs_new_cut(next_seq))
            )
            if busy:
                # One replay per peer: a peer asking for full replays and never reading them
                # holds one slot, not all of them. A peer that speaks info is told to retry.
                self.rejected_busy += 1
                self._invalid_log.warning(
                    "kvevents: replay request refused: %d replays in flight, one per peer",
                    len(self.sessions),
                )
                if with_info:
                    self._send_info(identity, next_seq, busy=True)
                continue
            if with_info:
                self._send_info(identity, next_seq, busy=False)
            if flag == "snapshot":
                self.snapshot_requests += 1
                self._start_snapshot(identity, next_seq)
                continue
            # A start older than the buffer begins at the oldest retained batch: the first
            # replayed seq tells the client how much history was lost.
            self.sessions.append(
                ReplaySession(
                    identity,
                    max(start, oldest),
                    next_seq,
                    self.MAX_SESSION_BYTES,
                    time.monotonic(),
                )
            )

    def replay_bytes_in_flight(self) -> int:
        """Payload bytes the open replays have sent so far."""
        budget = self.MAX_SESSION_BYTES
        return sum(budget - session.bytes_left for session in self.sessions)

    def _drop_stalled_replays(self, now: float) -> None:
        """A replay session whose next seq has not moved for `STALL_SECONDS` holds a slot and
        a share of the byte budget for a peer that does not read: drop it (its peer's request
        times out)."""
        kept: deque[ReplaySession] = deque()
        for session in self.sessions:
            if session.next != session.next_then:
                session.next_then = session.next
                session.progressed = now
            elif now - session.progressed > self.STALL_SECONDS:
                self.stalled += 1
                continue
            kept.append(session)
        self.sessions = kept

    def _send_info(self, identity: bytes, next_seq: int, busy: bool) -> None:
        wire = self._wire
        info = wire.new_info(
            instance=self.instance,
            next_seq=next_seq,
            oldest_seq=self.oldest(next_seq),
            topic=self._topic.decode("utf-8", "replace"),
            dialect=self._dialect,
            schema_version=wire.schema_version,
            busy=busy,
            snapshots=self.blocks is not None,
        )
        frames = wire.pack_info_reply(
            identity, self._topic, wire.encode_info(info), self.with_topic
        )
        assert self.socket is not None
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.unreachable += 1  # a full or vanished peer: its request times out and retries

    def _needs_new_cut(self, next_seq: int) -> bool:
        """A snapshot asked at `next_seq` would need another copy of the block set while
        `MAX_CUTS` are held by sessions still streaming: the peer is told to retry."""
        cut = self._cut
        if cut is not None and cut.next_seq == next_seq:
            return False
        return len({id(s.cut) for s in self.snapshots}) >= self.MAX_CUTS

    def _start_snapshot(self, identity: bytes, next_seq: int) -> None:
        """The info header just sent says next_seq; the snapshot is as of the seq before it.
        A publisher without snapshots answers with the header and END: nothing to rebuild."""
        cut = self._cut
        if cut is None or cut.next_seq != next_seq:
            batches = iter(()) if self.blocks is None else self.blocks.freeze()
            cut = _Cut(batches, next_seq, self._wire.seq_bytes(max(next_seq - 1, 0)))
            self.snapshot_cuts += 1
            self._cut = cut
        self.snapshots.append(_SnapshotSession(identity, cut))

    def serve(self, next_seq: int) -> bool:
        """One chunk across the open sessions; True when anything was sent. An idle
        publisher comes straight back for the next chunk instead of waiting out its idle
        poll, and waits only when every peer is full."""
        served = self._serve_snapshots() if self.snapshots else False
        if not self.sessions:
            return served
        sent, gone = self._send_chunk(
            self.sessions,
            self.ring,
            self.capacity,
            self.oldest(next_seq),
            self._send,
            self._topic,
            self.chunk,
        )
        self.replayed += sent
        self.unreachable += gone
        now = time.monotonic()
        if now >= self._stall_check:
            self._stall_check = now + 1.0
            self._drop_stalled_replays(now)
        return served or sent > 0

    def _payload(self, cut: _Cut, position: int) -> bytes | None:
        """The cut's batch at `position`, encoded once for every session; None past its end."""
        payloads = cut.payloads
        while len(payloads) <= position and not cut.done:
            events = next(cut.batches, None)
            if events is None:
                cut.done = True
                break
            assert self.blocks is not None
            payloads.append(self._encode(self.blocks.shape.make_batch(events, self._rank)))
        return payloads[position] if position < len(payloads) else None

    def _serve_snapshots(self) -> bool:
        """Up to `SNAPSHOT_CHUNK` snapshot batches across the snapshot sessions, round-robin."""
        assert self.socket is not None
        pack_reply = self._wire.pack_reply
        pack_end = self._wire.pack_end
        sent = 0
        now = time.monotonic()
        for _ in range(len(self.snapshots)):
            session = self.snapshots.popleft()
            finished = False
            while sent < self.SNAPSHOT_CHUNK:
                if session.frames is None:
                    payload = self._payload(session.cut, session.position)
                    if payload is None:
                        session.frames = pack_end(session.identity, self.with_topic)
                        session.ending = True
                    else:
                        session.frames = pack_reply(
                            session.identity,
                            self._topic,
                            session.cut.seq,
                            payload,
                            self.with_topic,
                        )
                try:
                    # Not copied: a peer that does not read holds references to the cut's
                    # payloads in its pipe, not copies of them.
                    self.socket.send_multipart(session.frames, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    if now - session.progressed > self.STALL_SECONDS:
                        self.stalled += 1  # a peer that never reads: give its share back
                        finished = True
                    break  # the peer is full: resume on a later round
                except zmq.ZMQError:
                    self.unreachable += 1  # the peer is gone
                    finished = True
                    break
                sent += 1
                session.frames = None
                session.position += 1
                session.progressed = now
                if session.ending:
                    finished = True
                    break
                self.snapshot_batches += 1
            if not finished:
                self.snapshots.append(session)
        if self._cut is not None and not any(s.cut is self._cut for s in self.snapshots):
            self._cut = None  # no session holds it: the copy is freed
        return sent > 0

    def close(self) -> None:
        if self.socket is not None:
            close_socket(self.socket)
