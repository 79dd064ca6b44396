"""A prefix index kept equal to the engines by their event streams, for asyncio routers.

One asyncio subscriber (its core on one worker thread) follows every registered worker, a
source per `(worker_id, dp_rank)`; the index is changed only on the event loop, so queries
need no lock. What the subscriber reports decides what the index trusts:

- a delivery is applied to its worker;
- a snapshot delivery replaces the worker's state, which is whole again (not stale);
- a new epoch (the publisher restarted) clears the worker; a stream that starts again at seq
  0 is whole, one that starts later is reported lost and handled as below;
- `history_lost`: the worker is marked stale; against a publisher without snapshots (vLLM's,
  SGLang's own) its entries are also cleared, since nothing will ever resynchronise them;
- an inconsistency the index finds itself (a store under an unknown parent, a removal of
  an unknown block) marks the worker stale and, when its publisher keeps snapshots, asks
  for one, which resynchronises it;
- a worker that is unregistered loses every entry;
- an exception while applying a delivery (a defect, never expected) is logged with its
  traceback, counted (`apply_failures`), and marks the worker stale, which asks for a
  snapshot as above: the index never goes on answering from state it knows is wrong.

Several indexes (one per model) share one subscriber and one poll through an `IndexFeed`
(kvevents_runtime.feed); an index made without one makes its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .backend import IndexBackend, Worker
from .feed import IndexFeed
from .prefix import PrefixIndex
from .queries import BackendQueries
from .security import CurveClient
from .subscriber import Notice

logger = logging.getLogger("kvevents.index")


@dataclass(frozen=True)
class WorkerState:
    """What one worker's stream and entries are doing now, as routers and tools need it."""

    status: str
    """"connecting" (nothing ever arrived), "silent" (nothing for the subscriber's
    `stale_after`), "stale" (the index cannot vouch for its entries) or "active"."""
    silent_for: float | None
    """Seconds since its last message; None before the first."""
    syncing: bool
    """A replay, snapshot or info request is in flight for it."""
    expected: int | None
    """The next seq its stream is to deliver."""
    complete: bool
    """Every seq below `expected` was delivered or reported lost, and nothing is held or
    being replayed: `expected` is a cut of the stream. An idle info probe in flight does not
    change it (it asks only whether anything newer exists)."""
    instance: bytes | None
    """The publisher instance the stream is in (its info answer); None before the first
    answer, and for publishers without info. With `expected`, where the index is in which
    publisher's stream."""
    snapshots: bool
    """Its publisher keeps snapshots (a stale worker heals by itself)."""
    stale_reason: str | None


