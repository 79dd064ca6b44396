"""Local block hashes equal Dynamo's `compute_block_hash_for_seq` (ai-dynamo-runtime 1.6.1,
fetched at test time) on 1,000 random sequences, with and without LoRA name and salt."""

from __future__ import annotations

import random

import pytest

from bench import dynamo
from bench.references import ReferenceUnavailable
from kvevents.index import local_block_hashes


@pytest.fixture(scope="module")
def dynamo_llm():
    try:
        return dynamo.llm()
    except ReferenceUnavailable as exc:
        pytest.skip(f"Dynamo 1.6.1 cannot be fetched or loaded: {exc}")


def test_local_hashes_equal_dynamos(dynamo_llm) -> None:
    rng = random.Random(1337)
    for case in range(1000):
        block_size = rng.choice([1, 4, 16, 32, 64])
        tokens = [rng.randrange(2**32) for _ in range(rng.randrange(0, 400))]
        lora = rng.choice([None, "", "adapter-a", "ünï"]) if case % 2 else None
        salt = rng.choice([None, "", "tenant-7"]) if case % 3 else None
        theirs = dynamo_llm.compute_block_hash_for_seq(
            tokens, block_size, lora_name=lora, cache_namespace=salt
        )
        assert local_block_hashes(tokens, block_size, lora, salt) == theirs, (
            block_size,
            lora,
            salt,
        )


def test_a_changed_seed_changes_every_hash(dynamo_llm) -> None:
    tokens = list(range(64))
    plain = dynamo_llm.compute_block_hash_for_seq(tokens, 16)
    assert local_block_hashes(tokens, 16, "adapter") != plain
    assert local_block_hashes(tokens, 16) == plain
