"""Dynamo-compatible local block hashes: the router's own key for a block of tokens.

Each complete block of `block_size` token ids is hashed alone (not chained; the tree does
the chaining) as `xxh3_64(u32 little-endian token bytes, seed)`. The seed is 1337, plus
`xxh3_64(lora_name, seed 0)` when a LoRA name is given and `xxh3_64(cache_salt, seed 1)` when
a salt is given, as wrapping u64 adds; an empty string counts as absent. These are the
values of Dynamo's `compute_block_hash_for_seq` (checked against ai-dynamo-runtime 1.6.1 in
tests/index/test_dynamo_hashes.py) and of the Mooncake Conductor proposal.

The engine's own block hashes (vLLM's sha256 low bits, SGLang's signed int64, raw bytes) are
never re-derived: the index uses them only as ids for parent links and removals.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache

import xxhash

SEED = 1337
"""XXH3 seed of a block without LoRA or salt."""
_U64 = (1 << 64) - 1
_hash = xxhash.xxh3_64_intdigest
_BIG_ENDIAN = sys.byteorder == "big"


@lru_cache(maxsize=1024)
def block_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The XXH3 seed for blocks of this LoRA and salt."""
    seed = SEED
    if lora_name:
        seed += _hash(lora_name.encode("utf-8"), 0)
    if cache_salt:
        seed += _hash(cache_salt.encode("utf-8"), 1)
    return seed & _U64


def local_block_hashes(
    tokens: Sequence[int] | array,
    block_size: int,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """One hash per complete block of `tokens` (a trailing partial block has none).

    Raises OverflowError for a token id outside u32, TypeError for a non-int token."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    seed = block_seed(lora_name, cache_salt)
    packed = tokens if isinstance(tokens, array) else array("I", tokens)
    if _BIG_ENDIAN:
        packed = array("I", packed)
        packed.byteswap()
    data = packed.tobytes()  # bytes slices hash faster than memoryview slices
    width = 4 * block_size
    end = (len(data) // width) * width
    return [_hash(data[i : i + width], seed) for i in range(0, end, width)]
