"""The prefix index equals a reference model of the engines' caches.

The model keeps, per worker, each engine block hash's token path (the tuple of local
hashes from the root) and tiers, applying the stated semantics in the most direct way:
a store under an unknown parent is skipped and marks the worker stale, a removal takes
exactly the named block (descendants stay), a clear empties that worker only. A query's
answer for a worker is the longest run of leading blocks whose paths the worker holds.
Hypothesis drives both with random stores (chained, re-stored, unknown parents, tiers, LoRA
names), removals (known, unknown, interior), clears, resyncs and worker removals, over
many workers sharing prefixes, and compares every answer.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvevents.index import PrefixIndex, local_block_hashes
from kvevents_runtime.backend import IndexBackend
from kvevents_runtime.prefix import CPU, GPU, LINK_BITS, TIER_OF_MEDIUM
from tests.index.protocol_only import ProtocolOnly

pytestmark = pytest.mark.timeout(900)  # 10,000 examples on a loaded 2-core machine

BS = 2
WORKERS = [(1, 0), (1, 1), (2, 0)]
BLOCKS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=4)
"""Token blocks from a tiny alphabet, so workers share paths often."""


def _stored(
    hashes: list[int], tokens: list[int], parent: Any = None, medium: Any = None, lora: Any = None
) -> Any:
    event = BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        medium=medium,
        lora_name=lora,
    )
    return KVEventBatch(ts=0.0, events=[event])


class Reference:
    """Per worker: the token paths it holds with their tiers, and one engine id per path."""

    def __init__(self) -> None:
        self.paths: dict[Any, dict[tuple[int, ...], set[int]]] = {}
        self.names: dict[Any, dict[Any, tuple[int, ...]]] = {}
        self.stale: set[Any] = set()

    def forget(self, w: Any) -> None:
        self.paths.pop(w, None)
        self.names.pop(w, None)

    def store(self, w: Any, parent: Any, hashes: list[int], keys: list[int], tier: int) -> None:
        paths = self.paths.setdefault(w, {})
        names = self.names.setdefault(w, {})
        if parent is None:
            path: tuple[int, ...] = ()
        elif parent in names:
            path = names[parent]
        else:
            self.stale.add(w)
            return
        for h, k in zip(hashes, keys, strict=True):
            path = (*path, k)
            moved_from = names.get(h)
            if moved_from is not None and moved_from != path:
                del paths[moved_from]  # the id is stored again elsewhere: it moved
            for other, named in list(names.items()):
                if named == path and other != h:
                    del names[other]  # the block was renamed
            names[h] = path
            paths[path] = paths.get(path, set()) | {tier}

    def remove(self, w: Any, hashes: list[int], tier: int) -> None:
        paths = self.paths.setdefault(w, {})
        names = self.names.setdefault(w, {})
        for h in hashes:
            path = names.get(h)
            if path is None or tier not in paths[path]:
                self.stale.add(w)
                continue
            paths[path].discard(tier)
            if not paths[path]:
                del paths[path], names[h]

    def match(self, keys: list[int]) -> dict[Any, int]:
        return {w: blocks for w, (blocks, _, _) in self.match_tiers(keys).items()}

    def match_tiers(self, keys: list[int]) -> dict[Any, tuple[int, int, int]]:
        """Per worker: leading blocks held, and of those the leading ones held in GPU, and in
        GPU or CPU (the answers are cumulative)."""
        out = {}
        for w, held in self.paths.items():
            tiers = []
            while len(tiers) < len(keys) and tuple(keys[: len(tiers) + 1]) in held:
                tiers.append(held[tuple(keys[: len(tiers) + 1])])
            if tiers:
                gpu = next((i for i, t in enumerate(tiers) if GPU not in t), len(tiers))
                cpu = next((i for i, t in enumerate(tiers) if not t & {GPU, CPU}), len(tiers))
                out[w] = (len(tiers), gpu, cpu)
        return out


class IndexMachine(RuleBasedStateMachine):
    """Drives a backend through kvevents_runtime.backend.IndexBackend only; the invariants
    on the tree's structure run for the in-memory backend, whose structure they are."""

    make_backend: Any = PrefixIndex

    def __init__(self) -> None:
        super().__init__()
        self.index = self.make_backend(BS)
        assert isinstance(self.index, IndexBackend)
        self.model = Reference()
        self.next_hash: dict[Any, int] = {}
        """Engine ids per worker, from 0 (an id that reads as false)."""
        self.stored: list[tuple[Any, int]] = []
        self.paths: list[list[int]] = []
        """Token sequences stored (flattened), to query with."""
        self.from_root: list[tuple[list, Any]] = []
        """(blocks, lora) of stores from the root: stored again, they rename, move and
        re-tier blocks a worker holds, as an engine re-storing a prompt does."""

    def _hash(self, w: Any) -> int:
        self.next_hash[w] = self.next_hash.get(w, -1) + 1
        return self.next_hash[w]

    @rule(
        w=st.sampled_from(WORKERS),
        blocks=BLOCKS,
        parent_kind=st.sampled_from(["root", "known", "known", "unknown", "again"]),
        reuse=st.booleans(),
        reuse_at=st.integers(0, 3),
        medium=st.sampled_from([None, "GPU", "CPU"]),
        lora=st.sampled_from([None, "", "adapter"]),
        pick=st.integers(0, 10_000),
        which=st.integers(0, 10_000),
        reused=st.integers(0, 3),
        twice=st.booleans(),
    )
    def store(
        self,
        w: Any,
        blocks: list,
        parent_kind: str,
        reuse: bool,
        reuse_at: int,
        medium: Any,
        lora: Any,
        pick: int,
        which: int,
        reused: int,
        twice: bool,
    ) -> None:
        mine = [h for ww, h in self.stored if ww == w]
        parent: Any = None
        if parent_kind == "known" and mine:
            parent = mine[pick % len(mine)]
        elif parent_kind == "unknown":
            parent = 10**9 + pick
        elif parent_kind == "again" and self.from_root:
            again, lora = self.from_root[which % len(self.from_root)]
            blocks = again[: 1 + pick % len(again)]
        if parent is None and parent_kind != "again":
            self.from_root.append((blocks, lora))
        hashes = [self._hash(w) for _ in blocks]
        if reuse and mine:
            # An engine id stored again, maybe elsewhere (a move: onto an ancestor of its old
            # block too), maybe where the worker holds another id (a rename). Recent ids
            # mostly, as an engine's are.
            recent = mine[-4:]
            hashes[reuse_at % len(hashes)] = recent[reused % len(recent)]
        if twice and len(hashes) > 1:
            # One id twice in one event: its first block moves to the second place (the
            # index's whole-event fast path must back out and take the slow one).
            hashes[-1] = hashes[0]
        tokens = [t for block in blocks for t in block]
        keys = local_block_hashes(tokens, BS, lora)
        self.index.apply(w, _stored(hashes, tokens, parent, medium, lora))
        self.model.store(w, parent, hashes, keys, TIER_OF_MEDIUM[medium])
        self.stored += [(w, h) for h in hashes]
        self.paths.append(tokens)

    @rule(
        w=st.sampled_from(WORKERS),
        picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=3),
        unknown=st.booleans(),
        medium=st.sampled_from([None, "CPU"]),
    )
    def remove(self, w: Any, picks: list[int], unknown: bool, medium: Any) -> None:
        mine = [h for ww, h in self.stored if ww == w]
        if picks[0] % 2:
            mine = mine[-6:]  # mostly what was stored lately, as an engine evicts
        hashes = [mine[p % len(mine)] for p in picks] if mine else []
        if unknown or not hashes:
            hashes.append(10**9 + picks[0])
        hashes = list(dict.fromkeys(hashes))
        event = BlockRemoved(block_hashes=hashes, medium=medium)
        self.index.apply(w, KVEventBatch(ts=0.0, events=[event]))
        self.model.remove(w, hashes, TIER_OF_MEDIUM[medium])

    @rule(w=st.sampled_from(WORKERS))
    def clear(self, w: Any) -> None:
        self.index.apply(w, KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
        self.model.forget(w)

    @rule(w=st.sampled_from(WORKERS))
    def resync_empty(self, w: Any) -> None:
        self.index.resync(w)
        self.model.forget(w)
        self.model.stale.discard(w)

    @rule(w=st.sampled_from(WORKERS))
    def remove_worker(self, w: Any) -> None:
        self.index.remove_worker(w)
        self.model.forget(w)
        self.model.stale.discard(w)

    @rule(w=st.sampled_from(WORKERS), blocks=BLOCKS)
    def partial_blocks_are_ignored(self, w: Any, blocks: list) -> None:
        tokens = [t for block in blocks for t in block]
        event = BlockStored(
            block_hashes=[self._hash(w)], parent_block_hash=None, token_ids=tokens[:1], block_size=1
        )
        before = self.index.counters["partial_blocks"]
        self.index.apply(w, KVEventBatch(ts=0.0, events=[event]))
        assert self.index.counters["partial_blocks"] == before + 1

    @precondition(lambda self: self.paths)
    @rule(pick=st.integers(0, 10_000), extra=BLOCKS, cut=st.integers(0, 4))
    def query_matches_the_model(self, pick: int, extra: list, cut: int) -> None:
        tokens = self.paths[pick % len(self.paths)]
        tokens = tokens[: max(0, len(tokens) - cut * BS)] + [t for b in extra for t in b]
        for lora in (None, "adapter"):
            keys = local_block_hashes(tokens, BS, lora)
            matched = self.index.match(keys)
            got = {w: m.blocks for w, m in matched.items() if m.blocks}
            assert got == self.model.match(keys), (tokens, lora)
            tiers = {w: (m.blocks, m.gpu, m.cpu) for w, m in matched.items() if m.blocks}
            assert tiers == self.model.match_tiers(keys), (tokens, lora)
            answer = self.index.query(tokens, lora_name=lora)
            assert {w: m.blocks for w, m in answer.items() if m.blocks} == got

    @invariant()
    def same_blocks_and_staleness(self) -> None:
        for w in WORKERS:
            assert self.index.block_count(w) == len(self.model.names.get(w, {}))
        assert set(self.index.stale) == self.model.stale

    @invariant()
    def gpu_tier_is_within_the_match(self) -> None:
        for tokens in self.paths[-3:]:
            for w, m in self.index.query(tokens).items():
                assert m.gpu <= m.cpu <= m.disk <= m.blocks
                if all(tiers <= {GPU} for tiers in self.model.paths.get(w, {}).values()):
                    assert m.gpu == m.blocks

    @invariant()
    def the_tier_counter_counts_every_entry_outside_gpu(self) -> None:
        """Answers walk tiers only while this counter is above 0: too low answers CPU-only
        blocks as GPU."""
        if not isinstance(self.index, PrefixIndex):
            return
        outside = 0
        for chain in self.index.holders:
            for bit in self.index.bits.values():
                outside += bin(self.index._mask(chain, bit) & ~GPU).count("1")
        assert self.index._other_tiers == outside

    @invariant()
    def a_block_holds_exactly_the_bits_of_the_workers_that_list_it(self) -> None:
        """Worker bits are freed when a worker is removed and given to the next: a bit left
        on a block would lend it to a stranger; a block nobody lists must be gone."""
        if not isinstance(self.index, PrefixIndex):
            return
        listed: dict[int, int] = {}
        for worker, blocks in self.index.lookup.items():
            for chain in blocks.values():
                listed[chain] = listed.get(chain, 0) | self.index.bits[worker]
        workers = {
            chain: held >> LINK_BITS << LINK_BITS for chain, held in self.index.holders.items()
        }
        assert workers == listed, "a block's worker bits drifted"
        assert len(set(self.index.bits.values())) == len(self.index.bits)

    @invariant()
    def every_held_block_keeps_its_link_and_no_other_is_kept(self) -> None:
        if not isinstance(self.index, PrefixIndex):
            return
        assert set(self.index.tiers) <= set(self.index.holders)
        for chain, held in self.index.holders.items():
            assert held >> LINK_BITS, "a block nobody holds is kept"
            link = held & ((1 << LINK_BITS) - 1)
            parent = link >> 64
            parent -= (1 << 64) if parent >= 1 << 63 else 0
            assert hash((parent, link & ((1 << 64) - 1))) == chain, "a link names another block"
        for tiers in self.index.tiers.values():
            assert tiers and all(mask not in (0, GPU) for mask in tiers.values())


IndexMachine.TestCase.settings = settings(
    # `nox -s contract` runs more (KVEVENTS_INDEX_EXAMPLES).
    max_examples=int(os.environ.get("KVEVENTS_INDEX_EXAMPLES", "10000")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BACKENDS: dict[str, Any] = {"memory": PrefixIndex, "protocol-only": ProtocolOnly}
"""Every index backend, each checked against the reference model through the protocol."""


def _machine_for(name: str) -> Any:
    machine = type(f"IndexMachine_{name}", (IndexMachine,), {"make_backend": BACKENDS[name]})
    machine.TestCase.settings = IndexMachine.TestCase.settings
    return machine.TestCase


test_the_index_equals_the_reference_model = _machine_for("memory")
test_the_index_through_the_protocol_alone_equals_the_reference_model = _machine_for("protocol-only")


def test_cpu_tier_counts_are_cumulative() -> None:
    index = PrefixIndex(BS)
    stored = BlockStored(
        block_hashes=[1, 2, 3], parent_block_hash=None, token_ids=[1, 2, 3, 4, 5, 6], block_size=BS
    )
    index.apply((1, 0), KVEventBatch(ts=0.0, events=[stored]))
    offload = BlockStored(
        block_hashes=[1, 2, 3],
        parent_block_hash=None,
        token_ids=[1, 2, 3, 4, 5, 6],
        block_size=BS,
        medium="CPU",
    )
    index.apply((1, 0), KVEventBatch(ts=0.0, events=[offload]))
    index.apply((1, 0), KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[2], medium="GPU")]))
    match = index.query([1, 2, 3, 4, 5, 6])[(1, 0)]
    assert (match.blocks, match.gpu, match.cpu, match.disk) == (3, 1, 3, 3)
    assert CPU != GPU


