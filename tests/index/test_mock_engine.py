"""The mock engine: its eviction heap against a brute-force LRU, its event stream decoded by
the dialects' upstream structs, and the simulator's equality check failing when an event is
withheld."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.references import SGLANG, VLLM, ReferenceUnavailable, load
from kvevents.mock import MockEngine, chained_hashes
from kvevents_apps import simulate as sim
from kvevents_runtime import publisher as runtime_publisher

BS = 2


class BruteForceCache:
    """The same cache semantics, written the slow, obvious way: evict the least recently used
    unpinned block that no cached block has as its parent, one at a time, by a full scan."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: dict[int, dict[str, Any]] = {}
        self.clock = 0
        self.evicted: list[int] = []

    def _evictable(self, pinned: set[int]) -> list[int]:
        parents = {b["parent"] for b in self.blocks.values()}
        return [
            h
            for h, b in self.blocks.items()
            if b["refs"] == 0 and h not in parents and h not in pinned
        ]

    def admit(self, hashes: list[int]) -> list[int] | None:
        cached = 0
        while cached < len(hashes) and hashes[cached] in self.blocks:
            cached += 1
        needed = len(hashes) - cached
        pinned = set(hashes[:cached])
        while needed > self.capacity - len(self.blocks):
            candidates = self._evictable(pinned)
            if not candidates:
                return None
            victim = min(candidates, key=lambda h: self.blocks[h]["last"])
            del self.blocks[victim]
            self.evicted.append(victim)
        self.clock += 1
        parent = None
        for h in hashes:
            block = self.blocks.setdefault(h, {"parent": parent, "refs": 0, "last": 0})
            block["refs"] += 1
            block["last"] = self.clock
            parent = h
        return hashes

    def release(self, hashes: list[int]) -> None:
        self.clock += 1
        for h in hashes:
            if h in self.blocks:
                self.blocks[h]["refs"] -= 1
                self.blocks[h]["last"] = self.clock


def drain_evictions(engine: Any) -> list[int]:
    """The hashes the engine evicted since the last call, in order, from its pending events."""
    engine._flush_removed()
    evicted = [
        h for e in engine._pending if type(e).__name__ == "BlockRemoved" for h in e.block_hashes
    ]
    engine._pending.clear()
    return evicted


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.integers(0, 3),  # which shared prefix
            st.lists(st.integers(0, 5), min_size=0, max_size=6),  # its own tokens
        ),
        st.tuples(st.just("release"), st.integers(0, 1000)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(2, 12), ops=operations)
def test_the_eviction_heap_evicts_what_a_brute_force_lru_evicts(capacity: int, ops: list) -> None:
    engine = MockEngine("vllm", capacity_blocks=capacity, block_size=BS, publish=False)
    brute = BruteForceCache(capacity)
    prefixes = [[p * 10 + i for i in range(4)] for p in range(4)]
    held: list[tuple[Any, list[int]]] = []
    for op in ops:
        if op[0] == "admit":
            tokens = prefixes[op[1]] + [100 + t for t in op[2]]
            hashes = chained_hashes(tokens, BS)
            allocation = engine.admit(tokens)
            expected = brute.admit(hashes)
            assert (allocation is None) == (expected is None)
            evicted = drain_evictions(engine)
            assert evicted == brute.evicted, "evicted in another order than LRU"
            brute.evicted.clear()
            if allocation is not None:
                held.append((allocation, hashes))
        elif held:
            allocation, hashes = held.pop(op[1] % len(held))
            engine.release(allocation)
            brute.release(hashes)
        assert engine.cached_hashes() == set(brute.blocks)
        assert engine.used == len(brute.blocks)
        assert len(engine._heap) <= 2 * engine.used + 1024 + 1
        probes = [chained_hashes(prefix + [100, 101, 102, 103], BS) for prefix in prefixes]
        for probe in probes + [hashes for _, hashes in held]:
            # The cache is found through runs' first blocks only: a match must still equal
            # the leading blocks cached, wherever runs were split or cut.
            leading = 0
            while leading < len(probe) and probe[leading] in brute.blocks:
                leading += 1
            assert engine.match([], hashes=probe) == leading


