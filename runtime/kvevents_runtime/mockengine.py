"""A mock inference engine: a paged prefix cache that fills, evicts, clears and restarts, and
publishes exactly what an engine would through a real kvevents publisher.

The cache is keyed by chained block hashes (`xxh3_64(parent hash ‖ u32 little-endian tokens)`,
the LoRA name folded into the seed), as vLLM's and SGLang's are. A request matches its cached
prefix, allocates the rest, keeps every block pinned while it runs and releases them after.
Eviction frees least-recently-used unpinned leaves from a heap kept across calls: an entry is
pushed whenever a block becomes an evictable leaf, and entries made stale by later use are
skipped when popped (lazy deletion), so no call rebuilds it; it is compacted only when stale
entries outnumber live blocks, an amortised O(1) per push.

Events of one scheduler step are published as one batch by `step()`: one BlockStored per
admitted request (its new blocks, parent hash, token ids, `medium`, `lora_name`), BlockRemoved
for evictions (one per block in the vLLM dialect, one per step in SGLang's, as the engines
do), AllBlocksCleared for `clear()`. Hashes take the dialect's form (vLLM's unsigned 64-bit,
SGLang's signed 64-bit). `restart()` brings up a fresh publisher (seq 0, new instance) on the
same endpoints with an empty cache.

The timing model is Dynamo's mocker default (`TimingModel`), for simulated time.
"""

from __future__ import annotations

import heapq
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from .blockhash import block_seed
from .ports import pin_port

_U64 = (1 << 64) - 1
_hash = xxhash.xxh3_64_intdigest


