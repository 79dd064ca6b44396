"""A mock inference engine: a paged prefix cache that fills, evicts, clears and restarts, and
publishes exactly what an engine would through a real kvevents publisher.

The cache is keyed by chained block hashes (`xxh3_64` of a block's u32 little-endian tokens,
seeded with the parent's hash xor the LoRA name's seed), as vLLM's and SGLang's are. A request
matches its cached prefix, allocates the rest, keeps every block pinned while it runs and
releases them after. Blocks are kept in runs (`Run`: the blocks one admission allocated,
sharing pins and last use), found by their first block's hash: a chain hash names its whole
prefix and children hang off a run's last block, so a walk along a request's hashes only ever
looks up the first block of a run, and admitting or evicting a block touches no map. Eviction
frees least-recently-used unpinned leaves, a leaf run from its tail, from a heap kept across
calls: an entry is pushed whenever a run becomes an evictable leaf (the order equals a
per-block LRU's, which the tests check), and entries made stale by later use are skipped when
popped (lazy deletion), so no call rebuilds it; it is compacted only when stale entries
outnumber live blocks, an amortised O(1) per push.

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
from itertools import repeat
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

    def decode_run(
        self, kv_tokens: float, capacity_tokens: float, grows: int, most: int, before_ms: float
    ) -> tuple[int, float]:
        """Decode passes taken back to back, the KV growing by `grows` tokens a pass from
        `kv_tokens` of `capacity_tokens`: `(passes, ms)` for as many as `most`, stopping after
        the first pass that ends at or after `before_ms` (each timed as `decode_ms` would).
        One method rather than a `decode_ms` call a pass: a long decode is thousands."""
        d, e, f, floor = self.decode_d, self.decode_e, self.decode_f, self.decode_floor_ms
        total = 0.0
        passes = 0
        kv = float(kv_tokens)
        while passes < most:
            u = kv / capacity_tokens
            u = 0.0 if u < 0.0 else 1.0 if u > 1.0 else u
            ms = d * u * u + e * u + f
            total += ms if ms > floor else floor
            passes += 1
            kv += grows
            if total >= before_ms:
                break
        return passes, total


class Run:
    """Blocks that one admission allocated, in chain order. They share their pins and their
    last use, so LRU eviction takes them from the tail one after another: one heap entry and
    one object stand for all of them (a per-block object and heap entry cost most of a
    simulation). A later request that matches only a head of a run splits it (`_split`), so
    pins and last use stay per run and children always hang off a run's last block."""

    __slots__ = ("alive", "depth", "hashes", "kids", "last_use", "parent", "refs")

    def __init__(
        self,
        hashes: list[int],
        depth: int,
        parent: Run | None,
        refs: int,
        last_use: int,
        kids: int,
    ) -> None:
        self.hashes = hashes
        self.depth = depth
        """The chain position of `hashes[0]`."""
        self.parent = parent
        """The run whose last block is `hashes[0]`'s parent."""
        self.kids = kids
        """Runs whose first block's parent is this run's last block."""
        self.refs = refs
        self.last_use = last_use
        self.alive = True