def _sub(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize("dialect, reference", [("vllm", VLLM), ("sglang", SGLANG)])
def test_the_event_stream_is_the_engines_in_the_upstream_structs(dialect: str, reference) -> None:
    try:
        upstream = load(reference)
    except ReferenceUnavailable as exc:
        pytest.skip(f"{reference.name} cannot be fetched: {exc}")
    engine = MockEngine(dialect, capacity_blocks=4, block_size=BS)
    ctx = zmq.Context()
    sub = _sub(ctx, engine.publisher.connect_endpoint)
    try:
        time.sleep(0.3)  # the SUB joins before anything is sent
        first = engine.admit([1, 2, 3, 4, 5, 6])
        assert first is not None
        engine.step(1.0)
        engine.release(first)
        second = engine.admit([1, 2, 3, 4, 9, 9, 9, 9])  # a prefix hit, then an eviction
        assert second is not None and second.cached == 2
        engine.step(2.0)
        decoder = msgspec.msgpack.Decoder(upstream.KVEventBatch)
        batches = []
        deadline = time.monotonic() + 5
        while len(batches) < 2 and time.monotonic() < deadline:
            if sub.poll(100):
                _topic, _seq, payload = sub.recv_multipart()
                batches.append(decoder.decode(payload))
        assert len(batches) == 2
        stored = batches[0].events[0]
        hashes = [engine.wire_hash(h) for h in chained_hashes([1, 2, 3, 4, 5, 6], BS)]
        assert type(stored).__name__ == "BlockStored"
        assert list(stored.block_hashes) == hashes and stored.parent_block_hash is None
        assert list(stored.token_ids) == [1, 2, 3, 4, 5, 6] and stored.block_size == BS
        if dialect == "sglang":
            assert any(h < 0 for h in engine.blocks()) or all(h < 2**63 for h in hashes)
        kinds = [type(e).__name__ for e in batches[1].events]
        assert "BlockRemoved" in kinds and "BlockStored" in kinds
        assert kinds.index("BlockRemoved") < kinds.index("BlockStored"), "removals come first"
        new = next(e for e in batches[1].events if type(e).__name__ == "BlockStored")
        assert new.parent_block_hash == hashes[1]
        removed = [
            h
            for e in batches[1].events
            if type(e).__name__ == "BlockRemoved"
            for h in e.block_hashes
        ]
        assert set(removed) == set(hashes) - engine.blocks()
    finally:
        sub.close(0)
        ctx.term()
        engine.close()


def test_the_equality_check_fails_when_an_event_is_withheld(monkeypatch) -> None:
    """The engine's evictions are never published (no seq is spent, so nothing in the stream
    says they are missing, and no later event refers to the evicted blocks): the index goes
    on holding them, and only the equality check can tell."""
    from kvevents_runtime.mockengine import MockEngine as RuntimeEngine

    requests = list(
        sim.synthetic(
            requests=80,
            seed=3,
            prompts=2,
            prompt_tokens=64,
            conversations=6,
            turn_tokens=32,
            output_tokens=4,
        )
    )
    options = sim.Options(workers=2, capacity_blocks=64, progress=False)
    clean = asyncio.run(sim.Simulation("round_robin", requests, options).run())
    assert clean["mismatches"] == 0 and not clean["stale_workers"]

    real_step = RuntimeEngine.step
    withheld: list[Any] = []

    def step(self: Any, ts: float = 0.0) -> int:
        self._flush_removed()
        removals = [e for e in self._pending if type(e).__name__ == "BlockRemoved"]
        if removals:
            withheld.extend(removals)
            self._pending = [e for e in self._pending if type(e).__name__ != "BlockRemoved"]
        return real_step(self, ts)

    monkeypatch.setattr(RuntimeEngine, "step", step)
    result = asyncio.run(sim.Simulation("round_robin", requests, options).run())
    assert withheld, "no eviction was withheld"
    assert result["unflagged_mismatches"] > 0, result


def test_the_timing_model_is_dynamos_default() -> None:
    from kvevents.mock import TimingModel

    model = TimingModel()
    assert model.prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 15.18344 + 16.50142)
    assert model.decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 27.005 + 5.74)
    assert model.decode_ms(1.0) == pytest.approx(max(1.0, -25.74 + 54.01 + 5.74))


def test_a_check_that_times_out_says_what_the_index_is_missing(monkeypatch) -> None:
    """The end-of-run check waits for every published seq; when it gives up it must say
    which worker's stream is behind and by how much, not only count mismatches."""
    requests = list(sim.synthetic(requests=40, seed=5, prompts=2, prompt_tokens=64))
    options = sim.Options(workers=2, capacity_blocks=64, progress=False)
    real_check = sim.Simulation.check

    async def check(self: Any, timeout: float = 30.0) -> dict[str, Any]:
        caught_up = await real_check(self, timeout)
        assert caught_up["caught_up"] and not caught_up["behind"], caught_up
        self.workers[1].engine.clear()  # one more batch, published by the check itself

        async def not_reading(timeout: float = 0.0) -> None:
            await asyncio.sleep(0.01)

        monkeypatch.setattr(self.live, "step", not_reading)
        return await real_check(self, timeout=0.5)

    monkeypatch.setattr(sim.Simulation, "check", check)
    result = asyncio.run(sim.Simulation("round_robin", requests, options).run())
    assert result["caught_up"] is False, result
    behind = result["behind"]
    assert list(behind) == [1], behind
    assert behind[1]["index_expected_seq"] < behind[1]["published_next_seq"], behind


def test_the_check_waits_for_a_batch_the_publisher_thread_holds_unsent(monkeypatch) -> None:
    """Caught up is decided by seqs, and a batch taken off the publisher's queue but not yet
    sent has none: the check must wait for it rather than compare states without it. (It
    trusted the queue depth, and compared one batch early in 3 of 6 whole-trace runs.)"""
    requests = list(sim.synthetic(requests=40, seed=5, prompts=2, prompt_tokens=64))
    options = sim.Options(workers=2, capacity_blocks=64, progress=False)
    holding = threading.Event()
    in_send = threading.Event()
    original_send = runtime_publisher.unwrapped_send

    def held_when_asked(sock: Any) -> Any:
        send = original_send(sock)

        def maybe_held(*args: Any, **kwargs: Any) -> Any:
            if holding.is_set():
                holding.clear()  # one batch's first frame, on whichever thread gets it
                in_send.set()
                time.sleep(0.5)
            return send(*args, **kwargs)

        return maybe_held

    monkeypatch.setattr(runtime_publisher, "unwrapped_send", held_when_asked)
    real_check = sim.Simulation.check

    async def check(self: Any, timeout: float = 30.0) -> dict[str, Any]:
        first = await real_check(self, timeout)
        assert first["caught_up"] and first["mismatches"] == 0, first
        holding.set()
        self.workers[1].engine.clear()
        self.workers[1].engine.step()  # its batch is taken, then held inside the send
        assert in_send.wait(5)
        return await real_check(self, timeout=10)

    monkeypatch.setattr(sim.Simulation, "check", check)
    result = asyncio.run(sim.Simulation("round_robin", requests, options).run())
    assert result["caught_up"] is True, result
    assert result["mismatches"] == 0, result
