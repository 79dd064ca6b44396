"""A KV prefix index over many workers whose state equals the engines' caches.

Nodes are keyed by Dynamo-compatible local block hashes (`blockhash`), one tree shared by
every worker; each worker (a `(worker_id, dp_rank)` pair) also maps its engine block hashes
to the nodes it holds, which is how parents are found and removals applied. Semantics, chosen
to equal the engine's cache rather than to be convenient:

- BlockStored links to its parent by this worker's engine hash; a store whose parent this
  worker does not hold is never re-rooted: it is skipped and the worker marked stale.
- BlockRemoved removes exactly the named blocks of that worker (per tier); descendants stay,
  as they do in the engine, and matching stops at the gap. Removing a block the worker does
  not hold marks it stale.
- AllBlocksCleared clears that worker (that `(worker_id, dp_rank)` only).
- Blocks smaller than the index's block size (partial blocks) are counted and ignored.
- Tiers (`medium`): GPU (or none), CPU, disk, external, kept per (worker, block).
- A worker holds a block under one engine id: storing the same token path under another id
  renames it (the old id is forgotten); storing an id again elsewhere moves it.

A stale worker's entries are kept but flagged in every answer (`Match.stale`), until
`resync` (a snapshot, or a restart whose stream starts at seq 0) says its state is whole.
Every anomaly is counted in `counters`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .backend import Worker
from .blockhash import block_seed, local_block_hashes

GPU, CPU, DISK, EXTERNAL = 1, 2, 4, 8
TIER_OF_MEDIUM = {
    None: GPU,
    "GPU": GPU,
    "DEVICE": GPU,
    "CPU": CPU,
    "CPU_PINNED": CPU,
    "CPU_TIER1": CPU,
    "CPU_TIER2": DISK,
    "DISK": DISK,
    "NVME": DISK,
    "STORAGE": DISK,
    "EXTERNAL": EXTERNAL,
    "NETWORK": EXTERNAL,
    "REMOTE": EXTERNAL,
    "SHARED": EXTERNAL,
}
"""Dynamo's medium-to-tier mapping; an unknown medium is counted and taken as external."""
TIER_NAMES = {GPU: "gpu", CPU: "cpu", DISK: "disk", EXTERNAL: "external"}
_CUMULATIVE = (("gpu", GPU), ("cpu", GPU | CPU), ("disk", GPU | CPU | DISK))


class Node:
    """One block of a prefix. Workers are bits (`PrefixIndex.bit`): who holds a block is
    one int, so a query's walk is integer `&` and a node costs no set (an empty Python set
    is 216 bytes; the masks of up to 8 workers are cached small ints)."""

    __slots__ = ("children", "key", "parent", "tiers", "workers")

    def __init__(self, parent: Node | None, key: int) -> None:
        self.parent = parent
        self.key = key
        self.children: dict[int, Node] | None = None
        """Created with the first child: most nodes are leaves."""
        self.workers = 0
        """Worker bits holding this block, in any tier."""
        self.tiers: dict[int, int] | None = None
        """worker bit -> tiers (bit mask), for workers holding it other than in GPU alone."""

    def mask(self, bit: int) -> int:
        if not self.workers & bit:
            return 0
        tiers = self.tiers
        return GPU if tiers is None else tiers.get(bit, GPU)

    def set_mask(self, bit: int, mask: int) -> None:
        if not mask:
            self.workers &= ~bit
            if self.tiers is not None:
                self.tiers.pop(bit, None)
                if not self.tiers:
                    self.tiers = None
            return
        self.workers |= bit
        if mask == GPU:
            if self.tiers is not None:
                self.tiers.pop(bit, None)
                if not self.tiers:
                    self.tiers = None
        else:
            if self.tiers is None:
                self.tiers = {}
            self.tiers[bit] = mask


@dataclass(frozen=True)
class Match:
    """One worker's answer to a query. Counts are leading blocks; tiers are cumulative
    (gpu ≤ cpu ≤ disk ≤ blocks, as in Mooncake's RFC and Dynamo's /query)."""

    blocks: int
    gpu: int
    cpu: int
    disk: int
    total_blocks: int
    """Every block the worker holds (for tie-breaks)."""
    stale: bool


COUNTER_NAMES = (
    "events",
    "blocks_stored",
    "blocks_removed",
    "cleared",
    "unknown_parent",
    "unknown_removal",
    "partial_blocks",
    "block_size_mismatch",
    "bad_events",
    "unknown_medium",
    "stale_marked",
    "resyncs",
)


