"""A router replica's index, bootstrapped from JetStream alone: no live engine needed.

Start-up reads every snapshot of its model from the object store (each worker's whole
block set and the stream sequence it covers), then reads the stream from the lowest
covered sequence with one ordered consumer (no durable state on the server, no acks, any
number of replicas), skipping what each snapshot already holds. The `Tracker` decides
every step; this module does the I/O and applies its answers to the index backend.

What it promises: once it has read the stream to a point, every worker it does not name
stale holds what its engine held at that point of its stream (tests/fleet checks this
against the engines under faults). `lag` is how many messages of its model the server
holds that it has not read yet; `caught_up` turns true the first time that reached zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ..backend import IndexBackend, Worker
from ..errors import DecodeError
from ..liveindex import WorkerState
from ..prefix import PrefixIndex
from ..queries import BackendQueries
from ..ratelimit import RateLimitedLog
from . import protocol
from .natsio import connect_jetstream, is_transient, read_object
from .redact import is_redacted, unredact
from .tracker import Action, Apply, Clear, Fetch, MarkStale, Resync, Tracker, start_sequence

logger = logging.getLogger("kvevents.replica")


SNAPSHOT_READ_ATTEMPT = 10.0
"""Seconds one read of a snapshot object may take before it is tried again."""
SNAPSHOT_READ_BUDGET = 30.0
"""Seconds of attempts before a snapshot counts as unreadable (`fetch_errors`)."""


class FleetIndex(BackendQueries):
    """`await index.start()`; queries answer from the event loop while it reads."""

    decode: Callable[[bytes], Any]
    """A payload to a canonical batch, set by the generated face (kvevents.fleet)."""

    def __init__(
        self,
        servers: str | list[str],
        model: str = "default",
        *,
        block_size: int = 16,
        backend: IndexBackend | None = None,
        stream: str = protocol.STREAM,
        root: str = protocol.ROOT,
        nats_options: Mapping[str, Any] | None = None,
        heartbeat: float = 1.0,
    ) -> None:
        protocol.model_token(model)
        self.servers = servers
        self.model = model
        self.stream = protocol.check_stream_name(stream)
        self.bucket = protocol.bucket_name(stream)
        self.root = protocol.check_root(root)
        self.backend: IndexBackend = PrefixIndex(block_size) if backend is None else backend
        self.tracker = Tracker()
        self._nats_options = dict(nats_options or {})
        self._heartbeat = heartbeat
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._objects: Any = None
        self._lock = asyncio.Lock()
        self.position = 0
        """The newest stream sequence read (and applied)."""
        self.lag: int | None = None
        """Messages of this model the server holds past `position` (None before the first)."""
        self.caught_up = False
        self.started_at: float | None = None
        self.caught_up_after: float | None = None
        """Seconds from start to the first time `lag` reached zero."""
        self.snapshots_at_start = 0
        self.counters: dict[str, int] = {
            "decode_errors": 0,
            "fetch_errors": 0,
            "apply_failures": 0,
            "redelivered": 0,
        }
        self._log = RateLimitedLog(logger)
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Connect, load every snapshot of the model and start reading the stream. Waits up
        to `timeout` for the stream to exist (a replica may start before any bridge)."""
        self.started_at = time.monotonic()
        self._nc, self._js = await connect_jetstream(self.servers, **self._nats_options)
        import nats

        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._js.stream_info(self.stream)
                break
            except nats.js.errors.NotFoundError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no stream {self.stream!r} on the server after {timeout} s"
                    ) from None
                await asyncio.sleep(0.2)
        start = await self._load_snapshots()
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if start is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            )
        self._sub = await self._js.subscribe(
            protocol.model_filter(self.model, self.root),
            stream=self.stream,
            cb=self._on_message,
            ordered_consumer=True,
            idle_heartbeat=self._heartbeat,
            config=config,
        )

    async def _load_snapshots(self) -> int | None:
        """Applies every snapshot of the model; returns the stream sequence to read from
        (None: from the first)."""
        import nats

        try:
            objects = await self._object_store()
            infos = await objects.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return None
        prefix = protocol.model_token(self.model) + "."
        covers: dict[Worker, int] = {}
        for info in infos:
            if not info.name.startswith(prefix) or info.deleted:
                continue
            record = await self._read_snapshot(info.name)
            if record is None:
                continue
            worker = (record.worker_id, record.dp_rank)
            self.backend.add_worker(worker)
            self._execute(self.tracker.snapshot(worker, record))
            covers[worker] = record.covers
            self.snapshots_at_start += 1
        return start_sequence(covers, await self._workers_in_stream() if covers else set())

    async def _workers_in_stream(self) -> set[Worker]:
        """The workers of the model with messages in the stream now."""
        info = await self._js.stream_info(
            self.stream, subjects_filter=protocol.model_filter(self.model, self.root)
        )
        workers: set[Worker] = set()
        for subject in (info.state.subjects or {}).keys():
            try:
                _, worker_id, dp_rank = protocol.parse_subject(subject, self.root)
            except ValueError:
                continue
            workers.add((worker_id, dp_rank))
        return workers

    async def _object_store(self) -> Any:
        if self._objects is None:
            self._objects = await self._js.object_store(self.bucket)
        return self._objects

    async def _read_snapshot(self, name: str) -> protocol.SnapshotRecord | None:
        """The snapshot, or None (counted, logged) after `SNAPSHOT_READ_BUDGET` seconds of
        attempts: a NATS restart in the middle of a read is tried again, not waited on
        forever (the reader of the whole stream waits with it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SNAPSHOT_READ_BUDGET
        while True:
            try:
                objects = await asyncio.wait_for(self._object_store(), SNAPSHOT_READ_ATTEMPT)
                data = await read_object(
                    objects, self._js, self.bucket, name, SNAPSHOT_READ_ATTEMPT
                )
                return protocol.decode_snapshot(data)
            except Exception as exc:
                if is_transient(exc) and loop.time() + SNAPSHOT_READ_ATTEMPT <= deadline:
                    await asyncio.sleep(0.2)
                    continue
                self.counters["fetch_errors"] += 1
                self._log.warning("kvevents replica: snapshot %s unreadable: %r", name, exc)
                return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception:
                pass

    async def __aenter__(self) -> FleetIndex:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- reading the stream -------------------------------------------------------------

    async def _on_message(self, msg: Any) -> None:
        meta = msg.metadata
        stream_seq = meta.sequence.stream
        if stream_seq <= self.position:
            self.counters["redelivered"] += 1  # the ordered consumer started again
            return
        try:
            await self._place(msg, stream_seq)
        finally:
            # Only once its actions are done (a snapshot it asked for included): `sync()`
            # returning means what was read is in the index.
            self.position = stream_seq
            self.lag = meta.num_pending
            if meta.num_pending == 0 and not self.caught_up:
                self.caught_up = True
                if self.started_at is not None:
                    self.caught_up_after = time.monotonic() - self.started_at

    async def _place(self, msg: Any, stream_seq: int) -> None:
        try:
            try:
                _, worker_id, dp_rank = protocol.parse_subject(msg.subject, self.root)
            except ValueError:
                self.tracker.counters["malformed"] += 1
                return
            worker = (worker_id, dp_rank)
            if worker not in self.tracker.tracks:
                self.backend.add_worker(worker)
            actions = self.tracker.message(stream_seq, worker, msg.headers or {}, msg.data)
            for action in actions:
                if isinstance(action, Fetch):
                    await self._fetch(action.worker)
                else:
                    self._execute([action])
        except Exception:
            # A defect must not stop the consumer's callback task for good: it is logged and
            # counted, and the index is no longer trusted as a whole.
            self.counters["apply_failures"] += 1
            logger.exception("kvevents replica: a stream message could not be applied")
            for worker in self.backend.workers:
                self.backend.mark_stale(worker, "a stream message could not be applied")

    async def _fetch(self, worker: Worker) -> None:
        name = protocol.snapshot_object(self.model, *worker)
        record = await self._read_snapshot(name)
        if record is None:
            self.backend.mark_stale(worker, "its snapshot could not be read")
            return
        self._execute(self.tracker.snapshot(worker, record))

    def _decode_any(self, payload: bytes) -> Any:
        """An engine's batch, or a redacted one (bridge `--redact`)."""
        if is_redacted(payload):
            return unredact(payload)
        return self.decode(payload)

    def _execute(self, actions: list[Action]) -> None:
        backend = self.backend
        decode = self._decode_any
        for action in actions:
            try:
                if isinstance(action, Apply):
                    backend.apply(action.worker, decode(action.payload))
                elif isinstance(action, Resync):
                    backend.resync(action.worker, [decode(p) for p in action.payloads])
                elif isinstance(action, Clear):
                    backend.clear_worker(action.worker)
                elif isinstance(action, MarkStale):
                    backend.mark_stale(action.worker, action.reason)
            except (DecodeError, msgspec.DecodeError) as exc:
                self.counters["decode_errors"] += 1
                backend.mark_stale(action.worker, f"a payload that is not a batch: {exc}")

    async def step(self, timeout: float = 0.0) -> None:
        """Give the event loop to the reader for `timeout` seconds (it reads on the loop, in
        the consumer's callback; a caller that never awaits starves it)."""
        await asyncio.sleep(timeout)

    async def sync(self, timeout: float = 30.0) -> None:
        """Wait until every message of this model the server holds now has been read;
        TimeoutError saying how far it got otherwise."""
        import nats

        deadline = time.monotonic() + timeout
        state = "no answer from NATS yet"
        while time.monotonic() < deadline:
            try:
                consumer = await self._sub.consumer_info()
            except (TimeoutError, nats.errors.Error) as exc:
                # The ordered consumer is being made again (after a NATS restart).
                state = f"NATS: {exc!r}"
            else:
                delivered = consumer.delivered.stream_seq or 0
                if consumer.num_pending == 0 and delivered <= self.position:
                    return
                state = f"{consumer.num_pending} more on the server, delivered up to {delivered}"
            await asyncio.sleep(0.05)
        raise TimeoutError(f"replica read up to stream seq {self.position} in {timeout} s; {state}")

    # -- queries ------------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return self.backend.workers

    def all_counters(self) -> dict[str, int]:
        return {**self.backend.counters, **self.tracker.counters, **self.counters}

    @property
    def endpoints(self) -> dict[Worker, tuple[str, str | None]]:
        """worker -> (its subject, None): where this replica reads it."""
        return {
            worker: (protocol.subject(self.model, *worker, self.root), None)
            for worker in self.backend.workers
        }

    def state(self, worker: Worker) -> WorkerState | None:
        """As `LiveIndex.state`: "stale" or "active", and where its stream is."""
        track = self.tracker.tracks.get(worker)
        if track is None:
            return None
        reason = self.backend.stale.get(worker)
        return WorkerState(
            status="stale" if reason is not None else "active",
            silent_for=None,
            syncing=False,
            expected=track.expected,
            complete=track.whole,
            instance=None,
            snapshots=True,
            stale_reason=reason,
        )

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def progress(self) -> dict[str, Any]:
        """Where the replica is, for /health and tests."""
        return {
            "position": self.position,
            "lag": self.lag,
            "caught_up": self.caught_up,
            "caught_up_after": self.caught_up_after,
            "snapshots_at_start": self.snapshots_at_start,
            "workers": len(self.backend.workers),
            "stale": len(self.backend.stale),
            "connected": self.connected,
        }
