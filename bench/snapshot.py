"""State snapshots: memory per live block, snapshot bytes per block, the publisher thread's
cost of keeping the set, and the time a subscriber takes to heal from one over tcp.

Each measurement runs in a fresh process (spawn), so tracemalloc sees only the block set.
Blocks are stored the way vLLM stores them: a request's chain in one BlockStored, 16 tokens
per block, 64-bit hashes, medium "GPU".
"""

from __future__ import annotations

import random
import time
from typing import Any

from .child import run_in_child
from .stats import Figure

BLOCK_SIZE = 16
BLOCKS_PER_EVENT = 16


def _events(blocks: int, seed: int) -> list[Any]:
    from kvevents import vllm

    rng = random.Random(seed)
    out = []
    for start in range(0, blocks, BLOCKS_PER_EVENT):
        count = min(BLOCKS_PER_EVENT, blocks - start)
        hashes: list[bytes | int] = [rng.getrandbits(64) for _ in range(count)]
        out.append(
            vllm.BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=[rng.randrange(150_000) for _ in range(len(hashes) * BLOCK_SIZE)],
                block_size=BLOCK_SIZE,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        )
    return out


def _measure(blocks: int, conn: Any) -> None:
    import tracemalloc

    import msgspec

    from kvevents import vllm
    from kvevents.vllm.snapshot import SHAPE
    from kvevents_runtime.blockset import BlockSet

    events = _events(blocks, seed=blocks)
    batches = [vllm.KVEventBatch(ts=0.0, events=[e]) for e in events]
    published = sum(len(msgspec.msgpack.encode(b)) for b in batches)
    timed = BlockSet(SHAPE)  # timed apart: tracemalloc slows every allocation
    started = time.perf_counter()
    for b in batches:
        timed.apply(b)
    apply_s = time.perf_counter() - started
    del timed
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = BlockSet(SHAPE)
    for b in batches:
        state.apply(b)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    encode = msgspec.msgpack.Encoder().encode
    started = time.perf_counter()
    payloads = [encode(SHAPE.make_batch(part, 0)) for part in state.freeze()]
    rebuild_s = time.perf_counter() - started
    conn.send(
        {
            "bytes_per_block": held / blocks,
            "snapshot_bytes_per_block": sum(map(len, payloads)) / blocks,
            "published_bytes_per_block": published / blocks,
            "apply_us_per_batch": apply_s * 1e6 / len(batches),
            "rebuild_us_per_block": rebuild_s * 1e6 / blocks,
        }
    )


def _heal(blocks: int, conn: Any) -> None:
    """A publisher holding `blocks` live blocks with a replay buffer of 8; a subscriber joins
    and is timed from its creation to the snapshot's delivery."""
    from kvevents import Subscriber, vllm

    pub = vllm.ZmqEventPublisher(
        0, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", buffer_steps=8, snapshots=True
    )
    try:
        events = _events(blocks, seed=7)
        for e in events:
            pub.publish(vllm.KVEventBatch(ts=0.0, events=[e]))
        deadline = time.monotonic() + 60
        while pub.counters()["next_seq"] < len(events) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        elapsed = None
        live = pub.connect_endpoint
        replay = pub.connect_replay_endpoint
        with Subscriber(live, replay, on_notice=lambda n: None) as sub:
            while time.perf_counter() - started < 60 and elapsed is None:
                for d in sub.poll(0.1):
                    if d.snapshot:
                        elapsed = time.perf_counter() - started
                        got = sum(len(e.block_hashes) for e in d.batch.events)
                        if got != blocks:
                            raise AssertionError(f"snapshot held {got} of {blocks} blocks")
        conn.send({"heal_ms": None if elapsed is None else elapsed * 1e3})
    finally:
        pub.shutdown()


def _in_process(target: Any, blocks: int) -> dict[str, Any]:
    return run_in_child(target, (blocks,), 300, f"snapshot bench with {blocks} blocks")


def measure(sizes: tuple[int, ...], reps: int) -> dict[int, dict[str, Figure]]:
    rows: dict[int, dict[str, Figure]] = {}
    units = {
        "bytes_per_block": "B",
        "snapshot_bytes_per_block": "B",
        "published_bytes_per_block": "B",
        "apply_us_per_batch": "µs",
        "rebuild_us_per_block": "µs",
        "heal_ms": "ms",
    }
    for _ in range(reps):
        for blocks in sizes:
            row = rows.setdefault(blocks, {name: Figure(unit) for name, unit in units.items()})
            for target in (_measure, _heal):
                for name, value in _in_process(target, blocks).items():
                    row[name].add(value)
    return rows