def test_a_gap_in_one_worker_never_lends_it_another_workers_blocks() -> None:
    """Three workers hold one chain; worker 2 loses the second block, worker 3 the first.
    At depth 2 the holders are {1, 3}: as many as {1, 2} that were active, which a
    count-only walk (children's holders assumed a subset of their parent's) would take as no
    change, over-counting worker 2 the way the issue saw in Dynamo's threaded index."""
    index = PrefixIndex(BS)
    tokens = [1, 2, 3, 4, 5, 6]
    for worker in ((1, 0), (2, 0), (3, 0)):
        stored = BlockStored(
            block_hashes=[11, 12, 13], parent_block_hash=None, token_ids=tokens, block_size=BS
        )
        index.apply(worker, KVEventBatch(ts=0.0, events=[stored]))
    index.apply((2, 0), KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[12])]))
    index.apply((3, 0), KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[11])]))
    got = {w: m.blocks for w, m in index.query(tokens).items()}
    assert got == {(1, 0): 3, (2, 0): 1}
    assert not index.stale


def test_an_id_moved_onto_an_ancestor_of_its_old_block_stays_in_the_tree() -> None:
    """Engine id 12 moves from the second block of a chain to the first, whose own id was
    evicted: dropping its old place pruned the branch, the new place with it, and the worker
    held a block no query could reach (1 block answered for 2, unflagged; a clear then raised
    KeyError)."""
    index = PrefixIndex(BS)
    worker = (1, 0)
    index.apply(worker, _stored([11, 12], [1, 2, 3, 4]))
    index.apply(worker, KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[11])]))
    index.apply(worker, _stored([12], [1, 2]))  # 12 now names the first block
    index.apply(worker, _stored([13], [3, 4], parent=12))
    match = index.query([1, 2, 3, 4])[worker]
    assert (match.blocks, match.stale) == (2, False)
    index.apply(worker, KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
    assert index.query([1, 2, 3, 4]) == {} and not index.holders


def test_a_renamed_block_keeps_its_tiers_apart() -> None:
    """The engine renames a GPU block (id 0, then 5) while offloading it to CPU, then frees
    its GPU copy: the block is CPU-only and must not be answered as GPU (a loop variable once
    shadowed the 'tier other than GPU' flag, and an id of 0 read as false)."""
    index = PrefixIndex(BS)
    worker = (1, 0)
    index.apply(worker, _stored([0], [1, 2], medium="GPU"))
    index.apply(worker, _stored([5], [1, 2], medium="CPU"))
    index.apply(worker, KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[5], medium="GPU")]))
    match = index.query([1, 2])[worker]
    assert (match.blocks, match.gpu, match.cpu) == (1, 0, 1)


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_given_local_hashes_outside_u64_are_a_bad_event_that_marks_the_worker_stale(bad: int):
    """A bridge's redacted store carries local hashes as given; one outside u64 would spill
    out of its link into the bits that say which workers hold the block."""
    from kvevents_runtime.fleet.redact import BlockStored as Redacted
    from kvevents_runtime.fleet.redact import RedactedBatch

    index = PrefixIndex(BS)
    worker = (1, 0)
    index.apply(worker, RedactedBatch(0.0, [Redacted([7], None, BS, [5])]))
    index.apply(worker, RedactedBatch(0.0, [Redacted([8], 7, BS, [bad])]))
    assert index.counters["bad_events"] == 1
    assert worker in index.stale
    assert index.engine_blocks(worker) == {7}
    assert index.match([5, bad & ((1 << 64) - 1)])[worker].blocks == 1
