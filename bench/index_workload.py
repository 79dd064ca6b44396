"""The index workload of ../shared/reference/index_router.md (Appendix A): 8 workers, block
size 16, 1,024-token sequences of a shared 512-token prefix (one of 64) and a unique suffix,
spread round-robin; a worker that already holds the prefix is sent only the suffix, chained
to the prefix's last engine hash. 2,600 sequences give ~99.5k (worker, block) entries;
26,000 give ~1M. Queries: half cached sequences, half a known prefix with a new suffix.

Each event is built twice, as the same information: a vLLM 0.33 wire payload for kvevents
(decoded on ingest) and Dynamo's JSON KvCacheEvent for its RadixTree.
"""

from __future__ import annotations

import json
import random
import struct
from array import array
from dataclasses import dataclass

import msgspec
import xxhash

WORKERS = 8
BLOCK_SIZE = 16
SEQ_TOKENS = 1024
PREFIXES = 64
PREFIX_TOKENS = 512


@dataclass
class Workload:
    payloads: list[tuple[int, bytes]]
    """(worker, vLLM msgpack payload of one BlockStored)"""
    dynamo_events: list[tuple[int, bytes]]
    """(worker, Dynamo JSON KvCacheEvent)"""
    entries: int
    queries: list[list[int]]
    last_of_worker: dict[int, list[int]]
    """A sequence each worker was sent in full, to wait for ingest to finish."""


def _engine_hashes(tokens: list[int]) -> list[int]:
    out, parent = [], 0
    for i in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        block = struct.pack(f"<Q{BLOCK_SIZE}I", parent, *tokens[i : i + BLOCK_SIZE])
        parent = xxhash.xxh3_64_intdigest(block)
        out.append(parent)
    return out


def build(sequences: int, seed: int = 0, dynamo_hash=None, workers: int = WORKERS) -> Workload:  # type: ignore[no-untyped-def]
    """`dynamo_hash(tokens, block_size)` gives Dynamo's local hashes for its events; kvevents'
    own function is used when None (they are equal: tests/index/test_dynamo_hashes.py)."""
    from kvevents.index import local_block_hashes

    local = dynamo_hash or local_block_hashes
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(150_000) for _ in range(n)]

    prefixes = [tokens(PREFIX_TOKENS) for _ in range(PREFIXES)]
    encode = msgspec.msgpack.Encoder().encode
    have: set[tuple[int, int]] = set()
    payloads, dynamo_events, full = [], [], {}
    entries = 0
    # Each sequence as its prefix and its own tokens packed (2 KB, not 20 KB of int objects),
    # so the 10M-entry row's workload fits in memory beside both indexes.
    chosen: list[tuple[int, array]] = []
    for i in range(sequences):
        worker, prefix = i % workers, rng.randrange(PREFIXES)
        own = tokens(SEQ_TOKENS - PREFIX_TOKENS)
        seq = prefixes[prefix] + own
        chosen.append((prefix, array("I", own)))
        ext = _engine_hashes(seq)
        start = PREFIX_TOKENS // BLOCK_SIZE if (worker, prefix) in have else 0
        have.add((worker, prefix))
        parent = ext[start - 1] if start else None
        blocks = ext[start:]
        entries += len(blocks)
        event = {
            "type": "BlockStored",
            "block_hashes": blocks,
            "parent_block_hash": parent,
            "token_ids": seq[start * BLOCK_SIZE :],
            "block_size": BLOCK_SIZE,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
        payloads.append((worker, encode([0.0, [event], 0])))
        keys = local(seq, BLOCK_SIZE)[start:]
        stored = {
            "parent_hash": parent,
            "blocks": [
                {"block_hash": b, "tokens_hash": k} for b, k in zip(blocks, keys, strict=True)
            ],
        }
        dynamo = {"event_id": i, "data": {"stored": stored}, "dp_rank": 0}
        dynamo_events.append((worker, json.dumps(dynamo).encode()))
        if start == 0:
            full[worker] = seq
    queries = []
    for q in range(1000):
        if q % 2 == 0:
            prefix, packed = chosen[rng.randrange(sequences)]
            queries.append(prefixes[prefix] + packed.tolist())
        else:
            queries.append(prefixes[rng.randrange(PREFIXES)] + tokens(SEQ_TOKENS - PREFIX_TOKENS))
    return Workload(payloads, dynamo_events, entries, queries, full)
