"""The consumer side: in-order batches from one or more publishers, gaps repaired by replay.

One `Source` per publisher (one per DP rank, each with its own endpoint pair). Live batches
arrive on a SUB socket, replays and info replies on a DEALER. What each source's stream
means is decided by its `Sequencer` (kvevents_runtime.sequencer, where the delivery contract
is stated); this module moves frames and turns the sequencer's answers into deliveries,
notices and requests. Notices:

- ``gap``: a live seq skipped ahead; a repair was started. ``repaired``: it completed.
- ``history_lost`` (first, last, reason): seqs that will never be delivered in this epoch.
- ``reset``: the publisher restarted (a new instance id, or a live seq going backwards
  against a publisher without info); the new stream is delivered from its first seq still
  available, under the next `epoch`.
- ``decode_error``: a payload that is not a batch; ``event_errors``: a batch with
  undecodable events (the good ones are delivered); ``malformed``: a frame list of the wrong
  shape, a seq that is the END marker, or another topic; dropped and counted.
- ``overflow``: live batches held during a repair reached `max_buffered`.
- ``holding``: the live connection was lost (or a batch came under a delivered seq with
  other bytes): live input is held until the publisher's info answer says whether it
  restarted; nothing is delivered from the source meanwhile.
- ``busy``: the publisher refused a replay for now; it is asked again after a pause.
- ``stale`` / ``alive``: nothing arrived from a source for `stale_after` seconds / it spoke again.
- ``snapshot_abandoned`` (reason): a snapshot too large or too long was given up; it is
  asked for again once the source is quiet.
- ``snapshot`` (seq, blocks): history was lost and a publisher with snapshots sent its live
  blocks; they arrive as one `Delivery` with `snapshot=True` in the stream's order.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from .closing import close_socket
from .endpoints import attach
from .errors import DecodeError, FrameError, SourceLimitError
from .security import CurveClient
from .sequencer import (
    Actions,
    Counted,
    Deliver,
    Gap,
    Holding,
    JoinPolicy,
    Lost,
    Overflow,
    Repaired,
    RequestInfo,
    RequestReplay,
    RequestSnapshot,
    Reset,
    Sequencer,
    Snapshot,
    SnapshotAbandoned,
)
from .wire import Wire

logger = logging.getLogger("kvevents.subscriber")

_NOBLOCK = zmq.NOBLOCK
_RCVMORE = zmq.RCVMORE
MAX_REPLY_BYTES = 256 * 1024 * 1024
"""ZMQ_MAXMSGSIZE of the replay socket: a larger frame drops the connection (then retried)."""
SWEEP = 0.05
"""Seconds between two sweeps of every source's clocks (deadlines due sooner still run)."""
STAT_NAMES = (
    "delivered",
    "gaps",
    "repaired",
    "replays_requested",
    "info_requests",
    "replay_retries",
    "replayed",
    "history_lost",
    "resets",
    "duplicates",
    "late",
    "ambiguous",
    "decode_errors",
    "event_errors",
    "malformed",
    "other_topic",
    "overflows",
    "busy",
    "stale",
    "snapshots_requested",
    "snapshots",
    "snapshots_abandoned",
    "holds",
    "info_unanswered",
)


class Notice(NamedTuple):
    """Something the caller should know about a source's stream."""

    kind: str
    source: int
    detail: dict[str, Any]

    def __str__(self) -> str:
        details = " ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"{self.kind} source={self.source} {details}".rstrip()


class Delivery(msgspec.Struct, gc=False):
    """One delivered batch: unpacks as `(seq, batch)`; `source` is the publisher's index,
    `epoch` the restarts seen on it, `payload` the raw bytes.

    `snapshot=True`: `batch` holds, as BlockStored events, every block the publisher held
    after batch `seq` (its snapshot); replace what you know of this source with it. Its
    `payload` is empty (it came as several payloads).

    A struct, not a tuple subclass with attributes: it is built once per batch on the hot
    path, where that costs a tenth as much."""

    seq: int
    batch: Any
    source: int = 0
    epoch: int = 0
    payload: bytes = b""
    snapshot: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.seq, self.batch))

    def __getitem__(self, index: int) -> Any:
        return (self.seq, self.batch)[index]

    def __len__(self) -> int:
        return 2


