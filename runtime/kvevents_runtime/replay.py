"""The publisher's replay service: a ROUTER socket, the ring buffer it serves from, and the
replay sessions in flight.

The live sender writes every batch into `ring` (indexed by seq, so a session seeks to its
start in O(1)) before sending it; the publisher thread calls `take_requests` and `serve`
between live chunks. Serving sends at most `chunk` entries per call through the sender
rendered for this publisher's reply shape, so live publishing never waits behind a long
replay. A peer whose pipe is full (EAGAIN under ROUTER_MANDATORY) is paused and resumed
on a later round, so no entry and no END marker is ever silently dropped (sglang#38945).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, cast

import zmq

from . import endpoints
from .errors import FrameError
from .ratelimit import RateLimitedLog
from .wire import RingEntry, Wire

logger = logging.getLogger("kvevents.publisher")


class ReplayService:
    MAX_REQUESTS_PER_ROUND = 64
    """Requests read per round, so a flood of them cannot starve live publishing."""
    MAX_SESSIONS = 256
    """Replays in flight at once; each peer (DEALER identity) has at most one."""
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
    ) -> None:
        self.capacity = capacity
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
                identity, start, with_info = parse(request)
            except FrameError as exc:
                self.invalid += 1
                self._invalid_log.warning("kvevents: invalid replay request ignored: %s", exc)
                continue
            if start == info_start:
                self.info_requests += 1
                self._send_info(identity, next_seq, busy=False)
                continue
            busy = len(self.sessions) >= self.MAX_SESSIONS or any(
                s[0] == identity for s in self.sessions
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
        )
        frames = wire.pack_info_reply(
            identity, self._topic, wire.encode_info(info), self.with_topic
        )
        assert self.socket is not None
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.unreachable += 1  # a full or vanished peer: its request times out and retries

    def serve(self, next_seq: int) -> bool:
        """One chunk across the open sessions; True when anything was sent. An idle
        publisher comes straight back for the next chunk instead of waiting out its idle
        poll, and waits only when every peer is full."""
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

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
