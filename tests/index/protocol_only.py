"""An index backend that is nothing but `IndexBackend`: every call is delegated to a hidden
in-memory index, and nothing else is reachable. Code that works on it uses the protocol only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from kvevents.index import PrefixIndex

Worker = tuple[int, int]


class ProtocolOnly:
    __slots__ = ("_inner", "block_size")

    def __init__(self, block_size: int) -> None:
        self._inner = PrefixIndex(block_size)
        self.block_size = block_size

    @property
    def stale(self) -> Mapping[Worker, str]:
        return MappingProxyType(self._inner.stale)

    @property
    def counters(self) -> Mapping[str, int]:
        return MappingProxyType(self._inner.counters)

    @property
    def workers(self) -> list[Worker]:
        return self._inner.workers

    def add_worker(self, worker: Worker) -> None:
        self._inner.add_worker(worker)

    def remove_worker(self, worker: Worker) -> None:
        self._inner.remove_worker(worker)

    def clear_worker(self, worker: Worker) -> None:
        self._inner.clear_worker(worker)

    def mark_stale(self, worker: Worker, reason: str) -> None:
        self._inner.mark_stale(worker, reason)

    def resync(self, worker: Worker, batches: Iterable[Any] = ()) -> None:
        self._inner.resync(worker, batches)

    def apply(self, worker: Worker, batch: Any) -> None:
        self._inner.apply(worker, batch)

    def match(self, hashes: list[int]) -> dict[Worker, Any]:
        return self._inner.match(hashes)

    def query(
        self, tokens: Any, lora_name: str | None = None, cache_salt: str | None = None
    ) -> dict[Worker, Any]:
        return self._inner.query(tokens, lora_name, cache_salt)

    def block_count(self, worker: Worker) -> int:
        return self._inner.block_count(worker)

    def engine_blocks(self, worker: Worker) -> set[Any]:
        return self._inner.engine_blocks(worker)

    def entries(self) -> int:
        return self._inner.entries()

    def chains(self, worker: Worker) -> Iterator[tuple[Any, list[tuple[Any, int]]]]:
        return self._inner.chains(worker)