@dataclass
class Allocation:
    """The blocks of one admitted request, pinned until `release`."""

    leaf: Run | None
    """The run holding its last block; its blocks are that run and every run above it (a
    split later inserts the head it took as a parent, so walking up still finds them all)."""
    size: int
    """Its blocks."""
    cached: int
    """Leading blocks that were already in the cache (the prefix hit)."""
    generation: int
    """The engine generation (restart/clear count) they belong to."""

    @property
    def new(self) -> int:
        return self.size - self.cached


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
        # The parent as xxh3's seed rather than 8 bytes before the block: the same chaining
        # without building a joined copy of each block (128 against 182 ns a block).
        parent = _hash(packed[start : start + width], parent ^ seed)
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
        self.runs: dict[int, Run] = {}
        """The engine hash of each run's first block -> the run (live runs only)."""
        self._cached = 0
        """Blocks in the cache: the sum of the live runs' lengths."""
        self._heap: list[tuple[int, int, Run]] = []
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
        return self._cached

    @property
    def utilisation(self) -> float:
        return self._cached / self.capacity

    def cached_hashes(self) -> set[int]:
        """Every cached block's engine hash (as this engine keys it, before `wire_hash`)."""
        return {h for run in self.runs.values() for h in run.hashes}

    def wire_hash(self, block_hash: int) -> int:
        """A hash as this engine's dialect puts it on the wire."""
        if self.signed and block_hash >= 1 << 63:
            return block_hash - (1 << 64)
        return block_hash

    def blocks(self) -> set[int]:
        """Every cached block, as wire hashes (what an index of this engine must hold)."""
        return set(map(self.wire_hash, self.cached_hashes()))

    def match(
        self, tokens: Sequence[int], lora_name: str | None = None, hashes: list[int] | None = None
    ) -> int:
        """Leading complete blocks of `tokens` in the cache now."""
        if hashes is None:
            hashes = chained_hashes(tokens, self.block_size, lora_name)
        _, depth, _, common = self._prefix_runs(hashes)
        return depth + common

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
        matched = self._matched_runs(hashes)
        cached = matched[-1].depth + len(matched[-1].hashes) if matched else 0
        needed = len(hashes) - cached
        if needed > self.capacity - self._cached:
            for run in matched:
                run.refs += 1  # the prefix must survive the eviction it triggers
            self._evict(needed - (self.capacity - self._cached))
            for run in matched:
                run.refs -= 1
            if needed > self.capacity - self._cached:
                self.counters["refused"] += 1
                for run in matched:
                    self._maybe_evictable(run)
                return None
        self._clock += 1
        clock = self._clock
        for run in matched:
            run.refs += 1
            run.last_use = clock
        leaf = parent = matched[-1] if matched else None
        if needed:
            new_hashes = hashes[cached:]
            # The run's list shrinks as its tail is evicted; the event keeps its own.
            leaf = Run(hashes[cached:], cached, parent, 1, clock, 0)
            if parent is not None:
                parent.kids += 1
            self.runs[new_hashes[0]] = leaf
            self._cached += needed
            size = self.block_size
            # Removals this admission caused come first: a block evicted and stored again in
            # one step must end up cached, as it is in the engine.
            self._flush_removed()
            self._pending.append(
                self._events.BlockStored(
                    block_hashes=[self.wire_hash(h) for h in new_hashes]
                    if self.signed
                    else new_hashes,
                    parent_block_hash=None if parent is None else self.wire_hash(parent.hashes[-1]),
                    token_ids=self._token_ids(tokens[cached * size : len(hashes) * size]),
                    block_size=size,
                    lora_name=lora_name,
                    medium=self.medium,
                )
            )
            self.counters["stored"] += needed
        return Allocation(leaf, len(hashes), cached, self.generation)

    def _token_ids(self, tokens: Sequence[int]) -> Any:
        """A list for the wire; without a publisher, an `array` slice as it is (a sink's
        events are not encoded): the index hashes an array's bytes directly, where a list
        made only to be packed back into bytes cost 260 ns a block (376 against 116)."""
        if self.publisher is None and isinstance(tokens, array):
            return tokens
        return list(tokens)

    def _matched_runs(self, hashes: list[int]) -> list[Run]:
        """The runs holding the cached prefix of `hashes`, root first, the last one split so
        that it ends where the match does."""
        runs, _, partial, common = self._prefix_runs(hashes)
        if partial is not None:
            runs.append(self._split(partial, common))
        return runs

    def _prefix_runs(self, hashes: list[int]) -> tuple[list[Run], int, Run | None, int]:
        """The runs `hashes` matches whole, root first; the blocks they hold; the run the
        match ends inside of (None if it ends at a run's end); and its leading blocks
        matched."""
        found = self.runs
        runs: list[Run] = []
        at = 0
        total = len(hashes)
        while at < total:
            # A chain hash names its whole prefix, and children hang off a run's last block:
            # the run holding hashes[at] starts there.
            run = found.get(hashes[at])
            if run is None:
                break
            held = run.hashes
            end = at + len(held)
            if end <= total and held == hashes[at:end]:
                runs.append(run)
                at = end
                continue
            common = 1
            most = min(len(held), total - at)
            while common < most and held[common] == hashes[at + common]:
                common += 1
            return runs, at, run, common
        return runs, at, None, 0

    def _split(self, run: Run, count: int) -> Run:
        """Cut the first `count` blocks of `run` into a run of their own, its new parent. The
        tail keeps its identity, so its children and heap entries stay valid."""
        head_hashes = run.hashes[:count]
        head = Run(head_hashes, run.depth, run.parent, run.refs, run.last_use, 1)
        del run.hashes[:count]
        run.depth += count
        run.parent = head
        self.runs[head_hashes[0]] = head
        self.runs[run.hashes[0]] = run
        return head

    def release(self, allocation: Allocation) -> None:
        """The request finished: its blocks stay cached, evictable once nothing pins them."""
        if allocation.generation != self.generation:
            return  # the cache was cleared or the engine restarted under it
        self._clock += 1
        clock = self._clock
        run = allocation.leaf
        while run is not None:
            run.refs -= 1
            run.last_use = clock
            if not run.refs and not run.kids:  # only a leaf can become evictable
                self._maybe_evictable(run)
            run = run.parent

    def _maybe_evictable(self, run: Run) -> None:
        if run.alive and run.refs == 0 and run.kids == 0:
            self._pushes += 1
            heapq.heappush(self._heap, (run.last_use, self._pushes, run))
            if len(self._heap) > 2 * self._cached + 1024:
                self._compact()

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._valid(e)]
        heapq.heapify(self._heap)

    @staticmethod
    def _valid(entry: tuple[int, int, Run]) -> bool:
        run = entry[2]
        return run.alive and run.refs == 0 and run.kids == 0 and run.last_use == entry[0]

    def _evict(self, count: int) -> int:
        """Free `count` blocks, least recently used leaf first: a run's blocks go from its
        tail, and a run left partly cached keeps its heap entry (it is still the oldest)."""
        heap = self._heap
        removed = self._removed
        freed = 0
        while freed < count and heap:
            entry = heap[0]
            run = entry[2]
            if run.refs or run.kids or not run.alive or run.last_use != entry[0]:
                heapq.heappop(heap)  # used, pinned or given a child since it was pushed
                continue
            held = run.hashes
            take = min(count - freed, len(held))
            if take == len(held):
                del self.runs[held[0]]
            tail = held[len(held) - take :]
            del held[len(held) - take :]
            self._cached -= take
            tail.reverse()  # the leaf goes first
            removed.extend([self.wire_hash(h) for h in tail] if self.signed else tail)
            freed += take
            if held:
                continue
            heapq.heappop(heap)
            run.alive = False
            parent = run.parent
            if parent is not None:
                parent.kids -= 1
                if not parent.kids and not parent.refs:
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
            # One event per block, as vLLM sends them: built through map() (positional
            # block_hashes, medium), which costs a third of a Python step per event.
            self._pending.extend(map(make, [[h] for h in removed], repeat(self.medium)))

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
        for run in self.runs.values():
            run.alive = False
        self.runs.clear()
        self._cached = 0
        self._heap.clear()
        self.generation += 1
        self._pending.append(self._events.AllBlocksCleared())
        self.counters["cleared"] += 1

    def restart(self) -> None:
        """The engine process restarts in place: unpublished events are lost, the cache is
        empty, and a new publisher (seq 0, a new instance id) binds the same endpoints."""
        for run in self.runs.values():
            run.alive = False
        self.runs.clear()
        self._cached = 0
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
