"""The query face an index shows over its backend: `LiveIndex` (engines over ZeroMQ) and
`FleetIndex` (a replica reading NATS) answer alike because both are this, over an
`IndexBackend`; only how the backend is fed differs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from .backend import IndexBackend, Worker
from .prefix import Match


class BackendQueries:
    backend: IndexBackend

    @property
    def block_size(self) -> int:
        return self.backend.block_size

    def query(
        self, tokens: Any, lora_name: str | None = None, cache_salt: str | None = None
    ) -> dict[Worker, Match]:
        return self.backend.query(tokens, lora_name, cache_salt)

    def match(self, hashes: list[int]) -> dict[Worker, Match]:
        """As `query`, from Dynamo local block hashes."""
        return self.backend.match(hashes)

    @property
    def stale(self) -> Mapping[Worker, str]:
        """worker -> why its entries cannot be vouched for (read-only)."""
        return MappingProxyType(self.backend.stale)

    def entries(self) -> int:
        """(worker, block) entries held."""
        return self.backend.entries()

    def engine_blocks(self, worker: Worker) -> set[Any]:
        return self.backend.engine_blocks(worker)

    def chains(self, worker: Worker) -> Iterator[tuple[Any, list[tuple[Any, int]]]]:
        return self.backend.chains(worker)