class LiveIndex(BackendQueries):
    """`await register(...)`, run `await live.run()` as a task, and `query` from the loop.
    Everything a router needs is a method here; the entries live in a backend
    (`IndexBackend`, in memory by default)."""

    feed_class: type[IndexFeed]
    """The feed bound to a wire, set by the generated face (kvevents.index)."""

    def __init__(
        self,
        block_size: int = 16,
        *,
        backend: IndexBackend | None = None,
        feed: IndexFeed | None = None,
        **subscriber_options: Any,
    ) -> None:
        if feed is not None and subscriber_options:
            raise ValueError("subscriber options belong to the shared feed")
        if backend is not None and backend.block_size != block_size:
            raise ValueError(
                f"block_size {block_size} differs from the backend's {backend.block_size}"
            )
        self.backend: IndexBackend = PrefixIndex(block_size) if backend is None else backend
        self._own_feed = feed is None
        self._feed = feed if feed is not None else self.feed_class(**subscriber_options)
        self._workers: dict[Worker, Any] = {}
        """worker -> its subscriber source."""
        self._by_source: dict[int, Worker] = {}
        self._epochs: dict[Worker, int] = {}
        self._endpoints: dict[Worker, tuple[str, str | None]] = {}
        self.counters = {
            "lost_and_cleared": 0,
            "restarts": 0,
            "snapshots": 0,
            "snapshots_requested": 0,
            "batches": 0,
            "apply_failures": 0,
        }
        self._asked: set[Worker] = set()
        """Stale workers a snapshot was asked for, until one arrives; a worker whose snapshot
        itself is inconsistent (it holds blocks whose parents it does not) stays here, stale
        and flagged, until its publisher restarts: asking again would loop."""
        self._closed = False

    # -- workers ----------------------------------------------------------------------

    @property
    def subscriber(self) -> Any:
        return self._feed.subscriber

    @property
    def feed(self) -> IndexFeed:
        return self._feed

    @property
    def endpoints(self) -> dict[Worker, tuple[str, str | None]]:
        return dict(self._endpoints)

    async def register(
        self,
        worker_id: int,
        endpoint: str,
        replay_endpoint: str | None = None,
        dp_rank: int = 0,
        topic: str | None = None,
        curve: CurveClient | None = None,
    ) -> None:
        """Follow one engine (one DP rank). `topic` None reads every topic (as Dynamo's
        indexer does), a string only that one. `curve`: its CURVE keys (default: the
        subscriber's). KeyError when it is already registered; the subscriber's ValueError
        for an endpoint it cannot use."""
        worker = (worker_id, dp_rank)
        if worker in self._workers:
            raise KeyError(f"instance {worker_id} dp_rank {dp_rank} already registered")
        self._workers[worker] = None  # reserved while the source is added
        try:
            source = await self._feed.add_source(self, endpoint, replay_endpoint, topic, curve)
        except BaseException:
            del self._workers[worker]
            raise
        self._workers[worker] = source
        self._by_source[source.index] = worker
        self._epochs[worker] = 0
        self._endpoints[worker] = (endpoint, replay_endpoint)
        self.backend.add_worker(worker)

    async def unregister(self, worker_id: int, dp_rank: int | None = None) -> int:
        """Stop following a worker (every DP rank when `dp_rank` is None) and drop its
        entries; returns how many ranks were removed."""
        gone = [w for w in self._workers if w[0] == worker_id and dp_rank in (None, w[1])]
        for worker in gone:
            source = self._workers.pop(worker)
            if source is not None:
                self._by_source.pop(source.index, None)
                await self._feed.remove_source(source)
            self._epochs.pop(worker, None)
            self._endpoints.pop(worker, None)
            self.backend.remove_worker(worker)
        return len(gone)

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers)

    def source_by_index(self, index: int) -> Any:
        worker = self._by_source.get(index)
        return None if worker is None else self._workers.get(worker)

    def resubscribed(self, old_index: int, source: Any) -> None:
        """The feed follows a worker through a new subscriber source (after a rebuild): its
        epochs start again, and it stays stale until its stream or a snapshot heals it."""
        worker = self._by_source.pop(old_index, None)
        if worker is None:
            return
        self._workers[worker] = source
        self._by_source[source.index] = worker
        # Its first delivery opens a new epoch here: the worker is cleared, and whole again
        # if the stream starts at seq 0 (otherwise history lost and a snapshot heal it).
        self._epochs[worker] = -1
        self._asked.discard(worker)
        self.backend.mark_stale(worker, "followed anew after the feed failed")

    def source(self, worker: Worker) -> Any:
        """The worker's subscriber source (its sequencer says what the stream is doing), or
        None when it is not registered."""
        return self._workers.get(worker)

    # -- feeding ----------------------------------------------------------------------

    async def step(self, timeout: float = 0.05) -> int:
        """One poll of the feed, applied (every index sharing it is fed); returns the
        batches applied."""
        return await self._feed.step(timeout)

    def take_deliveries(self, deliveries: list[Any]) -> int:
        """Apply this index's share of one poll (the feed calls this)."""
        applied = 0
        for delivery in deliveries:
            worker = self._by_source.get(delivery.source)
            if worker is None:
                continue  # unregistered while its batches were in flight
            try:
                self._take(worker, delivery)
            except Exception as exc:
                self.counters["apply_failures"] += 1
                logger.exception(
                    "kvevents index: batch seq %d of worker %s not applied", delivery.seq, worker
                )
                self.backend.mark_stale(worker, f"a batch could not be applied: {exc!r}")
                continue
            applied += 1
        self.counters["batches"] += applied
        return applied

    def _take(self, worker: Worker, delivery: Any) -> None:
        index = self.backend
        if delivery.epoch != self._epochs[worker]:
            self._epochs[worker] = delivery.epoch
            self._asked.discard(worker)
            self.counters["restarts"] += 1
            index.clear_worker(worker)
            if delivery.seq == 0 and not delivery.snapshot:
                index.resync(worker)  # the new instance's whole stream follows
        if delivery.snapshot:
            self.counters["snapshots"] += 1
            index.resync(worker, [delivery.batch])
            if worker not in index.stale:
                self._asked.discard(worker)
        else:
            index.apply(worker, delivery.batch)

    async def heal(self) -> None:
        """Ask a snapshot of every stale worker whose publisher keeps them (once each)."""
        for worker in [w for w in self.backend.stale if w not in self._asked]:
            source = self._workers.get(worker)
            if source is not None and source.sequencer.snapshots_available:
                self._asked.add(worker)
                if await self._feed.request_snapshot(source):
                    self.counters["snapshots_requested"] += 1

    def mark_all_stale(self, reason: str) -> None:
        """The feed failed: nothing this index holds can be vouched for until healed."""
        for worker in self._workers:
            self.backend.mark_stale(worker, reason)
        self._asked.clear()

    def take_notice(self, notice: Notice) -> None:
        """A subscriber notice about one of this index's sources (the feed calls this)."""
        worker = self._by_source.get(notice.source)
        if worker is None or notice.kind != "history_lost":
            return
        source = self._workers.get(worker)
        with_snapshots = source is not None and source.sequencer.snapshots_available
        if not with_snapshots:
            self.counters["lost_and_cleared"] += 1
            self.backend.clear_worker(worker)
        self.backend.mark_stale(worker, f"history lost: {notice.detail.get('reason')}")

    async def run(self) -> None:
        """Apply the streams until `close()` (with a shared feed, run the feed instead)."""
        if not self._own_feed:
            raise RuntimeError("this index shares a feed: run the feed")
        await self._feed.run()

    # -- queries ----------------------------------------------------------------------

    def all_counters(self) -> dict[str, int]:
        """The backend's counters and this index's own."""
        return {**self.backend.counters, **self.counters}

    def state(self, worker: Worker) -> WorkerState | None:
        """The worker's stream and entries now; None when it is not registered."""
        if worker not in self._workers:
            return None
        reason = self.backend.stale.get(worker)
        source = self._workers.get(worker)
        if source is None or not source.heard:
            status, silent_for = "connecting", None
        else:
            silent_for = round(time.monotonic() - source.last_activity, 3)
            status = "stale" if reason is not None else ("silent" if source.stale else "active")
        sequencer = None if source is None else source.sequencer
        return WorkerState(
            status=status,
            silent_for=silent_for,
            syncing=sequencer is not None and sequencer.outstanding is not None,
            expected=None if source is None else source.expected,
            complete=sequencer is not None and sequencer.inline and sequencer.expected is not None,
            instance=None if sequencer is None else sequencer.instance,
            snapshots=sequencer is not None and sequencer.snapshots_available,
            stale_reason=reason,
        )

    async def close(self) -> None:
        """Idempotent. A shared feed is left to its owner."""
        self._closed = True
        if self._own_feed:
            await self._feed.close()

    async def __aenter__(self) -> LiveIndex:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
