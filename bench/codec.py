"""In-process codec figures: kvevents' tolerant decoder against a plain typed msgspec decoder
of the producer's own structs, and msgspec encoding alone (the encode floor)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

import kvevents

from .impls import Impl, encode_all
from .shapes import batch_pool


def _per_item_us(function: Callable[[Any], Any], items: list[Any], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for item in items:
            function(item)
    return (time.perf_counter() - start) / (rounds * len(items)) * 1e6


def decode_pair(reference: Impl, shape: str, rounds: int) -> tuple[float, float]:
    """(tolerant, typed) µs per batch on the producer's bytes."""
    payloads = encode_all(batch_pool(shape, reference.structs, 1000))
    typed = msgspec.msgpack.Decoder(reference.structs.KVEventBatch).decode
    return _per_item_us(kvevents.decode, payloads, rounds), _per_item_us(typed, payloads, rounds)


def encode_alone(impl: Impl, shape: str, rounds: int) -> float:
    batches = batch_pool(shape, impl.structs, 1000)
    return _per_item_us(msgspec.msgpack.Encoder().encode, batches, rounds)
