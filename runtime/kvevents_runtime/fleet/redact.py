"""Batches with the prompts' token ids replaced by Dynamo local block hashes (`--redact`).

What a router needs of a stored block is its engine hash (for parents and removals) and its
local hash (what a query's tokens hash to); token ids are needed only to compute the latter,
on the node. A redacted batch carries the hashes alone, so prompts never leave the node. It
is kvevents' own payload: the byte 0xC1 (which MessagePack never uses) and then a MessagePack
array, so a reader tells it from an engine's batch by its first byte.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..blockhash import local_block_hashes

MARK = b"\xc1"


class BlockStored(msgspec.Struct, tag=True, array_like=True, gc=False):
    block_hashes: list[Any]
    parent_block_hash: Any
    block_size: int
    local_hashes: list[int]
    """One Dynamo local block hash per block (LoRA and salt already in its seed)."""
    medium: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, array_like=True, gc=False):
    block_hashes: list[Any]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, array_like=True, gc=False):
    pass


class RedactedBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(RedactedBatch).decode


def redact(batch: Any) -> bytes:
    """A decoded batch (any dialect's events) as a redacted payload. A block whose tokens
    cannot be hashed (ids beyond u32, token pairs) gets no local hash: the reader counts the
    event as bad and marks the worker stale, as it would for the original."""
    events: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
    for event in getattr(batch, "events", ()):
        kind = type(event).__name__
        if kind == "BlockStored":
            try:
                keys = local_block_hashes(
                    event.token_ids,
                    event.block_size,
                    getattr(event, "lora_name", None),
                    getattr(event, "cache_salt", None),
                )[: len(event.block_hashes)]
            except (OverflowError, TypeError, ValueError):
                keys = []
            events.append(
                BlockStored(
                    event.block_hashes,
                    event.parent_block_hash,
                    event.block_size,
                    keys,
                    _medium(getattr(event, "medium", None)),
                )
            )
        elif kind == "BlockRemoved":
            events.append(BlockRemoved(event.block_hashes, _medium(getattr(event, "medium", None))))
        elif kind == "AllBlocksCleared":
            events.append(AllBlocksCleared())
    return MARK + _encode(RedactedBatch(float(getattr(batch, "ts", 0.0) or 0.0), events))


def _medium(medium: Any) -> str | None:
    if medium is None or isinstance(medium, str):
        return medium
    return str(getattr(medium, "value", medium))


def is_redacted(payload: bytes) -> bool:
    return payload[:1] == MARK


def unredact(payload: bytes) -> RedactedBatch:
    """The batch of a redacted payload; msgspec.DecodeError (a ValueError) otherwise."""
    return _decode(memoryview(payload)[1:])
