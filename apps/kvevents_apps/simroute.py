"""The KV router's cost as NVIDIA Dynamo computes it, with its own books of each worker's load.

Per worker the router tracks, at the instant it routes (so requests arriving together see each
other): the prompt tokens still to prefill of every request routed there whose first token has
not come (added at routing, removed at the first token), and the set of prompt block hashes of
every routed request not yet finished (deduplicated: a prefix shared by several counts once;
freed at completion). A request's cost on a worker, in blocks, is

    overlap_weight · (its uncached tokens + the worker's tokens still to prefill) / block_size
    + (its blocks not already active there + the worker's active blocks)

and the lowest cost wins; ties are broken at random (seeded), as Dynamo's selector does at
temperature 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class WorkerLoad:
    prefill_tokens: int = 0
    """Uncached prompt tokens of routed requests whose first token has not come."""
    blocks: dict[int, int] = field(default_factory=dict)
    """Prompt block hash -> routed unfinished requests holding it."""
    pending_prefill: dict[int, int] = field(default_factory=dict)
    """request -> the prefill tokens it added (until its first token)."""
    holding: dict[int, list[int]] = field(default_factory=dict)
    """request -> its prompt block hashes (until it finishes)."""


class DynamoCost:
    def __init__(self, workers: int, block_size: int, overlap_weight: float, seed: int) -> None:
        self.loads = [WorkerLoad() for _ in range(workers)]
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.rng = random.Random(seed)

    def cost(self, worker: int, hashes: set[int], tokens: int, overlap_blocks: int) -> float:
        """`hashes`: the request's prompt block hashes (chained, so all distinct)."""
        load = self.loads[worker]
        uncached = max(0, tokens - overlap_blocks * self.block_size)
        new_blocks = len(hashes) - len(load.blocks.keys() & hashes)
        prefill_blocks = (uncached + load.prefill_tokens) / self.block_size
        return self.overlap_weight * prefill_blocks + new_blocks + len(load.blocks)

    def choose(self, hashes: list[int], tokens: int, overlap: dict[int, int]) -> int:
        """The worker of least cost; `overlap`: worker -> cached prefix blocks there."""
        distinct = set(hashes)
        costs = [self.cost(w, distinct, tokens, overlap.get(w, 0)) for w in range(len(self.loads))]
        least = min(costs)
        tied = [w for w, c in enumerate(costs) if c - least <= 1e-9 * max(1.0, abs(least))]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def routed(
        self, request: int, worker: int, hashes: list[int], tokens: int, overlap_blocks: int
    ) -> None:
        load = self.loads[worker]
        uncached = max(0, tokens - overlap_blocks * self.block_size)
        load.prefill_tokens += uncached
        load.pending_prefill[request] = uncached
        blocks = load.blocks
        get = blocks.get
        for h in hashes:  # chained hashes: all distinct
            blocks[h] = get(h, 0) + 1
        load.holding[request] = hashes

    def first_token(self, request: int, worker: int) -> None:
        load = self.loads[worker]
        load.prefill_tokens -= load.pending_prefill.pop(request, 0)

    def finished(self, request: int, worker: int) -> None:
        self.first_token(request, worker)
        load = self.loads[worker]
        hashes = load.holding.pop(request, None)
        if hashes is None:
            return
        blocks = load.blocks
        for h in hashes:
            left = blocks[h] - 1
            if left:
                blocks[h] = left
            else:
                del blocks[h]