class _Request:
    """The request a source has in flight on its DEALER."""

    __slots__ = ("attempts", "deadline", "kind", "start", "started")

    def __init__(self, kind: str, start: int, deadline: float) -> None:
        self.kind = kind
        self.start = start
        self.deadline = deadline
        self.attempts = 1
        self.started = time.monotonic()
        """When the session began: a snapshot that is still streaming is bounded by this."""


class Source:
    """One publisher: its sockets, its sequencer and its liveness."""

    def __init__(
        self, index: int, endpoint: str, replay_endpoint: str | None, sequencer: Sequencer
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.sequencer = sequencer
        self.request: _Request | None = None
        self.resend_at: float | None = None
        """When a refused (busy) request goes out again."""
        self.last_activity = time.monotonic()
        self.heard = False
        """Anything at all arrived from the publisher (False: never reached yet)."""
        self.stale = False
        self.sub: zmq.Socket | None = None
        self.dealer: zmq.Socket | None = None
        self.topic: bytes | None = b""
        """The topic read (exactly); None: every topic."""
        self.monitor: zmq.Socket | None = None
        """The SUB's connection events: a lost connection may bring back a new instance."""
        self.curve: CurveClient | None = None
        """CURVE keys of this source's sockets (None: plain)."""

    @property
    def epoch(self) -> int:
        return self.sequencer.epoch

    @property
    def expected(self) -> int | None:
        return self.sequencer.expected

    @property
    def info_supported(self) -> bool | None:
        """True for a kvevents publisher; False for one that does not answer info (vLLM's,
        SGLang's own), whose restarts are seen only by a live seq going backwards."""
        return self.sequencer.info_supported


class Subscriber:
    """Yields `(seq, batch)` in order per source, repairing gaps by replay. `wire` (the
    frame codecs and decoder) is set by the generated face, `kvevents.Subscriber`.

    `topic` is read exactly (ZeroMQ's prefix matches on other topics are dropped and
    counted); None reads every topic. `join` says what to do on joining a stream mid-way: "start" replays from seq 0 (as far
    back as the publisher's buffer reaches), "first_seen" starts at the first live seq
    received, "none" starts there too and never requests a replay (gaps are reported as
    history lost). `idle_probe`: after that many quiet seconds a source is asked what it
    holds, which finds a tail the PUB socket dropped and a restart no live batch revealed
    (None disables), at most `max_probes_per_second` across all sources (with thousands of
    quiet sources each is asked less often, and an idle router's cost stays bounded).
    `max_buffered` bounds the live batches held during a repair;
    `replay_timeout` and `replay_attempts` bound how long a request may stall;
    `stale_after` is the silence after which a source is reported stale (None disables).
    `heal`: when history is lost and the publisher keeps snapshots, ask for one and deliver
    it (README, "State snapshots"); live batches are held (up to `max_buffered`) while it
    streams, and one longer than `snapshot_timeout` seconds or larger than
    `max_snapshot_bytes` is abandoned with a ``snapshot_abandoned`` notice.
    `curve`: CURVE keys for every source's sockets (None: from the environment,
    `kvevents_runtime.security`; plain when it says nothing).
    """

    wire: Wire

    def __init__(
        self,
        endpoint: str | None = None,
        replay_endpoint: str | None = None,
        topic: str | None = "",
        *,
        sources: list[tuple[str, str | None]] | None = None,
        join: JoinPolicy = "start",
        max_buffered: int = 100_000,
        replay_timeout: float = 2.0,
        replay_attempts: int = 3,
        idle_probe: float | None = 1.0,
        stale_after: float | None = 10.0,
        busy_backoff: float = 0.05,
        heal: bool = True,
        snapshot_timeout: float = 120.0,
        max_probes_per_second: float = 200.0,
        max_snapshot_bytes: int = 1 << 30,
        on_notice: Callable[[Notice], None] | None = None,
        context: zmq.Context | None = None,
        rcvhwm: int = 100_000,
        curve: CurveClient | None = None,
    ) -> None:
        if join not in ("start", "first_seen", "none"):
            raise ValueError("join must be 'start', 'first_seen' or 'none'")
        pairs = list(sources or [])
        if endpoint is not None:
            pairs.insert(0, (endpoint, replay_endpoint))
        if not pairs and sources is None:
            raise ValueError("give an endpoint or sources (sources=[] to add them later)")
        self._topic = None if topic is None else topic.encode("utf-8")
        self._join = join
        self._max_buffered = max_buffered
        self._replay_timeout = replay_timeout
        self._replay_attempts = replay_attempts
        self._idle_probe = idle_probe
        self._stale_after = stale_after
        self._busy_backoff = busy_backoff
        self._heal = heal
        self._snapshot_timeout = snapshot_timeout
        self._max_probes_per_second = max_probes_per_second
        self._probe_tokens = max_probes_per_second
        self._probes_refilled = time.monotonic()
        self._next_sweep = 0.0
        self._next_due = 0.0
        """The earliest request deadline or resend time known (a sweep finds it again)."""
        self._max_snapshot_bytes = max_snapshot_bytes
        self._empty_batch = msgspec.msgpack.encode((0.0, []))
        self._on_notice = on_notice or (lambda n: logger.info("kvevents: %s", n))
        self._ctx = context or zmq.Context.instance()
        self._rcvhwm = rcvhwm
        self._curve = curve if curve is not None else CurveClient.from_env()
        self._poller = zmq.Poller()
        # interrupt() writes here: a poll waiting on the sockets wakes at once.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._owners: dict[zmq.Socket, tuple[Source, str]] = {}
        self._sources: dict[int, Source] = {}
        self._next_index = 0
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._closed = False
        self._interrupted = False
        clocks = [t / 2 for t in (idle_probe, stale_after) if t is not None]
        self._tick = min([1.0, *clocks])
        """The longest a poll waits before it looks at the clocks again (seconds)."""
        self._unread: deque[Delivery] = deque()
        """Deliveries an iteration polled but never handed out (the loop broke or raised):
        the next poll or iteration returns them first, so stopping a loop loses nothing."""
        wire = self.wire
        self._decode = wire.decode
        self._seq_size = wire.seq_size
        self._end_seq = wire.end_seq
        try:
            for live, replay in pairs:
                self.add_source(live, replay)
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------

    @property
    def sources(self) -> list[Source]:
        """The sources followed now, by index (a removed source's index is not reused)."""
        return list(self._sources.values())

    def add_source(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str | None | bytes = b"",
        curve: CurveClient | None = None,
    ) -> Source:
        """Follow one more publisher (e.g. another DP rank). `topic`: the subscriber's own
        unless given; a string reads that topic only, None every topic. `curve`: this
        publisher's CURVE keys (default: the subscriber's)."""
        sequencer = Sequencer(
            self._join,
            replay_endpoint is not None,
            self._max_buffered,
            self._heal,
            self._max_snapshot_bytes,
        )
        source = Source(self._next_index, endpoint, replay_endpoint, sequencer)
        source.curve = curve if curve is not None else self._curve
        if topic == b"":
            source.topic = self._topic
        else:
            source.topic = topic.encode() if isinstance(topic, str) else topic
        self._next_index += 1
        self._sources[source.index] = source
        try:
            sub = source.sub = self._socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self._rcvhwm)
            if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://::"):
                sub.setsockopt(zmq.IPV6, 1)
            sub.setsockopt(zmq.SUBSCRIBE, source.topic or b"")
            if source.curve is not None:
                source.curve.apply(sub)
            self._owners[sub] = (source, "live")
            self._poller.register(sub, zmq.POLLIN)
            if replay_endpoint is not None:
                # A unique address: pyzmq's default names it by file descriptor, which a new
                # socket can reuse while the old monitor's endpoint is still bound.
                try:
                    monitor = sub.get_monitor_socket(
                        zmq.EVENT_DISCONNECTED,
                        addr=f"inproc://kvevents-monitor-{uuid.uuid4().hex}",
                    )
                except zmq.ZMQError as exc:
                    raise self._limit_error(exc) from None
                source.monitor = monitor
                self._owners[monitor] = (source, "monitor")
                self._poller.register(monitor, zmq.POLLIN)
            attach(sub, endpoint, bind=False)
            if replay_endpoint is not None:
                self._open_dealer(source)
        except BaseException:
            # A bad replay endpoint must not leave a half-added source behind.
            self.remove_source(source)
            raise
        self._act(source, sequencer.start(), self._unread)  # type: ignore[arg-type]
        return source

    def remove_source(self, source: Source | int) -> None:
        """Stop following a publisher: its sockets are closed, its state dropped, and
        nothing more is delivered or reported for it. Idempotent."""
        index = source if isinstance(source, int) else source.index
        removed = self._sources.pop(index, None)
        if removed is None:
            return
        self._close_sockets(removed)

    def request_snapshot(self, source: Source | int) -> bool:
        """Ask a source's publisher for a snapshot (delivered later, in order, as a
        `Delivery` with `snapshot=True`), for a consumer whose state went wrong. False when
        the publisher keeps none (or the source is unknown)."""
        index = source if isinstance(source, int) else source.index
        found = self._sources.get(index)
        if found is None:
            return False
        actions = found.sequencer.resync()
        if actions is None:
            return False
        self._act(found, actions, self._unread)  # type: ignore[arg-type]
        return True

    def _socket(self, kind: int) -> zmq.Socket:
        """A new socket, or SourceLimitError naming the limit that refused it."""
        try:
            return self._ctx.socket(kind)
        except zmq.ZMQError as exc:
            raise self._limit_error(exc) from None

    def _limit_error(self, exc: zmq.ZMQError) -> Exception:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return exc
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return SourceLimitError(
            f"cannot open another ZeroMQ socket with {len(self._sources) - 1} sources "
            f"followed ({exc}; this context allows {self._ctx.get(zmq.MAX_SOCKETS)} "
            f"sockets, the process {limit} open files; a source takes up to 4 sockets)"
        )

    def _open_dealer(self, source: Source) -> None:
        dealer = self._socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Bounded: a publisher's replay waits (ROUTER_MANDATORY) while this pipe is full, and
        # a frame larger than any batch drops the connection instead of filling memory.
        dealer.setsockopt(zmq.RCVHWM, 1000)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        if source.curve is not None:
            source.curve.apply(dealer)
        source.dealer = dealer
        self._owners[dealer] = (source, "replay")
        self._poller.register(dealer, zmq.POLLIN)
        assert source.replay_endpoint is not None
        attach(dealer, source.replay_endpoint, bind=False)

    def _reset_dealer(self, source: Source) -> None:
        """A fresh DEALER drops every late reply to an abandoned request."""
        if source.dealer is not None:
            self._poller.unregister(source.dealer)
            del self._owners[source.dealer]
            close_socket(source.dealer)
            source.dealer = None
            self._open_dealer(source)

    # -- receiving --------------------------------------------------------------------

    def poll(self, timeout: float | None = 1.0, max_messages: int = 32) -> list[Delivery]:
        """Wait up to `timeout` seconds (None: forever) for input; return what is ready in order.

        At most `max_messages` per socket per call, so one call's work is bounded: decoded
        batches handed over a few dozen at a time die young and stay in cache. Measured with
        8-event batches, 32 per call deliver a third faster than 128, and twice as fast as 1000."""
        if self._closed:
            raise RuntimeError("Subscriber is closed")
        if self._unread:
            unread = list(self._unread)
            self._unread.clear()
            return unread
        out: list[Delivery] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = self._poller.poll(self._wait_ms(deadline))
            # Connection events first: a lost connection must be known before what came after.
            ready.sort(key=lambda pair: self._owners.get(pair[0], (None, ""))[1] != "monitor")
            for sock, _ in ready:
                owner = self._owners.get(sock)
                if owner is None:
                    if sock == self._wake_r:
                        self._drain_wakeups()
                    continue  # else a DEALER replaced earlier in this round
                source, kind = owner
                if kind == "replay":
                    self._drain_replay(source, sock, out, max_messages)
                elif kind == "live":
                    self._drain_live(source, sock, out, max_messages)
                else:
                    self._drain_monitor(source, out)
            # Clocks run at least every tick, however long the caller waits: a long poll
            # used to hold back the idle probe and the stale notice.
            self._check_clocks(out)
            # Back to the caller once anything arrived (the asyncio face runs other calls,
            # add_source for one, on this thread between polls).
            if ready or out or self._interrupted:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._interrupted = False
        return out

    def interrupt(self) -> None:
        """Make a poll in progress return at once (safe from any thread), e.g. so that
        another call waiting for the subscriber's thread runs now."""
        self._interrupted = True
        if self._closed:
            return  # its pipe is closed (and the number may be another file's by now)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # full (a wakeup is pending anyway) or closed

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _wait_ms(self, deadline: float | None) -> int:
        now = time.monotonic()
        wait = self._tick
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        wait = min(wait, max(0.0, self._next_due - now))
        return int(wait * 1000) + (1 if wait > 0 else 0)

    def _due(self, when: float) -> None:
        """A clock of some source runs out at `when`: the next sweep is no later."""
        if when < self._next_due:
            self._next_due = when

    def __iter__(self) -> Iterator[Delivery]:
        """Deliveries one at a time until closed. A loop that stops (`break`, an exception,
        a closed generator) leaves what it was not handed for the next poll or loop."""
        unread = self._unread
        while not self._closed:
            if not unread:
                unread.extend(self.poll(1.0))
            while unread:
                yield unread.popleft()

    def _drain_live(
        self, source: Source, sock: zmq.Socket, out: list[Delivery], budget: int
    ) -> None:
        # Each frame is taken zero-copy for its `more` flag, so a message of the wrong frame
        # count is dropped whole and never merged with its neighbour.
        recv = sock.recv
        seq_size = self._seq_size
        from_bytes = int.from_bytes
        decode = self._decode
        append = out.append
        topic = source.topic
        end_seq = self._end_seq
        sequencer = source.sequencer
        take = sequencer.take
        index = source.index
        monitor = source.monitor
        if monitor is not None and cast(int, monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._drain_monitor(source, out)
        received = 0
        delivered = 0
        try:
            for _ in range(budget):
                try:
                    first = recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    return
                received += 1
                if not first.more:
                    self._malformed(source, "live message of 1 frame")
                    continue
                second = recv(_NOBLOCK, copy=False)
                if not second.more:
                    self._malformed(source, "live message of 2 frames")
                    continue
                last = recv(_NOBLOCK, copy=False)
                if last.more:
                    while sock.get(_RCVMORE):
                        recv()
                    self._malformed(source, "live message of more than 3 frames")
                    continue
                if topic is not None and ((first.bytes != topic) if topic else len(first)):
                    self.stats["other_topic"] += 1  # a ZeroMQ prefix match on another topic
                    continue
                if len(second) != seq_size:
                    self._malformed(
                        source, f"seq frame must be {seq_size} bytes, got {len(second)}"
                    )
                    continue
                # Read from the frame's buffer: no bytes object for the seq.
                seq = from_bytes(second, "big")  # type: ignore[arg-type]  # Frame has the buffer protocol
                if seq == end_seq:
                    self._malformed(source, "live seq is the END marker")
                    continue
                payload = last.bytes
                if not take(seq, payload):
                    self._act(source, sequencer.live(seq, payload), out)
                    continue
                # In order with nothing held: the common case, delivered inline.
                try:
                    batch = decode(payload)
                except DecodeError as exc:
                    self._decode_failed(source, seq, exc)
                    continue
                if batch.errors:
                    self._event_errors(source, seq, batch)
                append(Delivery(seq, batch, index, sequencer.epoch, payload))
                delivered += 1
        finally:
            if received:
                self._heard(source)
            self.stats["delivered"] += delivered

    def _drain_monitor(self, source: Source, out: list[Delivery]) -> None:
        monitor = source.monitor
        assert monitor is not None
        lost = False
        while True:
            try:
                event = recv_monitor_message(monitor, _NOBLOCK)
            except zmq.Again:
                break
            lost = lost or event["event"] == zmq.EVENT_DISCONNECTED
        if lost:
            self._act(source, source.sequencer.reconnected(), out)

    def _drain_replay(
        self, source: Source, sock: zmq.Socket, out: list[Delivery], budget: int
    ) -> None:
        parse = self.wire.parse_replay_reply
        for _ in range(budget):
            try:
                message = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            if source.request is None or source.dealer is not sock:
                continue  # a late reply to an abandoned request
            try:
                item = parse(message)
            except FrameError as exc:
                self._malformed(source, f"replay reply: {exc}")
                continue
            self._heard(source)
            source.request.deadline = time.monotonic() + self._replay_timeout
            sequencer = source.sequencer
            if item.is_info:
                try:
                    info = self.wire.decode_info(item.payload)
                except FrameError as exc:
                    self._malformed(source, str(exc))
                    continue
                if info.busy:
                    self.stats["busy"] += 1
                    self._notice("busy", source, next_seq=info.next_seq)
                    source.resend_at = (
                        time.monotonic() + self._busy_backoff * source.request.attempts
                    )
                    self._due(source.resend_at)
                    continue
                # Everything the SUB already holds was published before this answer: the
                # sequencer must see it first to place it in the right instance.
                assert source.sub is not None
                self._drain_live(source, source.sub, out, self._max_buffered)
                if source.dealer is not sock or source.request is None:
                    return  # the live connection was lost meanwhile: this answer may be stale
                kind = source.request.kind
                actions = sequencer.info(
                    info.instance, info.next_seq, info.oldest_seq, info.snapshots
                )
                if kind == "info" and sequencer.outstanding != "info":
                    source.request = None
            elif item.is_end:
                source.request = None
                actions = sequencer.end()
            else:
                self.stats["replayed"] += 1
                actions = sequencer.reply(item.seq, item.payload)
            self._act(source, actions, out)
            if source.dealer is not sock:
                return  # the DEALER was replaced: what is left on this one is stale

    # -- the sequencer's answers --------------------------------------------------------

    def _act(self, source: Source, actions: Actions, out: list[Delivery]) -> None:
        stats = self.stats
        for action in actions:
            match action:
                case Deliver(seq, payload):
                    self._deliver(source, seq, payload, out)
                case Lost(first, last, reason, epoch):
                    stats["history_lost"] += last - first + 1
                    self._notice(
                        "history_lost", source, first=first, last=last, reason=reason, epoch=epoch
                    )
                case Gap(expected, got):
                    stats["gaps"] += 1
                    self._notice("gap", source, expected=expected, got=got)
                case Repaired(next_seq):
                    stats["repaired"] += 1
                    self._notice("repaired", source, next_seq=next_seq)
                case Reset(epoch, reason):
                    stats["resets"] += 1
                    source.request = None
                    self._reset_dealer(source)
                    self._notice("reset", source, epoch=epoch, reason=reason)
                case Overflow(held):
                    stats["overflows"] += 1
                    source.request = None
                    self._reset_dealer(source)
                    self._notice("overflow", source, buffered=held)
                case SnapshotAbandoned(reason):
                    stats["snapshots_abandoned"] += 1
                    source.request = None
                    self._reset_dealer(source)
                    self._notice("snapshot_abandoned", source, reason=reason)
                case RequestReplay(start):
                    stats["replays_requested"] += 1
                    deadline = time.monotonic() + self._replay_timeout
                    self._send(source, _Request("replay", start, deadline))
                case RequestInfo():
                    stats["info_requests"] += 1
                    self._send(source, _Request("info", 0, time.monotonic() + self._replay_timeout))
                case RequestSnapshot(retry):
                    stats["snapshots_requested"] += 1
                    now = time.monotonic()
                    request = _Request("snapshot", 0, now + self._replay_timeout)
                    if retry:
                        # The last one was outrun by live input: wait longer before each new cut.
                        self._send_later(source, request, self._busy_backoff * 2 ** min(retry, 6))
                    else:
                        self._send(source, request)
                case Snapshot(seq, payloads):
                    self._deliver_snapshot(source, seq, payloads, out)
                case Holding():
                    # Answers already on their way may be the instance that just went away's:
                    # a fresh DEALER drops them (the sequencer asks again next).
                    stats["holds"] += 1
                    source.request = None
                    self._reset_dealer(source)
                    self._notice("holding", source, until="the publisher says who it is")
                case Counted(name, count):
                    stats[name] += count

    def _send_later(self, source: Source, request: _Request, delay: float) -> None:
        source.request = request
        source.resend_at = time.monotonic() + delay
        request.deadline = source.resend_at + self._replay_timeout
        self._due(source.resend_at)

    def _send(self, source: Source, request: _Request) -> None:
        source.request = request
        source.resend_at = None
        self._due(request.deadline)
        dealer = source.dealer
        if dealer is None:
            return
        if request.kind == "info":
            frames = self.wire.pack_info_request()
        elif request.kind == "snapshot":
            frames = self.wire.pack_snapshot_request(0)
        elif source.sequencer.info_supported:
            frames = self.wire.pack_replay_request_with_info(request.start)
        else:
            frames = self.wire.pack_replay_request(request.start)
        try:
            dealer.send_multipart(frames, _NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: the request's deadline retries it

    def _deliver(self, source: Source, seq: int, payload: bytes, out: list[Delivery]) -> None:
        try:
            batch = self._decode(payload)
        except DecodeError as exc:
            self._decode_failed(source, seq, exc)
            return
        if batch.errors:
            self._event_errors(source, seq, batch)
        self.stats["delivered"] += 1
        out.append(Delivery(seq, batch, source.index, source.sequencer.epoch, payload))

    def _deliver_snapshot(
        self, source: Source, seq: int, payloads: list[bytes], out: list[Delivery]
    ) -> None:
        """The snapshot's batches as one batch: a consumer swaps its state in one step."""
        events: list[Any] = []
        errors: list[Any] = []
        batch = None
        for payload in payloads:
            try:
                part = self._decode(payload)
            except DecodeError as exc:
                self._decode_failed(source, seq, exc)
                continue
            events.extend(part.events)
            errors.extend(part.errors)
            batch = batch or part
        if batch is None:
            batch = self._decode(self._empty_batch)
        batch = msgspec.structs.replace(batch, events=events, errors=tuple(errors))
        if errors:
            self._event_errors(source, seq, batch)
        self.stats["snapshots"] += 1
        self._notice("snapshot", source, seq=seq, events=len(events), epoch=source.epoch)
        out.append(Delivery(seq, batch, source.index, source.sequencer.epoch, b"", True))

    # -- clocks: request deadlines, busy pauses, idle probes, liveness --------------------

    def _check_clocks(self, out: list[Delivery]) -> None:
        """Request deadlines, busy pauses, snapshot time, idle probes and liveness. A sweep
        over every source, so at most every `SWEEP` seconds unless a known deadline is due:
        with thousands of sources, one per poll cost more than the polls."""
        now = time.monotonic()
        if now < self._next_sweep and now < self._next_due:
            return
        self._next_sweep = now + SWEEP
        self._next_due = now + self._tick
        rate = self._max_probes_per_second
        self._probe_tokens = min(rate, self._probe_tokens + (now - self._probes_refilled) * rate)
        self._probes_refilled = now
        for source in list(self._sources.values()):
            request = source.request
            if request is not None and source.resend_at is not None and now >= source.resend_at:
                request.deadline = now + self._replay_timeout
                self._send(source, request)  # after a busy reply; not a failed attempt
            elif request is not None and now >= request.deadline:
                if request.attempts < self._replay_attempts:
                    self._reset_dealer(source)
                    self.stats["replay_retries"] += 1
                    attempts = request.attempts + 1
                    self._send(
                        source, _Request(request.kind, request.start, now + self._replay_timeout)
                    )
                    assert source.request is not None
                    source.request.attempts = attempts
                else:
                    source.request = None
                    self._reset_dealer(source)
                    self._act(source, source.sequencer.timeout(), out)
            elif (
                request is not None
                and request.kind == "snapshot"
                and now - request.started > self._snapshot_timeout
            ):
                # Each part refreshes the deadline: a snapshot that never ends is bounded here.
                reason = f"still streaming after {self._snapshot_timeout:g} s"
                self._act(source, source.sequencer.abandon_snapshot(reason), out)
            quiet = now - source.last_activity
            if (
                self._idle_probe is not None
                and source.request is None
                and quiet > self._idle_probe
                and self._probe_tokens >= 1
            ):
                probed = source.sequencer.probe()
                if probed is not None:
                    self._probe_tokens -= 1
                    source.last_activity = now
                    self._act(source, probed, out)
            if self._stale_after is not None and not source.stale and quiet > self._stale_after:
                source.stale = True
                self.stats["stale"] += 1
                self._notice("stale", source, silent_seconds=round(quiet, 1))
            request = source.request
            if request is not None:
                self._due(request.deadline if source.resend_at is None else source.resend_at)

    def _heard(self, source: Source) -> None:
        source.last_activity = time.monotonic()
        source.heard = True
        if source.stale:
            source.stale = False
            self._notice("alive", source)

    # -- reporting -----------------------------------------------------------------------

    def _decode_failed(self, source: Source, seq: int, exc: DecodeError) -> None:
        self.stats["decode_errors"] += 1
        self._notice("decode_error", source, seq=seq, reason=str(exc))

    def _event_errors(self, source: Source, seq: int, batch: Any) -> None:
        self.stats["event_errors"] += len(batch.errors)
        self._notice(
            "event_errors", source, seq=seq, errors=[(e.index, e.reason) for e in batch.errors]
        )

    def _malformed(self, source: Source, reason: str) -> None:
        self.stats["malformed"] += 1
        self._notice("malformed", source, reason=reason)

    def _notice(self, kind: str, source: Source, **detail: Any) -> None:
        self._on_notice(Notice(kind, source.index, detail))

    # -- teardown -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for source in self._sources.values():
            self._close_sockets(source)
        self._owners.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _close_sockets(self, source: Source) -> None:
        # The monitor is switched off before its reader closes: the SUB would otherwise go on
        # sending connection events to a closed PAIR.
        if source.sub is not None and source.monitor is not None:
            try:
                source.sub.disable_monitor()
            except zmq.ZMQError:
                pass
        for sock in (source.monitor, source.sub, source.dealer):
            if sock is not None:
                if self._owners.pop(sock, None) is not None:
                    self._poller.unregister(sock)
                close_socket(sock)
        source.sub = source.dealer = source.monitor = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