class PrefixIndex:
    """The in-memory index backend (kvevents_runtime.backend.IndexBackend). Not thread-safe:
    feed and query it from one thread (or one event loop)."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.root = Node(None, 0)
        self.lookup: dict[Worker, dict[Any, Node]] = {}
        """worker -> engine block hash -> node."""
        self.stale: dict[Worker, str] = {}
        """worker -> why it is stale."""
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.bits: dict[Worker, int] = {}
        """worker -> its bit in every node's `workers` (given at first sight, freed when
        the worker is removed, reused by the next one)."""
        self._worker_of_bit: dict[int, Worker] = {}
        self._free_bits: list[int] = []
        self._other_tiers = 0
        """(worker, block) entries in a tier other than GPU: answers need per-tier walks."""

    # -- workers ----------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return list(self.lookup)

    def add_worker(self, worker: Worker) -> None:
        self._known(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Drop every entry of the worker and forget it (its bit is free again: no node
        holds it once its entries are dropped)."""
        self.clear_worker(worker)
        self.lookup.pop(worker, None)
        self.stale.pop(worker, None)
        bit = self.bits.pop(worker, None)
        if bit is not None:
            del self._worker_of_bit[bit]
            self._free_bits.append(bit)

    def clear_worker(self, worker: Worker) -> None:
        blocks = self.lookup.get(worker)
        if not blocks:
            return
        bit = self.bits[worker]
        for node in list(blocks.values()):
            self._drop(bit, node, node.mask(bit))
        blocks.clear()

    def _known(self, worker: Worker) -> dict[Any, Node]:
        """The worker's blocks, giving it a bit at first sight."""
        blocks = self.lookup.get(worker)
        if blocks is None:
            blocks = self.lookup[worker] = {}
            free = self._free_bits
            bit = free.pop() if free else 1 << len(self.bits)
            self.bits[worker] = bit
            self._worker_of_bit[bit] = worker
        return blocks

    def mark_stale(self, worker: Worker, reason: str) -> None:
        self._known(worker)
        if worker not in self.stale:
            self.counters["stale_marked"] += 1
        self.stale[worker] = reason

    def resync(self, worker: Worker, batches: Iterable[Any] = ()) -> None:
        """Replace the worker's state with `batches` (a snapshot; none after a restart whose
        stream starts at seq 0) and clear its stale mark."""
        self.clear_worker(worker)
        self.stale.pop(worker, None)
        self.counters["resyncs"] += 1
        for batch in batches:
            self.apply(worker, batch)

    # -- events -----------------------------------------------------------------------

    def apply(self, worker: Worker, batch: Any) -> None:
        """Apply one decoded batch (canonical events) of the worker's stream."""
        counters = self.counters
        blocks = self._known(worker)
        bit = self.bits[worker]
        for event in batch.events:
            counters["events"] += 1
            kind = type(event).__name__
            if kind == "BlockStored":
                self._store(worker, bit, blocks, event)
            elif kind == "BlockRemoved":
                self._remove(worker, bit, blocks, event)
            elif kind == "AllBlocksCleared":
                counters["cleared"] += 1
                self.clear_worker(worker)
            else:
                counters["bad_events"] += 1

    def _tier(self, medium: Any) -> int:
        if medium is not None and not isinstance(medium, str):
            medium = getattr(medium, "value", str(medium))
        tier = TIER_OF_MEDIUM.get(medium if medium is None else medium.upper())
        if tier is None:
            self.counters["unknown_medium"] += 1
            return EXTERNAL
        return tier

    def _store(self, worker: Worker, bit: int, blocks: dict[Any, Node], event: Any) -> None:
        counters = self.counters
        size = event.block_size
        if size != self.block_size:
            counters["partial_blocks" if size < self.block_size else "block_size_mismatch"] += 1
            return
        hashes = event.block_hashes
        parent_hash = event.parent_block_hash
        if parent_hash is None:
            node = self.root
        else:
            found = blocks.get(parent_hash)
            if found is None:
                counters["unknown_parent"] += 1
                self.mark_stale(worker, "a stored block's parent is unknown")
                return
            node = found
        try:
            keys = local_block_hashes(
                event.token_ids, size, event.lora_name, getattr(event, "cache_salt", None)
            )
        except (OverflowError, TypeError):
            counters["bad_events"] += 1  # token pairs or ids beyond u32: not hashable here
            return
        if len(keys) < len(hashes):
            counters["bad_events"] += 1
            self.mark_stale(worker, "a stored event has fewer tokens than blocks")
            return
        tier = self._tier(event.medium)
        not_gpu = tier != GPU
        for block_hash, key in zip(hashes, keys, strict=False):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(key)
            if child is None:
                child = children[key] = Node(node, key)
            old = blocks.get(block_hash)
            moved = old is not None and old is not child
            if old is not child and child.workers & bit:
                # The worker holds this block under another id: the engine renamed it;
                # the old id is forgotten (rare, so a scan is fine).
                for alias, node_of in blocks.items():
                    if node_of is child and alias != block_hash:
                        del blocks[alias]
                        break
            if not child.workers & bit and tier == GPU:
                child.workers |= bit  # the common case, without the tier bookkeeping
            else:
                mask = child.mask(bit)
                if not mask & tier:
                    child.set_mask(bit, mask | tier)
                    if not_gpu:
                        self._other_tiers += 1
            blocks[block_hash] = child
            if moved:
                # The id moved here from elsewhere. Dropped only now that the worker holds
                # `child`: pruning the old place's branch could otherwise take `child` (an
                # ancestor of the old place nobody held) out of the tree with it.
                assert old is not None
                self._drop(bit, old, old.mask(bit))
            node = child
        counters["blocks_stored"] += len(hashes)

    def _remove(self, worker: Worker, bit: int, blocks: dict[Any, Node], event: Any) -> None:
        tier = self._tier(event.medium)
        for block_hash in event.block_hashes:
            node = blocks.get(block_hash)
            mask = 0 if node is None else node.mask(bit)
            if node is None or not mask & tier:
                self.counters["unknown_removal"] += 1
                self.mark_stale(worker, "a removed block is unknown")
                continue
            self.counters["blocks_removed"] += 1
            if mask == tier:
                del blocks[block_hash]
            self._drop(bit, node, tier)

    def _drop(self, bit: int, node: Node, tiers: int) -> None:
        """Take `tiers` of the worker's bit off the node; prune nodes nobody holds or leads
        through."""
        mask = node.mask(bit)
        gone = mask & tiers
        if not gone:
            return
        self._other_tiers -= bin(gone & ~GPU).count("1")
        node.set_mask(bit, mask & ~gone)
        while node.parent is not None and not node.workers and not node.children:
            siblings = node.parent.children
            assert siblings is not None
            del siblings[node.key]
            node = node.parent

    # -- queries ----------------------------------------------------------------------

    def query(
        self,
        tokens: Any,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> dict[Worker, Match]:
        """Per worker holding the first block: its matched leading blocks, per tier."""
        return self.match(local_block_hashes(tokens, self.block_size, lora_name, cache_salt))

    def match(self, hashes: list[int]) -> dict[Worker, Match]:
        """As `query`, from Dynamo local block hashes."""
        depths, path = self._walk(hashes, self._other_tiers > 0)
        lookup = self.lookup
        stale = self.stale
        bits = self.bits
        out = {}
        for worker, depth in depths.items():
            if path is None:
                gpu = cpu = disk = depth
            else:
                bit = bits[worker]
                gpu, cpu, disk = (_leading(path, bit, depth, tiers) for _, tiers in _CUMULATIVE)
            out[worker] = Match(depth, gpu, cpu, disk, len(lookup.get(worker, ())), worker in stale)
        return out

    def _walk(self, hashes: list[int], tiers: bool) -> tuple[dict[Worker, int], list[Node] | None]:
        """Leading blocks matched per worker: a worker drops out at its first missing block
        (children need not hold a subset of their parent's workers: removal leaves gaps)."""
        depths: dict[Worker, int] = {}
        worker_of = self._worker_of_bit
        path: list[Node] | None = [] if tiers else None
        node = self.root
        active = -1  # every bit: the first block sets who is in the running
        depth = 0
        for key in hashes:
            children = node.children
            child = None if children is None else children.get(key)
            if child is None:
                break
            kept = active & child.workers
            if kept != active and depth:
                left = active & ~kept
                while left:
                    low = left & -left
                    depths[worker_of[low]] = depth
                    left ^= low
            active = kept
            if not active:
                break
            depth += 1
            if path is not None:
                path.append(child)
            node = child
        while active > 0:
            low = active & -active
            depths[worker_of[low]] = depth
            active ^= low
        return depths, path

    # -- inspection -------------------------------------------------------------------

    def block_count(self, worker: Worker) -> int:
        return len(self.lookup.get(worker, ()))

    def engine_blocks(self, worker: Worker) -> set[Any]:
        return set(self.lookup.get(worker, ()))

    def entries(self) -> int:
        """(worker, block) pairs held."""
        return sum(len(blocks) for blocks in self.lookup.values())

    def chains(self, worker: Worker) -> Iterator[tuple[Any, list[tuple[Any, int]]]]:
        """The worker's blocks as `(parent engine hash, [(engine hash, local hash)])` runs,
        parents first (for /dump)."""
        blocks = self.lookup.get(worker, {})
        by_node = {id(node): h for h, node in blocks.items()}
        for block_hash, node in blocks.items():
            parent = node.parent
            parent_hash = None if parent is None else by_node.get(id(parent))
            yield parent_hash, [(block_hash, node.key)]


def _leading(path: list[Node], bit: int, depth: int, tiers: int) -> int:
    for i in range(depth):
        if not path[i].mask(bit) & tiers:
            return i
    return depth


__all__ = ["Match", "PrefixIndex", "TIER_NAMES", "Worker", "block_seed"]
