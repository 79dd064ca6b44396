"""The node-local bridge: follows the engines of one node and publishes their streams into
NATS JetStream, with the snapshots a replica needs to start from nothing.

Each engine is one source of an asyncio subscriber (ZeroMQ on loopback, with replay and
snapshots when its publisher keeps them), so what the bridge publishes obeys the delivery
contract: per epoch, every seq once and in order, or inside a `lost` marker. A restart is
a `reset` marker (protocol.py says what each message holds).

The bridge keeps each worker's live block set (the publisher's own `BlockSet`), applied at
delivery. Its snapshots are taken from it and written to the object store after everything
queued before them was published; so a snapshot holds exactly the worker's deliveries up to
its seq, and every message of that worker after it in the stream is newer.

It never blocks an engine: deliveries wait in one bounded queue (messages and bytes). When
the queue is full (NATS down or too slow) the queued messages are dropped, counted per
worker, and replaced by one `resync` snapshot per worker, taken then: replicas load it and
lose nothing. A publish that fails is retried with the same message id (the server drops
the copy if the first attempt was stored after all), and its worker is resynchronised the
same way, since a retry can land after messages sent behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..backend import Worker
from ..blockset import BlockSet, BlockShape
from ..ratelimit import RateLimitedLog
from ..security import CurveClient
from ..subscriber import Notice
from . import protocol
from .natsio import connect_jetstream, ensure_bucket, ensure_stream
from .redact import redact

SNAPSHOT_WRITE_TIMEOUT = 30.0
"""Seconds a snapshot may keep failing to be written before it is given up for this round."""
HEADER_ROOM = 1024
"""Bytes kept for a message's subject and headers under the server's max_payload."""
REDACTED = "redacted"
"""The dialect header of a redacted payload."""

logger = logging.getLogger("kvevents.bridge")


@dataclass(frozen=True)
class EngineSpec:
    """One engine (one DP rank) the bridge follows."""

    endpoint: str
    replay_endpoint: str | None
    worker_id: int
    dp_rank: int = 0
    model: str = "default"
    dialect: str = "vllm"
    topic: str | None = None
    """None reads every topic (as Dynamo's indexer does)."""
    curve_server_key: str | None = None
    """The publisher's CURVE public key (z85); this side's pair comes from the environment
    (kvevents_runtime.security). None: the subscriber's default (plain, or the environment's)."""


@dataclass
class _Worker:
    spec: EngineSpec
    subject: str
    blocks: BlockSet
    epoch: str | None = None
    """The epoch token of the stream published now (None before the first delivery)."""
    subscriber_epoch: int = -1
    last_seq: int = -1
    whole: bool = False
    reason: str | None = None
    changed: bool = True
    """Deliveries since its last snapshot (a new worker has none written yet)."""
    dropped: int = 0
    snapshot_queued: bool = False


# Queue items: (kind, worker key, headers, payload, snapshot state or None).
_Item = tuple[str, Worker, dict[str, str], bytes, Any]


class Bridge:
    """`await bridge.start()`, then `await bridge.run()` until `await bridge.close()`."""

    subscriber_class: Any
    """The asyncio subscriber bound to a wire, set by the generated face (kvevents.fleet)."""
    shapes: Mapping[str, BlockShape]
    """Each dialect's block shape (to rebuild snapshots in it), set by the generated face."""
    encode: Callable[[Any], bytes]
    """A dialect batch to its payload, set by the generated face."""

    def __init__(
        self,
        servers: str | list[str],
        engines: list[EngineSpec],
        *,
        stream: str = protocol.STREAM,
        root: str = protocol.ROOT,
        max_age: float = 24 * 3600.0,
        snapshot_interval: float = 30.0,
        max_queue: int = 100_000,
        max_queue_bytes: int = 256 * 1024 * 1024,
        in_flight: int = 64,
        publish_timeout: float = 5.0,
        redact: bool = False,
        nats_options: Mapping[str, Any] | None = None,
        **subscriber_options: Any,
    ) -> None:
        if not engines:
            raise ValueError("give at least one engine")
        keys = [(e.worker_id, e.dp_rank) for e in engines]
        if len(set(keys)) != len(keys):
            raise ValueError("two engines have the same worker_id and dp_rank")
        for spec in engines:
            if spec.dialect not in self.shapes:
                raise ValueError(f"dialect {spec.dialect!r}: one of {sorted(self.shapes)}")
            protocol.model_token(spec.model)
        self.servers = servers
        self.stream = protocol.check_stream_name(stream)
        self.bucket = protocol.bucket_name(stream)
        self.root = protocol.check_root(root)
        self.max_age = max_age
        self.snapshot_interval = snapshot_interval
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.in_flight = in_flight
        self.publish_timeout = publish_timeout
        self.redact = redact
        """Publish local block hashes in place of token ids (fleet/redact.py): prompts never
        leave the node."""
        self._nats_options = dict(nats_options or {})
        self._engines = engines
        self._subscriber_options = {"idle_probe": 1.0, "stale_after": 10.0, **subscriber_options}
        self._notices: deque[Notice] = deque()
        self._subscriber_options["on_notice"] = self._notices.append
        self._nonce = uuid.uuid4().hex[:12]
        """Names the epochs of publishers without an instance id, per bridge run."""
        self._workers: dict[Worker, _Worker] = {}
        self._by_source: dict[int, Worker] = {}
        self._sources: dict[Worker, Any] = {}
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._sub: Any = None
        self._nc: Any = None
        self._js: Any = None
        self._objects: Any = None
        self._publisher: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(logger)
        self.last_stream_seq = 0
        """The newest stream sequence a publish of this bridge was acknowledged with."""
        self.counters = {
            "deliveries": 0,
            "published": 0,
            "duplicates": 0,
            "publish_errors": 0,
            "dropped": 0,
            "overflows": 0,
            "resets": 0,
            "lost_markers": 0,
            "snapshots_written": 0,
            "snapshot_bytes": 0,
            "snapshot_errors": 0,
            "oversize": 0,
        }
        self._max_payload = 1 << 20
        """The server's max_payload (read at connect): a larger message can never be stored."""

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to NATS (creating the stream and the snapshot bucket if missing) and to
        every engine."""
        self._nc, self._js = await connect_jetstream(self.servers, **self._nats_options)
        self._max_payload = int(self._nc.max_payload)
        await ensure_stream(self._js, self.stream, self.root, self.max_age)
        self._objects = await ensure_bucket(self._js, self.bucket)
        self._sub = self.subscriber_class(sources=[], **self._subscriber_options)
        for spec in self._engines:
            key = (spec.worker_id, spec.dp_rank)
            self._workers[key] = _Worker(
                spec,
                protocol.subject(spec.model, spec.worker_id, spec.dp_rank, self.root),
                BlockSet(self.shapes[spec.dialect]),
            )
            curve = None
            if spec.curve_server_key is not None:
                curve = CurveClient.own_keys_from_env(spec.curve_server_key)
            source = await self._sub.add_source(
                spec.endpoint, spec.replay_endpoint, topic=spec.topic, curve=curve
            )
            self._by_source[source.index] = key
            self._sources[key] = source
        self._publisher = asyncio.create_task(
            self._publish_loop(), name="kvevents-bridge-publisher"
        )

    async def run(self) -> None:
        """Follow the engines until `close()`."""
        if self._sub is None:
            raise RuntimeError("start() first")
        next_snapshot = time.monotonic() + self.snapshot_interval
        while not self._closed:
            try:
                deliveries = await self._sub.poll(0.1, 256)
            except RuntimeError:
                if self._closed:
                    return
                raise
            for delivery in deliveries:
                self._take(delivery)
            self._take_notices()
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.snapshot_interval
                self.snapshot_all(protocol.PERIODIC)
            publisher = self._publisher
            if publisher is not None and publisher.done():
                publisher.result()  # a defect in the publish loop must not go unseen

    async def close(self) -> None:
        """Idempotent: stops following, gives the queue up to `publish_timeout` to drain."""
        if self._closed:
            return
        self._closed = True
        if self._sub is not None:
            await self._sub.close()
        publisher = self._publisher
        if publisher is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(publisher, self.publish_timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                logger.exception("kvevents bridge: the publish loop failed")
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception:  # closing a connection that already failed
                pass

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- what the engines deliver ---------------------------------------------------------

    def _take_notices(self) -> None:
        """After the poll's deliveries: a restart seen by the publisher's info answer starts
        the new epoch now, so replicas clear the worker even if it never publishes again."""
        notices = self._notices
        while notices:
            notice = notices.popleft()
            key = self._by_source.get(notice.source)
            logger.info("kvevents bridge: worker %s: %s", key, notice)
            if key is None or notice.kind != "reset":
                continue
            worker = self._workers[key]
            epoch = notice.detail.get("epoch")
            if isinstance(epoch, int) and epoch > worker.subscriber_epoch:
                self._begin_epoch(key, worker, epoch)

    def _begin_epoch(self, key: Worker, worker: _Worker, subscriber_epoch: int) -> None:
        worker.subscriber_epoch = subscriber_epoch
        token = self._epoch_token(key, subscriber_epoch)
        if token == worker.epoch:
            # Read after a later restart in the same poll: the instance id is the newer one's.
            token = f"{token}-{subscriber_epoch}"
        worker.epoch = token
        worker.blocks = BlockSet(self.shapes[worker.spec.dialect])
        worker.last_seq = -1
        worker.whole, worker.reason = True, None
        worker.changed = True
        self.counters["resets"] += 1
        self._enqueue((protocol.RESET, key, protocol.reset_headers(*key, worker.epoch), b"", None))

    def _epoch_token(self, key: Worker, subscriber_epoch: int) -> str:
        source = self._sources.get(key)
        instance = None if source is None else source.sequencer.instance
        if instance:
            # The publisher's own instance id: a bridge restarted on the same instance
            # publishes the same message ids, which the server drops as duplicates.
            return "i" + instance.hex()
        return f"b{self._nonce}-{subscriber_epoch}"

    def _take(self, delivery: Any) -> None:
        key = self._by_source.get(delivery.source)
        if key is None:
            return
        worker = self._workers[key]
        self.counters["deliveries"] += 1
        spec = worker.spec
        if delivery.epoch != worker.subscriber_epoch:
            self._begin_epoch(key, worker, delivery.epoch)
        epoch = worker.epoch
        assert epoch is not None
        worker.changed = True
        if delivery.snapshot:
            # The engine's own snapshot: what was lost before it is covered by it.
            worker.blocks = BlockSet(self.shapes[spec.dialect])
            worker.blocks.apply(delivery.batch)
            worker.last_seq = delivery.seq
            worker.whole, worker.reason = True, None
            self._queue_snapshot(key, protocol.RESYNC)
            return
        seq = delivery.seq
        if seq > worker.last_seq + 1:
            first, last = worker.last_seq + 1, seq - 1
            reason = "the engine no longer had them"
            worker.whole, worker.reason = (
                False,
                f"seqs {first}..{last} of epoch {epoch} lost: {reason}",
            )
            self.counters["lost_markers"] += 1
            self._enqueue(
                (
                    protocol.LOST,
                    key,
                    protocol.lost_headers(*key, epoch, first, last, reason),
                    b"",
                    None,
                )
            )
        worker.blocks.apply(delivery.batch)
        worker.last_seq = seq
        if self.redact:
            headers = protocol.batch_headers(*key, epoch, seq, REDACTED)
            payload = redact(delivery.batch)
        else:
            headers = protocol.batch_headers(*key, epoch, seq, spec.dialect)
            payload = delivery.payload
        if len(payload) + HEADER_ROOM > self._max_payload:
            self._oversize(key, epoch, seq, len(payload))
            return
        self._enqueue((protocol.BATCH, key, headers, payload, None))

    def _oversize(self, key: Worker, epoch: str, seq: int, size: int) -> None:
        """A batch larger than the server takes (a long prompt's tokens): it is named lost
        and the worker's snapshot, which holds it, is written in its place (chunked in the
        object store, which has no such limit)."""
        self.counters["oversize"] += 1
        reason = f"a batch of {size} bytes exceeds the server's max_payload ({self._max_payload})"
        self._log.warning(
            "kvevents bridge: worker %s seq %d: %s; resynchronised by snapshot", key, seq, reason
        )
        headers = protocol.lost_headers(*key, epoch, seq, seq, reason)
        self._enqueue((protocol.LOST, key, headers, b"", None))
        self._queue_snapshot(key, protocol.RESYNC)

    # -- the queue ----------------------------------------------------------------------

    def snapshot_all(self, why: str = protocol.PERIODIC) -> None:
        """Queue a snapshot of every worker that changed since its last one."""
        for key, worker in self._workers.items():
            if worker.epoch is not None and worker.changed and not worker.snapshot_queued:
                self._queue_snapshot(key, why)

    def _queue_snapshot(self, key: Worker, why: str) -> None:
        worker = self._workers[key]
        assert worker.epoch is not None
        worker.changed = False
        if worker.snapshot_queued:
            # The one waiting holds less than this one: at most one per worker is queued.
            self._queue = deque(
                item
                for item in self._queue
                if not (item[0] == protocol.SNAPSHOT and item[1] == key)
            )
            why = protocol.RESYNC
        worker.snapshot_queued = True
        state = (worker.epoch, worker.last_seq, worker.whole, worker.reason, worker.blocks.freeze())
        headers = {protocol.WHY: why}
        self._queue.append((protocol.SNAPSHOT, key, headers, b"", state))
        self._wakeup.set()

    def _enqueue(self, item: _Item) -> None:
        if len(self._queue) >= self.max_queue or self._queued_bytes >= self.max_queue_bytes:
            self._overflow()
        self._queue.append(item)
        self._queued_bytes += len(item[3])
        self._wakeup.set()

    def _overflow(self) -> None:
        """Drop every queued message; each worker that lost some is resynchronised by a
        snapshot taken now, which holds everything it delivered so far."""
        self.counters["overflows"] += 1
        hit = {item[1] for item in self._queue if item[0] != protocol.SNAPSHOT}
        for item in self._queue:
            if item[0] != protocol.SNAPSHOT:
                self._workers[item[1]].dropped += 1
                self.counters["dropped"] += 1
        # A worker's older snapshot goes too (the one taken now holds more), so a long
        # outage keeps at most one snapshot per worker queued.
        self._queue = deque(
            item for item in self._queue if item[0] == protocol.SNAPSHOT and item[1] not in hit
        )
        for key in hit:
            self._workers[key].snapshot_queued = False
        self._queued_bytes = 0
        self._log.warning(
            "kvevents bridge: queue full (%d messages): dropped those of workers %s; each is "
            "resynchronised by a snapshot",
            self.max_queue,
            sorted(hit),
        )
        for key in hit:
            self._queue_snapshot(key, protocol.RESYNC)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def worker_keys(self) -> list[Worker]:
        return list(self._workers)

    def position(self, key: Worker) -> tuple[str | None, int]:
        """`(epoch, seq)`: the newest seq of the worker taken into the queue (-1 before any)
        and the epoch it is in (None before the first delivery)."""
        worker = self._workers[key]
        return worker.epoch, worker.last_seq

    def whole(self, key: Worker) -> bool:
        """Whether the bridge holds the worker's whole state: nothing lost since its epoch
        began or since the engine's last snapshot, so a snapshot published now is whole
        (False before its first delivery: the bridge holds nothing of it yet)."""
        return self._workers[key].whole

    def taken(self, key: Worker) -> tuple[bytes | None, int]:
        """`(instance, seq)`: the publisher instance of the epoch being followed (None while
        unknown) and the newest seq of it taken into the queue; unlike the epoch token, the
        instance can be compared with the engine's own."""
        worker = self._workers[key]
        source = self._sources.get(key)
        # The subscriber's instance is that of its newest epoch only, and is learnt after an
        # epoch's first batch when that is seq 0 (delivered before the publisher says who it
        # is): asked now, not kept.
        if (
            worker.epoch is None
            or source is None
            or source.sequencer.epoch != worker.subscriber_epoch
        ):
            return None, worker.last_seq
        return source.sequencer.instance, worker.last_seq

    def drained(self) -> bool:
        """Nothing queued or being published."""
        return not self._queue and not self._busy

    # -- publishing ---------------------------------------------------------------------

    _busy = False

    async def _publish_loop(self) -> None:
        queue = self._queue
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queue = self._queue
            self._busy = True
            try:
                if queue[0][0] == protocol.SNAPSHOT:
                    item = queue.popleft()
                    await self._write_snapshot(item)
                    continue
                window: list[_Item] = []
                while queue and len(window) < self.in_flight and queue[0][0] != protocol.SNAPSHOT:
                    item = queue.popleft()
                    self._queued_bytes -= len(item[3])
                    window.append(item)
                await self._publish_window(window)
            finally:
                self._busy = False

    async def _publish_window(self, window: list[_Item]) -> None:
        js = self._js
        results = await asyncio.gather(
            *[
                js.publish(
                    self._workers[key].subject,
                    payload,
                    timeout=self.publish_timeout,
                    headers=headers,
                )
                for _, key, headers, payload, _ in window
            ],
            return_exceptions=True,
        )
        failed: list[_Item] = []
        for item, result in zip(window, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                failed.append(item)
                self.counters["publish_errors"] += 1
                self._log.warning("kvevents bridge: publish failed, retrying: %r", result)
            else:
                self._acked(result)
        if not failed:
            return
        for item in failed:
            await self._publish_until_stored(item)
        # A retried message may now sit after messages sent behind it: replicas get a
        # snapshot taken now, which holds all of them.
        for key in {item[1] for item in failed}:
            if not self._workers[key].snapshot_queued:
                self._queue_snapshot(key, protocol.RESYNC)

    async def _publish_until_stored(self, item: _Item) -> None:
        _, key, headers, payload, _ = item
        pause = 0.05
        while True:
            try:
                ack = await self._js.publish(
                    self._workers[key].subject,
                    payload,
                    timeout=self.publish_timeout,
                    headers=headers,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters["publish_errors"] += 1
                if type(exc).__name__ == "MaxPayloadError":
                    # Never storable (the server's limit shrank under us): its worker is
                    # resynchronised by a snapshot instead, and replicas see the gap.
                    self.counters["oversize"] += 1
                    self._log.warning("kvevents bridge: %s: over max_payload, dropped", headers)
                    if not self._workers[key].snapshot_queued:
                        self._queue_snapshot(key, protocol.RESYNC)
                    return
                self._log.warning("kvevents bridge: publish failed, retrying: %r", exc)
                if self._closed and pause >= 1.0:
                    return  # closing: what is left is given up (replicas see the gap)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            self._acked(ack)
            return

    def _acked(self, ack: Any) -> None:
        if getattr(ack, "duplicate", False):
            self.counters["duplicates"] += 1
        else:
            self.counters["published"] += 1
        if ack.seq > self.last_stream_seq:
            self.last_stream_seq = ack.seq

    async def _write_snapshot(self, item: _Item) -> None:
        _, key, headers, _, state = item
        worker = self._workers[key]
        worker.snapshot_queued = False
        epoch, seq, whole, reason, frozen = state
        spec = worker.spec
        shape = self.shapes[spec.dialect]
        pack = redact if self.redact else self.encode
        payloads = [pack(shape.make_batch(events, spec.dp_rank)) for events in frozen]
        record = protocol.SnapshotRecord(
            model=spec.model,
            worker_id=spec.worker_id,
            dp_rank=spec.dp_rank,
            dialect=REDACTED if self.redact else spec.dialect,
            epoch=epoch,
            seq=seq,
            covers=self.last_stream_seq,
            whole=whole,
            reason=reason,
            written=time.time(),
            payloads=payloads,
        )
        data = protocol.encode_snapshot(record)
        name = protocol.snapshot_object(spec.model, spec.worker_id, spec.dp_rank)
        from nats.js.api import ObjectMeta, ObjectMetaOptions

        # Chunks under the server's max_payload (128 KiB, nats-py's default, when it allows).
        chunk = max(1024, min(128 * 1024, self._max_payload - HEADER_ROOM))
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        pause = 0.05
        give_up = time.monotonic() + SNAPSHOT_WRITE_TIMEOUT
        while True:
            try:
                await self._objects.put(name, data, meta=meta)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters["snapshot_errors"] += 1
                if self._closed or time.monotonic() >= give_up:
                    # The queue behind it must move on; the next periodic round tries again,
                    # and replicas waiting for it stay stale meanwhile.
                    logger.error("kvevents bridge: snapshot of %s not written: %r", key, exc)
                    worker.changed = True
                    return
                self._log.warning(
                    "kvevents bridge: snapshot of %s not written, retrying: %r", key, exc
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        self.counters["snapshots_written"] += 1
        self.counters["snapshot_bytes"] += len(data)
        marker = protocol.snapshot_headers(
            *key, epoch, seq, headers[protocol.WHY], uuid.uuid4().hex[:8]
        )
        await self._publish_until_stored((protocol.SNAPSHOT, key, marker, b"", None))
