"""The three batch shapes of the benchmark, built from any dialect's structs.

(a) one BlockStored of 1 block and 16 tokens, (b) 8 events alternating BlockStored of 4 blocks
(64 tokens) and BlockRemoved of 4 hashes, (c) one BlockRemoved. Hashes are 63-bit integers
as engines publish them; every batch of a pool is a distinct object with distinct hashes, as a
scheduler's steps are.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

SHAPES = {
    "a": "1 BlockStored, 1 block, 16 tokens",
    "b": "8 events: 4 BlockStored x 4 blocks (64 tokens), 4 BlockRemoved x 4 hashes",
    "c": "1 BlockRemoved",
}
EVENTS_PER_BATCH = {"a": 1, "b": 8, "c": 1}
BLOCK_SIZE = 16


def _make(cls: type, **given: Any) -> Any:
    """A struct with the given fields; required fields not given are None (lora_id, medium,
    lora_name: optional in meaning, required by position in the producers' structs)."""
    fields = cls.__struct_fields__  # type: ignore[attr-defined]
    required = fields[: len(fields) - len(cls.__struct_defaults__)]  # type: ignore[attr-defined]
    for name in required:
        given.setdefault(name, None)
    return cls(**given)


def _hash(rng: random.Random) -> int:
    return rng.getrandbits(63)


def _stored(structs: ModuleType, rng: random.Random, blocks: int) -> Any:
    tokens = [rng.randrange(150_000) for _ in range(blocks * BLOCK_SIZE)]
    return _make(
        structs.BlockStored,
        block_hashes=[_hash(rng) for _ in range(blocks)],
        parent_block_hash=_hash(rng),
        token_ids=tokens,
        block_size=BLOCK_SIZE,
    )


def _removed(structs: ModuleType, rng: random.Random, hashes: int) -> Any:
    return _make(structs.BlockRemoved, block_hashes=[_hash(rng) for _ in range(hashes)])


def _events(shape: str, structs: ModuleType, rng: random.Random) -> list[Any]:
    if shape == "a":
        return [_stored(structs, rng, 1)]
    if shape == "b":
        events = []
        for _ in range(4):
            events.append(_stored(structs, rng, 4))
            events.append(_removed(structs, rng, 4))
        return events
    if shape == "c":
        return [_removed(structs, rng, 1)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def batch_pool(shape: str, structs: ModuleType, size: int, seed: int = 0) -> list[Any]:
    """`size` distinct batches of one shape, rank 0, built from `structs`' classes."""
    rng = random.Random(seed)
    return [structs.KVEventBatch(float(i), _events(shape, structs, rng), 0) for i in range(size)]


def cycle(pool: list[Any], count: int) -> list[Any]:
    """The pool's batches repeated to `count` items, as one list so the timed loop only iterates."""
    return [pool[i % len(pool)] for i in range(count)]