@dataclass(frozen=True)
class TimingModel:
    """Dynamo's mocker defaults: prefill ms = a·T² + b·T + c for T new tokens; decode ms per
    step = d·u² + e·u + f for KV utilisation u (0..1), floored at `decode_floor_ms`."""

    prefill_a: float = 4.209989e-7
    prefill_b: float = 1.518344e-2
    prefill_c: float = 16.50142
    decode_d: float = -25.74
    decode_e: float = 54.01
    decode_f: float = 5.74
    decode_floor_ms: float = 1.0

    def prefill_ms(self, new_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        t = float(new_tokens)
        return self.prefill_a * t * t + self.prefill_b * t + self.prefill_c

    def decode_ms(self, utilisation: float) -> float:
        u = min(max(utilisation, 0.0), 1.0)
        return max(self.decode_floor_ms, self.decode_d * u * u + self.decode_e * u + self.decode_f)


class Block:
    __slots__ = ("alive", "children", "hash", "last_use", "parent", "refs")

    def __init__(
        self, block_hash: int, parent: Block | None, refs: int, last_use: int, children: int
    ) -> None:
        self.hash = block_hash
        self.parent = parent
        self.children = children
        self.refs = refs
        self.last_use = last_use
        self.alive = True


@dataclass
class Allocation:
    """The blocks of one admitted request, pinned until `release`."""

    blocks: list[Block]
    cached: int
    """Leading blocks that were already in the cache (the prefix hit)."""
    generation: int
    """The engine generation (restart/clear count) they belong to."""

    @property
    def new(self) -> int:
        return len(self.blocks) - self.cached


_LITTLE_ENDIAN = sys.byteorder == "little"


def chained_hashes(
    tokens: Sequence[int] | array, block_size: int, lora_name: str | None = None
) -> list[int]:
    """The engine-side chained hash of every complete block of `tokens` (a list of ids, or
    an `array("I")` of them)."""
    seed = block_seed(lora_name) if lora_name else 0
    if isinstance(tokens, array) and tokens.typecode == "I" and _LITTLE_ENDIAN:
        packed = tokens.tobytes()  # a long prompt's ids, without one int object each
    else:
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
    width = 4 * block_size
    out = []
    parent = 0
    for start in range(0, (len(packed) // width) * width, width):
        parent = _hash(parent.to_bytes(8, "little") + packed[start : start + width], seed)
        out.append(parent)
    return out


REBIND_SECONDS = 2.0


def _rebind(make: Callable[[str, str | None], Any], endpoint: str, replay: str | None) -> Any:
    """A new publisher on the old ports: libzmq releases a closed listener on its own thread,
    so the first bind may find the port still taken for a moment (REBIND_SECONDS at most)."""
    import time

    import zmq

    deadline = time.monotonic() + REBIND_SECONDS
    while True:
        try:
            return make(endpoint, replay)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class MockEngine:
    """One engine (one DP rank). `events` carries the canonical event classes and
    `make_publisher(endpoint, replay_endpoint)` the dialect's publisher (both bound by the
    generated face, `kvevents.mock`)."""

    def __init__(
        self,
        events: Any,
        make_publisher: Callable[[str, str | None], Any] | None,
        capacity_blocks: int,
        block_size: int = 16,
        signed_hashes: bool = False,
        coalesce_removals: bool = False,
        medium: str = "GPU",
        sink: Callable[[Any], None] | None = None,
        endpoint: str = "tcp://127.0.0.1:0",
        replay_endpoint: str | None = "tcp://127.0.0.1:0",
    ) -> None:
        if capacity_blocks < 1 or block_size < 1:
            raise ValueError("capacity_blocks and block_size must be at least 1")
        self._events = events
        self._make_publisher = make_publisher
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.signed = signed_hashes
        self.coalesce = coalesce_removals
        self.medium = medium
        self.cache: dict[int, Block] = {}
        self._heap: list[tuple[int, int, Block]] = []
        self._pushes = 0
        self._clock = 0
        self.generation = 0
        self._pending: list[Any] = []
        self._removed: list[Any] = []
        self.counters = {
            "stored": 0,
            "evicted": 0,
            "cleared": 0,
            "restarts": 0,
            "batches": 0,
            "refused": 0,
        }
        self.publisher: Any = None
        self.sink = sink
        """Without a publisher: called with each step's batch (an offline index's feed)."""
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        if make_publisher is not None:
            # Port 0 would be an ephemeral port, which a reconnecting subscriber can take
            # while the engine restarts (kvevents_runtime.ports).
            endpoint = pin_port(endpoint)
            replay_endpoint = None if replay_endpoint is None else pin_port(replay_endpoint)
            self.publisher = make_publisher(endpoint, replay_endpoint)
            # Restarts come back on the same ports, as an engine restarted in place does.
            self._endpoint = self.publisher.connect_endpoint
            self._replay_endpoint = self.publisher.connect_replay_endpoint

    # -- cache ------------------------------------------------------------------------

    @property
    def used(self) -> int:
        return len(self.cache)

    @property
    def utilisation(self) -> float:
        return len(self.cache) / self.capacity

    def wire_hash(self, block_hash: int) -> int:
        """A hash as this engine's dialect puts it on the wire."""
        if self.signed and block_hash >= 1 << 63:
            return block_hash - (1 << 64)
        return block_hash

    def blocks(self) -> set[int]:
        """Every cached block, as wire hashes (what an index of this engine must hold)."""
        return {self.wire_hash(h) for h in self.cache}

    def match(
        self, tokens: Sequence[int], lora_name: str | None = None, hashes: list[int] | None = None
    ) -> int:
        """Leading complete blocks of `tokens` in the cache now."""
        count = 0
        if hashes is None:
            hashes = chained_hashes(tokens, self.block_size, lora_name)
        for block_hash in hashes:
            if block_hash not in self.cache:
                break
            count += 1
        return count

    def admit(
        self,
        tokens: Sequence[int],
        lora_name: str | None = None,
        hashes: list[int] | None = None,
    ) -> Allocation | None:
        """Pin the cached prefix and allocate the rest (evicting LRU leaves as needed); None
        when even a full eviction leaves too little room (the request waits). `hashes`: the
        request's `chained_hashes`, when the caller has them already."""
        if hashes is None:
            hashes = chained_hashes(tokens, self.block_size, lora_name)
        cache = self.cache
        cached = 0
        while cached < len(hashes) and hashes[cached] in cache:
            cached += 1
        needed = len(hashes) - cached
        if needed > self.capacity - len(cache):
            matched = [cache[h] for h in hashes[:cached]]
            for block in matched:
                block.refs += 1  # the prefix must survive the eviction it triggers
            self._evict(needed - (self.capacity - len(cache)))
            for block in matched:
                block.refs -= 1
            if needed > self.capacity - len(cache):
                self.counters["refused"] += 1
                for block in matched:
                    self._maybe_evictable(block)
                return None
        self._clock += 1
        clock = self._clock
        blocks = [cache[h] for h in hashes[:cached]]
        for block in blocks:
            block.refs += 1
            block.last_use = clock
        first_new = parent = blocks[-1] if blocks else None
        if needed:
            if parent is not None:
                parent.children += 1
            # Each new block is pinned by this request and, but for the last, the next one's
            # parent: made with those counts rather than counted up one by one.
            for block_hash in hashes[cached:]:
                parent = block = Block(block_hash, parent, 1, clock, 1)
                cache[block_hash] = block
                blocks.append(block)
            blocks[-1].children = 0
        if needed:
            size = self.block_size
            # Removals this admission caused come first: a block evicted and stored again in
            # one step must end up cached, as it is in the engine.
            self._flush_removed()
            self._pending.append(
                self._events.BlockStored(
                    block_hashes=[self.wire_hash(h) for h in hashes[cached:]]
                    if self.signed
                    else hashes[cached:],
                    parent_block_hash=None if first_new is None else self.wire_hash(first_new.hash),
                    token_ids=list(tokens[cached * size : len(hashes) * size]),
                    block_size=size,
                    lora_name=lora_name,
                    medium=self.medium,
                )
            )
            self.counters["stored"] += needed
        return Allocation(blocks, cached, self.generation)

    def release(self, allocation: Allocation) -> None:
        """The request finished: its blocks stay cached, evictable once nothing pins them."""
        if allocation.generation != self.generation:
            return  # the cache was cleared or the engine restarted under it
        self._clock += 1
        clock = self._clock
        for block in reversed(allocation.blocks):
            block.refs -= 1
            block.last_use = clock
            if not block.refs and not block.children:  # only a leaf can become evictable
                self._maybe_evictable(block)

    def _maybe_evictable(self, block: Block) -> None:
        if block.alive and block.refs == 0 and block.children == 0:
            self._pushes += 1
            heapq.heappush(self._heap, (block.last_use, self._pushes, block))
            if len(self._heap) > 2 * len(self.cache) + 1024:
                self._compact()

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._valid(e)]
        heapq.heapify(self._heap)

    @staticmethod
    def _valid(entry: tuple[int, int, Block]) -> bool:
        block = entry[2]
        return (
            block.alive and block.refs == 0 and block.children == 0 and block.last_use == entry[0]
        )

    def _evict(self, count: int) -> int:
        heap = self._heap
        cache = self.cache
        removed = self._removed
        signed = self.signed
        freed = 0
        while freed < count and heap:
            entry = heapq.heappop(heap)
            block = entry[2]
            if block.refs or block.children or not block.alive or block.last_use != entry[0]:
                continue  # used, pinned or given a child since it was pushed (`_valid`)
            block.alive = False
            del cache[block.hash]
            removed.append(self.wire_hash(block.hash) if signed else block.hash)
            freed += 1
            parent = block.parent
            if parent is not None:
                parent.children -= 1
                if not parent.children and not parent.refs:
                    self._maybe_evictable(parent)
        self.counters["evicted"] += freed
        return freed

    # -- publishing -------------------------------------------------------------------

    def _flush_removed(self) -> None:
        removed, self._removed = self._removed, []
        if not removed:
            return
        make = self._events.BlockRemoved
        if self.coalesce:
            self._pending.append(make(block_hashes=removed, medium=self.medium))
        else:
            self._pending.extend(make(block_hashes=[h], medium=self.medium) for h in removed)

    def step(self, ts: float = 0.0) -> int:
        """Publish this step's events as one batch; returns how many events it held."""
        self._flush_removed()
        events, self._pending = self._pending, []
        if events and self.publisher is not None:
            self.publisher.publish(self._events.KVEventBatch(ts=ts, events=events))
            self.counters["batches"] += 1
        elif events and self.sink is not None:
            self.sink(self._events.KVEventBatch(ts=ts, events=events))
            self.counters["batches"] += 1
        return len(events)

    def clear(self) -> None:
        """Reset the prefix cache (vLLM's reset_prefix_cache): AllBlocksCleared."""
        self._flush_removed()
        for block in self.cache.values():
            block.alive = False
        self.cache.clear()
        self._heap.clear()
        self.generation += 1
        self._pending.append(self._events.AllBlocksCleared())
        self.counters["cleared"] += 1

    def restart(self) -> None:
        """The engine process restarts in place: unpublished events are lost, the cache is
        empty, and a new publisher (seq 0, a new instance id) binds the same endpoints."""
        for block in self.cache.values():
            block.alive = False
        self.cache.clear()
        self._heap.clear()
        self._pending.clear()
        self._removed.clear()
        self.generation += 1
        self.counters["restarts"] += 1
        if self._make_publisher is not None:
            self.publisher.shutdown()
            self.publisher = _rebind(self._make_publisher, self._endpoint, self._replay_endpoint)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.shutdown()
