"""A KV prefix index over many workers whose state equals the engines' caches.

A block is known by its chain key: its Dynamo-compatible local block hash (`blockhash`)
chained onto its parent's chain key. Chaining makes the tree flat: who holds a block is one
entry of one dict (chain key -> worker bits over the block's link to its parent), with no
node objects, no child dicts and no pruning; a query chains the request's local hashes and
looks each up. Each worker (a `(worker_id, dp_rank)` pair) also maps its engine block hashes
to chain keys, which is how parents are found and removals applied. Semantics, chosen to equal
the engine's cache rather than to be convenient:

- BlockStored links to its parent by this worker's engine hash; a store whose parent this
  worker does not hold is never re-rooted: it is skipped and the worker marked stale.
- BlockRemoved removes exactly the named blocks of that worker (per tier); descendants stay,
  as they do in the engine, and matching stops at the gap. Removing a block the worker does
  not hold marks it stale.
- AllBlocksCleared clears that worker (that `(worker_id, dp_rank)` only).
- Blocks smaller than the index's block size (partial blocks) are counted and ignored.
- A BlockStored may carry its blocks' local hashes (`local_hashes`, a bridge's redacted
  batches) instead of token ids; they are used as given.
- Tiers (`medium`): GPU (or none), CPU, disk, external, kept per (worker, block).
- A worker holds a block under one engine id: storing the same token path under another id
  renames it (the old id is forgotten); storing an id again elsewhere moves it.

A stale worker's entries are kept but flagged in every answer (`Match.stale`), until
`resync` (a snapshot, or a restart whose stream starts at seq 0) says its state is whole.
Every anomaly is counted in `counters`.

Limit: chain keys are 64-bit hashes (CPython's tuple hash of the parent key and the local
hash, which reduces each int modulo 2**61 - 1 first), so two different prefixes share a key
with a probability of about n**2 / 2**62 for n distinct blocks (2e-5 at 10M blocks), the
same order as Dynamo's own u64 sequence hashes. Chain keys never leave the process (answers
and /dump carry engine and local hashes), so a Python whose tuple hash differs changes nothing
outside it; a shared backend would need a keyed hash of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from functools import reduce
from itertools import repeat
from operator import and_, or_
from typing import Any, cast

import msgspec

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


class Match(msgspec.Struct, frozen=True, gc=False):
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


ROOT = 0
"""The chain key a first block chains onto."""
_U64 = (1 << 64) - 1
LINK_BITS = 128
"""A `holders` value's low bits: the block's link (parent chain key, unsigned, << 64 | its
local hash); worker bits start above them."""
_FIRST_WORKER = 1 << LINK_BITS
_LINK = _FIRST_WORKER - 1
_WORKERS = -_FIRST_WORKER
"""Every worker bit (and no link bit), as a mask."""


class PrefixIndex:
    """The in-memory index backend (kvevents_runtime.backend.IndexBackend). Not thread-safe:
    feed and query it from one thread (or one event loop)."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.block_size = block_size
        self.holders: dict[int, int] = {}
        """chain key -> the bits of the workers holding the block, in any tier (at least
        one: a block nobody holds has no entry), over its link in the low LINK_BITS (for
        /dump: the one thing a key cannot give back). One map rather than a second for the
        links: a store or removal touches one dict entry a block, not two."""
        self.tiers: dict[int, dict[int, int]] = {}
        """chain key -> worker bit -> tiers (bit mask), for entries other than GPU alone."""
        self.lookup: dict[Worker, dict[Any, int]] = {}
        """worker -> engine block hash -> chain key."""
        self.stale: dict[Worker, str] = {}
        """worker -> why it is stale."""
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.bits: dict[Worker, int] = {}
        """worker -> its bit in `holders` (given at first sight, freed when the worker is
        removed, reused by the next one)."""
        self._worker_of_bit: dict[int, Worker] = {}
        self._free_bits: list[int] = []
        self._every_worker = 0
        """Every worker's bit: where a walk starts (positive, which ANDs faster with a
        holders value than a negative mask of all bits)."""
        self._other_tiers = 0
        """(worker, block) entries in a tier other than GPU: answers need per-tier walks."""

    # -- workers ----------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return list(self.lookup)

    def add_worker(self, worker: Worker) -> None:
        self._known(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Drop every entry of the worker and forget it (its bit is free again: no block
        holds it once its entries are dropped)."""
        self.clear_worker(worker)
        self.lookup.pop(worker, None)
        self.stale.pop(worker, None)
        bit = self.bits.pop(worker, None)
        if bit is not None:
            del self._worker_of_bit[bit]
            self._free_bits.append(bit)
            self._every_worker &= ~bit

    def clear_worker(self, worker: Worker) -> None:
        blocks = self.lookup.get(worker)
        if not blocks:
            return
        bit = self.bits[worker]
        for chain in blocks.values():
            self._drop(bit, chain, self._mask(chain, bit))
        blocks.clear()

    def _known(self, worker: Worker) -> dict[Any, int]:
        """The worker's blocks, giving it a bit at first sight."""
        blocks = self.lookup.get(worker)
        if blocks is None:
            blocks = self.lookup[worker] = {}
            free = self._free_bits
            bit = free.pop() if free else _FIRST_WORKER << len(self.bits)
            self.bits[worker] = bit
            self._worker_of_bit[bit] = worker
            self._every_worker |= bit
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
        events = batch.events
        count = len(events)
        at = 0
        while at < count:
            event = events[at]
            at += 1
            counters["events"] += 1
            kind = type(event).__name__
            if kind == "BlockStored":
                self._store(worker, bit, blocks, event)
            elif kind == "BlockRemoved":
                # vLLM sends one removal per evicted block: a run of removals of one medium
                # is applied as one, in order, which comes to the same.
                hashes = event.block_hashes
                end = at
                while (
                    end < count
                    and type(events[end]) is type(event)
                    and events[end].medium == event.medium
                ):
                    end += 1
                if end > at:
                    hashes = [h for removed in events[at - 1 : end] for h in removed.block_hashes]
                    counters["events"] += end - at
                    at = end
                self._remove(worker, bit, blocks, event.medium, hashes)
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

    def _mask(self, chain: int, bit: int) -> int:
        """The tiers in which the worker of `bit` holds the block (0: not at all)."""
        if not self.holders.get(chain, 0) & bit:
            return 0
        tiers = self.tiers.get(chain)
        return GPU if tiers is None else tiers.get(bit, GPU)

    def _set_mask(self, chain: int, bit: int, mask: int) -> None:
        holders = self.holders
        held = holders.get(chain, 0)
        tiers = self.tiers.get(chain)
        if tiers is not None and mask in (0, GPU):
            tiers.pop(bit, None)
            if not tiers:
                del self.tiers[chain]
        elif mask not in (0, GPU):
            if tiers is None:
                tiers = self.tiers[chain] = {}
            tiers[bit] = mask
        if mask:
            holders[chain] = held | bit
        elif held & ~bit & _WORKERS:
            holders[chain] = held & ~bit
        elif held:
            del holders[chain]

    def _store(self, worker: Worker, bit: int, blocks: dict[Any, int], event: Any) -> None:
        counters = self.counters
        size = event.block_size
        if size != self.block_size:
            counters["partial_blocks" if size < self.block_size else "block_size_mismatch"] += 1
            return
        hashes = event.block_hashes
        parent_hash = event.parent_block_hash
        if parent_hash is None:
            parent_chain = ROOT
        else:
            found = blocks.get(parent_hash)
            if found is None:
                counters["unknown_parent"] += 1
                self.mark_stale(worker, "a stored block's parent is unknown")
                return
            parent_chain = found
        keys = getattr(event, "local_hashes", None)
        if keys is None:
            try:
                keys = local_block_hashes(
                    event.token_ids, size, event.lora_name, getattr(event, "cache_salt", None)
                )
            except (OverflowError, TypeError):
                counters["bad_events"] += 1  # token pairs or ids beyond u32: not hashable here
                return
        elif keys and not (0 <= min(keys) and max(keys) <= _U64):
            # Given hashes outside u64 would spill out of their link into the worker bits.
            counters["bad_events"] += 1
            self.mark_stale(worker, "a stored event's local hashes are not u64")
            return
        if len(keys) < len(hashes):
            counters["bad_events"] += 1
            self.mark_stale(worker, "a stored event has fewer tokens than blocks")
            return
        tier = self._tier(event.medium)
        count = len(hashes)
        if count < len(keys):
            keys = keys[:count]
        chains: list[int] = []
        append = chains.append
        chain = parent_chain
        for key in keys:
            chain = hash((chain, key))
            append(chain)
        holders = self.holders
        held = list(map(holders.get, chains, repeat(0, count)))
        if (
            tier == GPU
            and (held.count(0) == count or not reduce(or_, held, 0) & bit)
            and self._add_new(blocks, hashes, chains)
        ):
            # The common case, a branch new to this worker under new ids: whole-event dict
            # updates instead of a Python step per block.
            parents = [parent_chain, *chains[:-1]] if count else []
            holders.update(
                zip(
                    chains,
                    [
                        h | bit if h else bit | (p & _U64) << 64 | k
                        for h, p, k in zip(held, parents, keys, strict=True)
                    ],
                    strict=True,
                )
            )
        else:
            self._store_each(bit, blocks, hashes, keys, chains, parent_chain, tier)
        counters["blocks_stored"] += count

    @staticmethod
    def _add_new(blocks: dict[Any, int], hashes: list[Any], chains: list[int]) -> bool:
        """Maps each id to its chain where the id is not mapped yet; True when every id was
        new and none repeats. One pass of setdefault rather than a disjointness test and then
        an update: each pass is a lookup a block in a map too big for the cache. On False
        the new ids stay mapped, to the chains the per-block path then gives them anyway
        (it finds them already there and moves only the ids that were elsewhere)."""
        return list(map(blocks.setdefault, hashes, chains)) == chains

    def _store_each(
        self,
        bit: int,
        blocks: dict[Any, int],
        hashes: list[Any],
        keys: list[int],
        chains: list[int],
        parent: int,
        tier: int,
    ) -> None:
        holders = self.holders
        for block_hash, key, chain in zip(hashes, keys, chains, strict=True):
            held = holders.get(chain, 0)
            old = blocks.get(block_hash)
            if old != chain:
                if held & bit:
                    # The worker holds this block under another id: the engine renamed it;
                    # the old id is forgotten (rare, so a scan is fine).
                    for alias, chain_of in blocks.items():
                        if chain_of == chain:
                            del blocks[alias]
                            break
                blocks[block_hash] = chain
                if old is not None:
                    # The id moved here from elsewhere: the old place loses this worker.
                    self._drop(bit, old, self._mask(old, bit))
            if not held:
                # Linked before any bit is set: every way on from here sets this worker's.
                held = holders[chain] = (parent & _U64) << 64 | key
            if tier == GPU and not held & bit:
                holders[chain] = held | bit
            else:
                mask = self._mask(chain, bit)
                if not mask & tier:
                    self._set_mask(chain, bit, mask | tier)
                    if tier != GPU:
                        self._other_tiers += 1
            parent = chain

    def _remove(
        self, worker: Worker, bit: int, blocks: dict[Any, int], medium: Any, hashes: list[Any]
    ) -> None:
        tier = self._tier(medium)
        if tier == GPU and not self._other_tiers:
            # Every entry is GPU alone (vLLM sends one removal per evicted block, so this is
            # the hot path of a busy engine): a removal is the id forgotten and the bit off.
            self._remove_gpu_only(worker, bit, blocks, hashes)
            return
        for block_hash in hashes:
            chain = blocks.get(block_hash)
            mask = 0 if chain is None else self._mask(chain, bit)
            if chain is None or not mask & tier:
                self.counters["unknown_removal"] += 1
                self.mark_stale(worker, "a removed block is unknown")
                continue
            self.counters["blocks_removed"] += 1
            if mask == tier:
                del blocks[block_hash]
            self._drop(bit, chain, tier)

    def _remove_gpu_only(
        self, worker: Worker, bit: int, blocks: dict[Any, int], hashes: list[Any]
    ) -> None:
        # Whole-event dict operations through map(): a removal's hot path is these lookups,
        # and a Python step per block cost more than the dicts do.
        found: list[int | None] = list(map(blocks.pop, hashes, repeat(None)))
        if None in found:
            self.counters["unknown_removal"] += found.count(None)
            self.mark_stale(worker, "a removed block is unknown")
            chains = [chain for chain in found if chain is not None]
        else:
            chains = cast(list[int], found)
        holders = self.holders
        # A positive mask of every bit but this worker's (a negative one ANDs slower), by
        # map() rather than a comprehension: 47 against 71 ns a block.
        allocated = len(self.bits) + len(self._free_bits)
        others = ((_FIRST_WORKER << allocated) - 1) ^ bit
        kept = list(map(and_, map(holders.__getitem__, chains), repeat(others)))
        if kept and min(kept) < _FIRST_WORKER:
            gone = [chain for chain, held in zip(chains, kept, strict=True) if held < _FIRST_WORKER]
            deque(map(holders.__delitem__, gone), 0)
            if len(gone) < len(chains):
                holders.update(
                    (chain, held)
                    for chain, held in zip(chains, kept, strict=True)
                    if held >= _FIRST_WORKER
                )
        else:
            holders.update(zip(chains, kept, strict=True))
        self.counters["blocks_removed"] += len(chains)

    def _drop(self, bit: int, chain: int, tiers: int) -> None:
        """Take `tiers` of the worker's bit off the block; a block nobody holds is gone
        (its descendants keep their own keys: matching stops at the gap)."""
        mask = self._mask(chain, bit)
        gone = mask & tiers
        if not gone:
            return
        self._other_tiers -= bin(gone & ~GPU).count("1")
        self._set_mask(chain, bit, mask & ~gone)

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
                masks = [self._mask(chain, bit) for chain in path[:depth]]
                gpu, cpu, disk = (_leading(masks, tiers) for _, tiers in _CUMULATIVE)
            out[worker] = Match(depth, gpu, cpu, disk, len(lookup.get(worker, ())), worker in stale)
        return out

    def _walk(self, hashes: list[int], tiers: bool) -> tuple[dict[Worker, int], list[int] | None]:
        """Leading blocks matched per worker: a worker drops out at its first missing block
        (a block's holders need not be a subset of its parent's: removal leaves gaps)."""
        depths: dict[Worker, int] = {}
        worker_of = self._worker_of_bit
        holders = self.holders
        path: list[int] | None = [] if tiers else None
        chain = ROOT
        active = self._every_worker  # the first block sets who is in the running
        depth = 0
        for key in hashes:
            chain = hash((chain, key))
            kept = active & holders.get(chain, 0)
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
                path.append(chain)
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
        by_chain = {chain: h for h, chain in blocks.items()}
        holders = self.holders
        for block_hash, chain in blocks.items():
            link = holders[chain] & _LINK
            parent = link >> 64
            if parent >= 1 << 63:
                parent -= 1 << 64  # chain keys are signed (CPython's hash), links unsigned
            yield by_chain.get(parent) if parent != ROOT else None, [(block_hash, link & _U64)]


def _leading(masks: list[int], tiers: int) -> int:
    for i, mask in enumerate(masks):
        if not mask & tiers:
            return i
    return len(masks)


__all__ = ["Match", "PrefixIndex", "TIER_NAMES", "Worker", "block_seed"]
