"""The seam between a live index and where its entries are kept.

`LiveIndex` decides what to trust (what the subscriber reports, when to clear, when to ask for
a snapshot); a backend keeps the entries and answers matches. The in-memory `PrefixIndex` is
one backend; a shared store (Redis/Valkey) is meant to be another. The contract every backend
keeps, and the reference-model fuzz checks through this protocol
(`tests/index/test_prefix_index.py`):

- `apply` takes one batch of a worker's events in stream order. Stores chain under their
  parent (an unknown parent, or the removal of an unknown block, marks the worker stale with
  a reason and never raises); blocks keep their tier per entry; an engine block id that moves
  to another path moves with it.
- `resync` replaces a worker's entries with the batches given and clears its stale mark;
  `clear_worker` drops its entries and keeps it registered; `remove_worker` forgets it.
- `match` answers, per worker, how many leading blocks of the chained local hashes it holds
  (per tier), and whether it is stale; `query` hashes tokens first. A stale worker is
  answered too, flagged: the caller decides what a stale answer is worth.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

Worker = tuple[int, int]
"""(worker_id, dp_rank)."""


@runtime_checkable
class IndexBackend(Protocol):
    @property
    def block_size(self) -> int: ...

    @property
    def stale(self) -> Mapping[Worker, str]:
        """worker -> why its entries cannot be vouched for."""
        ...

    @property
    def counters(self) -> Mapping[str, int]:
        """What the backend counted (inconsistencies, resyncs, ...), for /metrics."""
        ...

    @property
    def workers(self) -> list[Worker]: ...

    def add_worker(self, worker: Worker) -> None: ...

    def remove_worker(self, worker: Worker) -> None: ...

    def clear_worker(self, worker: Worker) -> None: ...

    def mark_stale(self, worker: Worker, reason: str) -> None: ...

    def resync(self, worker: Worker, batches: Iterable[Any] = ()) -> None: ...

    def apply(self, worker: Worker, batch: Any) -> None: ...

    def match(self, hashes: list[int]) -> dict[Worker, Any]: ...

    def query(
        self, tokens: Any, lora_name: str | None = None, cache_salt: str | None = None
    ) -> dict[Worker, Any]: ...

    def block_count(self, worker: Worker) -> int: ...

    def engine_blocks(self, worker: Worker) -> set[Any]:
        """The engine block ids the worker holds (to compare with an engine's cache)."""
        ...

    def entries(self) -> int: ...

    def chains(self, worker: Worker) -> Iterator[tuple[Any, list[tuple[Any, int]]]]: ...
