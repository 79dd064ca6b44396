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
- a worker that is unregistered loses every entry.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .prefix import PrefixIndex, Worker
from .subscriber import Notice


class LiveIndex:
    """`await register(...)`, run `await live.run()` as a task, and `query` from the loop."""

    subscriber_class: Any
    """The asyncio subscriber bound to a wire, set by the generated face (kvevents.index)."""

    def __init__(self, block_size: int = 16, **subscriber_options: Any) -> None:
        self.index = PrefixIndex(block_size)
        self._notices: deque[Notice] = deque()
        options = {"idle_probe": 1.0, "stale_after": 10.0, **subscriber_options}
        options["on_notice"] = self._notices.append  # runs on the subscriber's thread
        self._sub = self.subscriber_class(sources=[], **options)
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
        }
        self._asked: set[Worker] = set()
        """Stale workers a snapshot was asked for, until one arrives; a worker whose snapshot
        itself is inconsistent (it holds blocks whose parents it does not) stays here, stale
        and flagged, until its publisher restarts: asking again would loop."""
        self._closed = False

    # -- workers ----------------------------------------------------------------------

    @property
    def subscriber(self) -> Any:
        return self._sub

    @property
    def endpoints(self) -> dict[Worker, tuple[str, str | None]]:
        return dict(self._endpoints)

    async def register(
        self, worker_id: int, endpoint: str, replay_endpoint: str | None = None, dp_rank: int = 0
    ) -> None:
        """Follow one engine (one DP rank). KeyError when it is already registered; the
        subscriber's ValueError for an endpoint it cannot use."""
        worker = (worker_id, dp_rank)
        if worker in self._workers:
            raise KeyError(f"instance {worker_id} dp_rank {dp_rank} already registered")
        self._workers[worker] = None  # reserved while the source is added
        try:
            source = await self._sub.add_source(endpoint, replay_endpoint)
        except BaseException:
            del self._workers[worker]
            raise
        self._workers[worker] = source
        self._by_source[source.index] = worker
        self._epochs[worker] = 0
        self._endpoints[worker] = (endpoint, replay_endpoint)
        self.index.add_worker(worker)

    async def unregister(self, worker_id: int, dp_rank: int | None = None) -> int:
        """Stop following a worker (every DP rank when `dp_rank` is None) and drop its
        entries; returns how many ranks were removed."""
        gone = [w for w in self._workers if w[0] == worker_id and dp_rank in (None, w[1])]
        for worker in gone:
            source = self._workers.pop(worker)
            if source is not None:
                self._by_source.pop(source.index, None)
                await self._sub.remove_source(source)
            self._epochs.pop(worker, None)
            self._endpoints.pop(worker, None)
            self.index.remove_worker(worker)
        return len(gone)

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers)

    def source(self, worker: Worker) -> Any:
        """The worker's subscriber source (its sequencer says what the stream is doing), or
        None when it is not registered."""
        return self._workers.get(worker)

    # -- feeding ----------------------------------------------------------------------

    async def step(self, timeout: float = 0.05) -> int:
        """One poll of the subscriber, applied; returns the batches applied."""
        deliveries = await self._sub.poll(timeout, 256)
        self._take_notices()
        applied = 0
        index = self.index
        for delivery in deliveries:
            worker = self._by_source.get(delivery.source)
            if worker is None:
                continue  # unregistered while its batches were in flight
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
            applied += 1
        self.counters["batches"] += applied
        for worker in [w for w in index.stale if w not in self._asked]:
            source = self._workers.get(worker)
            if source is not None and source.sequencer.snapshots_available:
                self._asked.add(worker)
                if await self._sub.request_snapshot(source):
                    self.counters["snapshots_requested"] += 1
        return applied

    def _take_notices(self) -> None:
        notices = self._notices
        while notices:
            notice = notices.popleft()
            worker = self._by_source.get(notice.source)
            if worker is None or notice.kind != "history_lost":
                continue
            source = self._workers.get(worker)
            with_snapshots = source is not None and source.sequencer.snapshots_available
            if not with_snapshots:
                self.counters["lost_and_cleared"] += 1
                self.index.clear_worker(worker)
            self.index.mark_stale(worker, f"history lost: {notice.detail.get('reason')}")

    async def run(self) -> None:
        """Apply the streams until `close()`."""
        while not self._closed:
            await self.step()

    # -- queries ----------------------------------------------------------------------

    def query(self, tokens: Any, lora_name: str | None = None, cache_salt: str | None = None):  # type: ignore[no-untyped-def]
        return self.index.query(tokens, lora_name, cache_salt)

    async def close(self) -> None:
        """Idempotent."""
        self._closed = True
        await self._sub.close()

    async def __aenter__(self) -> LiveIndex:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
