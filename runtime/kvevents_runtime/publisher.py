"""The dialect-independent ZeroMQ publisher: sockets, queue policy, the publisher thread,
its replay service, counters and shutdown. Each generated dialect face subclasses it with
the producer's constructor and `publish()`; the frames themselves are sent by the chunk
senders of the `Wire` it is given.

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

from . import endpoints
from .blockset import BlockSet, BlockShape
from .closing import close_socket
from .ratelimit import RateLimitedLog
from .replay import ReplayService
from .security import CurveServer, warn_if_exposed
from .wire import Wire

logger = logging.getLogger("kvevents.publisher")

QueueFullPolicy = Literal["drop_newest", "drop_oldest", "block"]
QUEUE_FULL_POLICIES = ("drop_newest", "drop_oldest", "block")


def unwrapped_send(sock: zmq.Socket) -> Callable[..., Any]:
    """`sock.send` minus pyzmq's Python-level wrapper, which only handles the draft
    `routing_id`/`group` arguments and costs as much as the send itself: the three frame
    sends of a batch take half the time through the backend method."""
    return types.MethodType(zmq.backend.Socket.send, sock)


def _tracking(
    encode: Callable[[Any], bytes], apply: Callable[[Any], None]
) -> Callable[[Any], bytes]:
    """An encoder that also applies each batch to the live block set, once it is encoded
    (a batch that fails to encode is never published, so it never changes the set)."""

    def encode_and_track(batch: Any) -> bytes:
        payload = encode(batch)
        apply(batch)
        return payload

    return encode_and_track


class ZmqPublisherCore:
    """The publisher every dialect face builds on; `wire` is set by the generated face."""

    wire: Wire
    SHUTDOWN_TIMEOUT: float = 1.0
    LIVE_CHUNK = 256
    """Live batches sent between two looks at the replay socket."""
    REPLAY_CHUNK = 256
    """Replayed entries sent between two live chunks, so a long replay never stalls live."""
    IDLE_POLL_MS = 100
    DRAIN_SECONDS = 0.005
    """After a round that sent replay or snapshot frames, this long counts as draining."""
    DRAIN_PAUSE = 0.0001
    """The wait between rounds while draining (a poll's least wait is a millisecond)."""

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
        resolve_ephemeral: Callable[[str], str] | None = None,
        dialect: str = "",
        snapshot_shape: BlockShape | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveServer | None = None,
    ) -> None:
        """`curve`: CURVE keys and allowed clients for both sockets (None: from the
        environment, `kvevents_runtime.security`; plain when it says nothing).
        `resolve_ephemeral` rewrites a wildcard tcp endpoint with port 0 before it is
        bound (vLLM binds the node IP there, so the advertised endpoint is dialable).
        `snapshot_shape` turns snapshots on: the thread keeps the live block set."""
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be at least 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if snapshot_shape is not None and replay_endpoint is None:
            raise ValueError("snapshots are served on the replay socket: give a replay_endpoint")
        if queue_full_policy not in QUEUE_FULL_POLICIES:
            raise ValueError(f"queue_full_policy must be one of {QUEUE_FULL_POLICIES}")
        self._rank = rank
        self._queue: deque[Any] = deque()
        self._max_queue = max_queue_size
        self._policy = queue_full_policy
        self._block_timeout = block_timeout
        self._topic_bytes = topic.encode("utf-8")
        self._shutdown_timeout = (
            self.SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
        )

        endpoints.check_rank_ports(endpoint, replay_endpoint, rank)
        configured = endpoints.offset_endpoint_port(endpoint, rank)
        assert configured is not None
        configured_replay = endpoints.offset_endpoint_port(replay_endpoint, rank)
        if resolve_ephemeral is not None:
            configured = resolve_ephemeral(configured)
            if configured_replay is not None:
                configured_replay = resolve_ephemeral(configured_replay)
        self._configured_endpoint = configured
        self._configured_replay_endpoint = configured_replay
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context.instance()
        self._curve = curve if curve is not None else CurveServer.from_env()
        self._pub: zmq.Socket = self._ctx.socket(zmq.PUB)
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.set_hwm(hwm)
            if self._curve is not None:
                self._curve.apply(self._pub, self._ctx)
            warn_if_exposed(configured, self._curve)
            self._pub_bound = endpoints.should_bind(configured, bind)
            self._endpoint = endpoints.attach(self._pub, configured, bind)
            self._replay = ReplayService(
                self.wire,
                self._ctx,
                configured_replay,
                buffer_steps,
                self._topic_bytes,
                reply_with_topic,
                self.REPLAY_CHUNK,
                unwrapped_send,
                dialect,
                None if snapshot_shape is None else BlockSet(snapshot_shape),
                rank,
                self._curve,
            )
        except BaseException:
            self._pub.close(linger=0)
            raise

        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._idle = False
        self._closed = False
        self._stopping = False
        self._abandon = False
        self._want_space = False
        self._draining_until = 0.0
        self._space = threading.Event()
        self._failure_log = RateLimitedLog(logger)

        self._next_seq = 0
        self._sending = False
        """Set by the thread before it takes a chunk off the queue and cleared once that
        chunk's seqs are counted: a batch can be off the queue and not yet in `_next_seq`."""
        self._published = 0
        self._dropped_queue_full = 0
        self._dropped_oldest = 0
        self._dropped_block_timeout = 0
        self._undelivered = 0
        self._encode_failures = 0
        self._send_failures = 0
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
        except OSError:
            pass  # a full pipe already wakes the thread; a closed one means it is gone

    # -- publisher-thread side ------------------------------------------------------------

    def _run(self) -> None:
        take = self._queue.popleft
        send = unwrapped_send(self._pub)
        send_chunk = self.wire.send_live_chunk
        encode = self.wire.new_encoder()
        if self._replay.blocks is not None:
            encode = _tracking(encode, self._replay.blocks.apply)
        topic = self._topic_bytes
        replay = self._replay
        serving = replay.socket is not None
        ring = replay.ring
        capacity = replay.capacity
        chunk = self.LIVE_CHUNK
        encode_failed = self._encode_failed
        send_failed = self._send_failed
        poller = self._make_poller()
        seq = 0
        published = 0
        try:
            while not self._abandon:
                self._sending = True
                seq, taken, sent = send_chunk(
                    take,
                    send,
                    topic,
                    encode,
                    ring,
                    capacity,
                    seq,
                    chunk,
                    encode_failed,
                    send_failed,
                )
                published += sent
                self._next_seq = seq
                self._published = published
                self._sending = False  # after the seqs: see flushed_next_seq
                if serving:
                    if replay.has_requests():
                        replay.take_requests(seq)
                    if (replay.sessions or replay.snapshots) and replay.serve(seq):
                        self._draining_until = time.monotonic() + self.DRAIN_SECONDS
                        if not taken:
                            continue
                if taken:
                    if self._want_space:
                        self._signal_space()
                    continue
                if self._stopping:
                    break
                self._idle_wait(poller)
        finally:
            self._next_seq = seq
            self._published = published
            self._sending = False
            self._finish()

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
        busy = self._replay.sessions or self._replay.snapshots
        if busy and time.monotonic() < self._draining_until:
            # A peer is reading: its pipe (PEER_QUEUE_MESSAGES) drains in microseconds, so
            # come back sooner than a poll's millisecond (a new batch waits no longer either).
            time.sleep(self.DRAIN_PAUSE)
            self._idle = False
            return
        timeout = 1 if busy else self.IDLE_POLL_MS
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
        if self._replay.socket is not None:
            poller.register(self._replay.socket, zmq.POLLIN)
        return poller

    def _finish(self) -> None:
        self._undelivered = len(self._queue)
        self._queue.clear()
        close_socket(self._pub)
        self._replay.close()

    # -- public -----------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> int:
        """Send what is queued (up to `timeout`, 1 s by default), stop the thread and close
        the sockets (runtime/kvevents_runtime/closing.py says why not with linger 0). Idempotent; returns how many batches were left undelivered."""
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
    def closed(self) -> bool:
        """True once shutdown() ran and the publisher thread closed its sockets."""
        return self._closed and self._pub.closed

    @property
    def thread(self) -> threading.Thread:
        """The publisher thread ("zmq-publisher"), e.g. to measure its CPU time."""
        return self._thread

    @property
    def topic(self) -> str:
        """The topic frame of every live message."""
        return self._topic_bytes.decode("utf-8")

    @property
    def instance(self) -> bytes:
        """16 random bytes drawn at start; info replies carry them, so subscribers see restarts."""
        return self._replay.instance

    @property
    def buffer_steps(self) -> int:
        """How many batches the replay buffer holds."""
        return self._replay.capacity

    @property
    def endpoint(self) -> str:
        """The PUB endpoint as bound or connected (a port 0 resolved to the real port)."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The ROUTER endpoint as bound, or None without replay."""
        return self._replay.endpoint

    @property
    def advertised_endpoint(self) -> str:
        """The PUB endpoint as configured (after the rank offset), a port 0 replaced by the
        bound port: what a remote subscriber is told to dial (vLLM's published config)."""
        return endpoints.advertised(self._configured_endpoint, self._endpoint)

    @property
    def advertised_replay_endpoint(self) -> str | None:
        bound = self._replay.endpoint
        if bound is None or self._configured_replay_endpoint is None:
            return None
        return endpoints.advertised(self._configured_replay_endpoint, bound)

    @property
    def connect_endpoint(self) -> str:
        """`endpoint` as a local subscriber connects to it (wildcards become loopback)."""
        return endpoints.connectable(self._endpoint)

    @property
    def connect_replay_endpoint(self) -> str | None:
        endpoint = self._replay.endpoint
        return None if endpoint is None else endpoints.connectable(endpoint)

    def flushed_next_seq(self) -> int | None:
        """The next seq, once every batch published before this call has left the thread's
        hands (sent, failed and kept for replay, or dropped); None while any is still queued
        or being sent. What a tool that waits for a stream to be complete compares with a
        subscriber's expected seq: `counters()` reads one field at a time, so its queue depth
        can read 0 while a batch just taken off the queue has no seq yet."""
        # Read in the order opposite to the thread's writes (sending set, queue popped, seq
        # counted, sending cleared): a batch that left the queue before the first read
        # either is still being sent at the second, or its seq is counted by the third.
        if self._queue:
            return None
        if self._sending:
            return None
        return self._next_seq

    def counters(self) -> dict[str, int]:
        """A snapshot of the publisher's counters as a plain dict; `live_blocks` and
        `untracked_events` only with snapshots on."""
        replay = self._replay
        counters = {
            "published": self._published,
            "next_seq": self._next_seq,
            "oldest_seq": replay.oldest(self._next_seq),
            "queue_depth": len(self._queue),
            "dropped_queue_full": self._dropped_queue_full,
            "dropped_oldest": self._dropped_oldest,
            "dropped_block_timeout": self._dropped_block_timeout,
            "undelivered_at_shutdown": self._undelivered,
            "encode_failures": self._encode_failures,
            "send_failures": self._send_failures,
            "curve_refused": 0 if self._curve is None else self._curve.refused,
            "replay_requests": replay.requests,
            "info_requests": replay.info_requests,
            "replay_invalid": replay.invalid,
            "replay_rejected_busy": replay.rejected_busy,
            "replay_unreachable": replay.unreachable,
            "replayed_batches": replay.replayed,
            "snapshot_requests": replay.snapshot_requests,
            "snapshot_batches": replay.snapshot_batches,
            "snapshot_cuts": replay.snapshot_cuts,
            "sessions_stalled": replay.stalled,
            "replay_bytes_in_flight": replay.replay_bytes_in_flight(),
        }
        if replay.blocks is not None:  # only a publisher with snapshots keeps the block set
            counters["live_blocks"] = len(replay.blocks)
            counters["untracked_events"] = replay.blocks.untracked
        return counters

    @staticmethod
    def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
        return endpoints.offset_endpoint_port(endpoint, data_parallel_rank)
