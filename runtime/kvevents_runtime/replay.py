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
and encoded a batch at a time between live chunks, then END.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from typing import Any, cast

import zmq

from . import endpoints
from .blockset import BlockSet
from .closing import close_socket
from .errors import FrameError
from .ratelimit import RateLimitedLog
from .wire import RingEntry, Wire

logger = logging.getLogger("kvevents.publisher")


class _SnapshotSession:
    """One snapshot in flight: its rebuilt batches, and the frames a full peer did not take."""

    __slots__ = ("batches", "ending", "frames", "identity", "seq")

    def __init__(self, identity: bytes, batches: Iterator[list[Any]], seq: bytes) -> None:
        self.identity = identity
        self.batches = batches
        self.seq = seq
        self.frames: tuple[bytes, ...] | None = None
        self.ending = False
        """Every batch was taken; `frames` is the END marker."""


class ReplayService:
    MAX_REQUESTS_PER_ROUND = 64
    """Requests read per round, so a flood of them cannot starve live publishing."""
    MAX_SESSIONS = 256
    """Replays in flight at once; each peer (DEALER identity) has at most one."""
    SNAPSHOT_CHUNK = 16
    """Snapshot batches (of up to 1024 blocks each) sent between two live chunks."""
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
    ) -> None:
        self.capacity = capacity
        self.blocks = blocks
        """The live block set, when snapshots are on."""
        self._rank = rank
        self.snapshots: deque[_SnapshotSession] = deque()
        self.snapshot_requests = 0
        self.snapshot_batches = 0
        self.instance = os.urandom(16)
        """Drawn at start: an info reply with another instance tells a subscriber of a restart."""
        self._dialect = dialect
        self.ring: list[RingEntry | None] = [None] * capacity
        self.sessions: deque[list[Any]] = deque()
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
            # A full replay plus its END marker fits even with stale acknowledgements.
            sock.setsockopt(zmq.SNDHWM, 2 * (capacity + 1))
            # A full peer makes send raise EAGAIN instead of silently dropping the rest of the
            # replay and its END marker; the session resumes later.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, self.MAX_REQUEST_BYTES)
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
                or any(s[0] == identity for s in self.sessions)
                or any(s.identity == identity for s in self.snapshots)
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
            self.sessions.append([identity, max(start, oldest), next_seq])

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

    def _start_snapshot(self, identity: bytes, next_seq: int) -> None:
        """The info header just sent says next_seq; the snapshot is as of the seq before it.
        A publisher without snapshots answers with the header and END: nothing to rebuild."""
        batches = iter(()) if self.blocks is None else self.blocks.freeze()
        seq_frame = self._wire.seq_bytes(max(next_seq - 1, 0))
        self.snapshots.append(_SnapshotSession(identity, batches, seq_frame))

    def serve(self, next_seq: int) -> bool:
        """One chunk across the open sessions; True when anything was sent. An idle
        publisher comes straight back for the next chunk instead of waiting out its idle
        poll, and waits only when every peer is full."""
        if self.snapshots:
            return self._serve_snapshots()
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
        return sent > 0

    def _serve_snapshots(self) -> bool:
        """Up to `SNAPSHOT_CHUNK` snapshot batches across the snapshot sessions, round-robin;
        replays wait behind them (a snapshot is asked for when history is already lost)."""
        assert self.socket is not None
        pack_reply = self._wire.pack_reply
        pack_end = self._wire.pack_end
        encode = self._encode
        sent = 0
        for _ in range(len(self.snapshots)):
            session = self.snapshots.popleft()
            finished = False
            while sent < self.SNAPSHOT_CHUNK:
                if session.frames is None:
                    events = next(session.batches, None)
                    if events is None:
                        session.frames = pack_end(session.identity, self.with_topic)
                        session.ending = True
                    else:
                        assert self.blocks is not None
                        payload = encode(self.blocks.shape.make_batch(events, self._rank))
                        session.frames = pack_reply(
                            session.identity, self._topic, session.seq, payload, self.with_topic
                        )
                try:
                    self.socket.send_multipart(session.frames, zmq.NOBLOCK)
                except zmq.Again:
                    break  # the peer is full: resume on a later round
                except zmq.ZMQError:
                    self.unreachable += 1  # the peer is gone
                    finished = True
                    break
                sent += 1
                session.frames = None
                if session.ending:
                    finished = True
                    break
                self.snapshot_batches += 1
            if not finished:
                self.snapshots.append(session)
        return sent > 0

    def close(self) -> None:
        if self.socket is not None:
            close_socket(self.socket)
