"""The dialect-independent half of the ZeroMQ publisher: sockets, queue policy, replay
bookkeeping, counters and shutdown. Each dialect module subclasses it with a generated
`publish()` and publisher loop specialised for that dialect's batch and reply shape.

Threading: sockets are created by the constructor and then owned by one daemon thread,
"zmq-publisher", which also closes them. The caller's thread only touches the hand-off
deque (whose append/popleft are atomic) and plain attributes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import zmq

from . import endpoints, frames
from ._ratelimit import RateLimitedLog
from .errors import FrameError

logger = logging.getLogger("kvevents.publisher")

QueueFullPolicy = Literal["drop_newest", "drop_oldest", "block"]
QUEUE_FULL_POLICIES = ("drop_newest", "drop_oldest", "block")


def unwrapped_send(sock: zmq.Socket) -> Callable[..., Any]:
    """`sock.send` minus pyzmq's Python-level wrapper, which only handles the draft
    `routing_id`/`group` arguments and costs as much as the send itself: the three frame
    sends of a batch take half the time through the backend method."""
    return types.MethodType(zmq.backend.Socket.send, sock)


class ZmqPublisherCore:
    SHUTDOWN_TIMEOUT: float = 1.0
    END_SEQ = frames.END_SEQ
    LIVE_CHUNK = 256
    """Live batches sent between two looks at the replay socket."""
    REPLAY_CHUNK = 256
    """Replayed entries sent between two live chunks, so a long replay never stalls live."""
    MAX_REQUESTS_PER_ROUND = 64
    """Replay requests read per round, so a flood of them cannot starve live publishing."""
    MAX_REPLAY_SESSIONS = 256
    MAX_REQUEST_BYTES = 1024
    """ZMQ_MAXMSGSIZE of the replay socket: a peer sending a larger frame is disconnected."""
    IDLE_POLL_MS = 100

    def _start(
        self,
        rank: int,
        endpoint: str,
        replay_endpoint: str | None,
        buffer_steps: int,
        hwm: int,
        max_queue_size: int,
        topic: str,
        bind: bool | None,
        queue_full_policy: QueueFullPolicy,
        block_timeout: float,
        reply_with_topic: bool,
        shutdown_timeout: float | None,
    ) -> None:
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be at least 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if queue_full_policy not in QUEUE_FULL_POLICIES:
            raise ValueError(f"queue_full_policy must be one of {QUEUE_FULL_POLICIES}")
        self._rank = rank
        self._queue: deque[Any] = deque()
        self._max_queue = max_queue_size
        self._policy = queue_full_policy
        self._block_timeout = block_timeout
        self._capacity = buffer_steps
        self._ring: list[tuple[int, bytes, bytes] | None] = [None] * buffer_steps
        self._topic_bytes = topic.encode("utf-8")
        self._reply_with_topic = reply_with_topic
        self._shutdown_timeout = self.SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout

        self._configured_endpoint = endpoints.offset_endpoint_port(endpoint, rank)
        self._configured_replay_endpoint = endpoints.offset_endpoint_port(replay_endpoint, rank)
        self._ctx = zmq.Context.instance()
        self._pub: zmq.Socket = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket | None = None
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.set_hwm(hwm)
            assert self._configured_endpoint is not None
            self._pub_bound = endpoints.should_bind(self._configured_endpoint, bind)
            self._endpoint = endpoints.attach(self._pub, self._configured_endpoint, bind)
            if self._configured_replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                # A full replay plus its END marker fits even with stale acknowledgements.
                self._replay.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
                # A full peer makes send raise EAGAIN instead of silently dropping the rest of
                # the replay and its END marker (sglang#38945); the session resumes later.
                self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self._replay.setsockopt(zmq.MAXMSGSIZE, self.MAX_REQUEST_BYTES)
                self._replay_endpoint: str | None = endpoints.attach(
                    self._replay, self._configured_replay_endpoint, True
                )
            else:
                self._replay_endpoint = None
        except BaseException:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)
            raise

        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._idle = False
        self._closed = False
        self._stopping = False
        self._abandon = False
        self._want_space = False
        self._space = threading.Event()
        self._sessions: deque[list[Any]] = deque()
        self._invalid_log = RateLimitedLog(logger)
        self._failure_log = RateLimitedLog(logger)

        self._next_seq = 0
        self._published = 0
        self._dropped_queue_full = 0
        self._dropped_oldest = 0
        self._dropped_block_timeout = 0
        self._undelivered = 0
        self._encode_failures = 0
        self._send_failures = 0
        self._replay_requests = 0
        self._replay_invalid = 0
        self._replay_rejected_busy = 0
        self._replay_unreachable = 0
        self._replayed_batches = 0
        self._shutdown_lock = threading.Lock()
        self._shutdown_done = False

        self._thread = threading.Thread(target=self._run, daemon=True, name="zmq-publisher")
        self._thread.start()
        atexit.register(self.shutdown)

    # -- caller side -------------------------------------------------------------------

    def _on_full(self, batch: Any) -> None:
        """The queue is full: apply the configured policy; never raise, never wait unbounded."""
        policy = self._policy
        if policy == "drop_oldest":
            try:
                self._queue.popleft()
            except IndexError:
                pass
            self._dropped_oldest += 1
            self._queue.append(batch)
            return
        if policy == "block":
            deadline = time.monotonic() + self._block_timeout
            while len(self._queue) >= self._max_queue and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._dropped_block_timeout += 1
                    return
                self._space.clear()
                self._want_space = True
                self._wake()
                self._space.wait(remaining)
            self._queue.append(batch)
            return
        self._dropped_queue_full += 1

    def _wake(self) -> None:
        self._idle = False
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the thread; a closed one means it is gone

    # -- publisher-thread side ------------------------------------------------------------

    def _run(self) -> None:  # pragma: no cover - replaced by the generated loop
        raise NotImplementedError

    def _encode_failed(self, batch: Any, exc: BaseException) -> None:
        self._encode_failures += 1
        self._failure_log.warning(
            "kvevents: batch of type %s not encoded, no seq used: %s", type(batch).__name__, exc
        )

    def _send_failed(self, seq: int, exc: BaseException) -> None:
        self._send_failures += 1
        self._failure_log.warning(
            "kvevents: send of seq %d failed (%s); it stays in the replay buffer", seq, exc
        )

    def _signal_space(self) -> None:
        self._want_space = False
        self._space.set()

    def _idle_wait(self, poller: zmq.Poller) -> None:
        self._idle = True
        if self._queue or self._stopping:
            self._idle = False
            return
        timeout = 1 if self._sessions else self.IDLE_POLL_MS
        ready = dict(poller.poll(timeout))
        self._idle = False
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _make_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        return poller

    def _take_requests(self) -> None:
        """Read pending replay requests (a bounded number) into replay sessions."""
        replay = self._replay
        assert replay is not None
        next_seq = self._next_seq
        oldest = next_seq - self._capacity if next_seq > self._capacity else 0
        for _ in range(self.MAX_REQUESTS_PER_ROUND):
            try:
                request = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._replay_requests += 1
            try:
                identity, start = frames.parse_replay_request(request)
            except FrameError as exc:
                self._replay_invalid += 1
                self._invalid_log.warning("kvevents: invalid replay request ignored: %s", exc)
                continue
            if len(self._sessions) >= self.MAX_REPLAY_SESSIONS:
                self._replay_rejected_busy += 1
                self._invalid_log.warning("kvevents: replay request dropped: %d replays in flight", len(self._sessions))
                continue
            # A start older than the buffer begins at the oldest retained batch: the first
            # replayed seq tells the client how much history was lost.
            self._sessions.append([identity, max(start, oldest), next_seq])

    def _finish(self) -> None:
        self._undelivered = len(self._queue)
        self._queue.clear()
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    # -- public -----------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> int:
        """Send what is queued (up to `timeout`, 1 s by default), stop the thread and close
        the sockets with linger 0. Idempotent; returns how many batches were left undelivered."""
        with self._shutdown_lock:
            if self._shutdown_done:
                return self._undelivered
            self._shutdown_done = True
        timeout = self._shutdown_timeout if timeout is None else timeout
        self._closed = True
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon = True
            self._wake()
            self._thread.join(self.SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            logger.error("kvevents: publisher thread did not stop; sockets left open")
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        atexit.unregister(self.shutdown)
        if self._undelivered:
            logger.warning("kvevents: %d queued batches undelivered at shutdown", self._undelivered)
        return self._undelivered

    close = shutdown

    def __enter__(self) -> ZmqPublisherCore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def endpoint(self) -> str:
        """The PUB endpoint as bound or connected (a port 0 resolved to the real port)."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The ROUTER endpoint as bound, or None without replay."""
        return self._replay_endpoint

    @property
    def connect_endpoint(self) -> str:
        """`endpoint` as a local subscriber connects to it (wildcards become loopback)."""
        return endpoints.connectable(self._endpoint)

    @property
    def connect_replay_endpoint(self) -> str | None:
        return None if self._replay_endpoint is None else endpoints.connectable(self._replay_endpoint)

    def counters(self) -> dict[str, int]:
        """A snapshot of the publisher's counters as a plain dict."""
        return {
            "published": self._published,
            "next_seq": self._next_seq,
            "queue_depth": len(self._queue),
            "dropped_queue_full": self._dropped_queue_full,
            "dropped_oldest": self._dropped_oldest,
            "dropped_block_timeout": self._dropped_block_timeout,
            "undelivered_at_shutdown": self._undelivered,
            "encode_failures": self._encode_failures,
            "send_failures": self._send_failures,
            "replay_requests": self._replay_requests,
            "replay_invalid": self._replay_invalid,
            "replay_rejected_busy": self._replay_rejected_busy,
            "replay_unreachable": self._replay_unreachable,
            "replayed_batches": self._replayed_batches,
        }

    @staticmethod
    def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
        return endpoints.offset_endpoint_port(endpoint, data_parallel_rank)
