"""The blocks a publisher holds by what it has published, for state snapshots.

A publisher started with snapshots on applies every batch it sends: BlockStored adds its
blocks, BlockRemoved takes them away (per storage tier: the removal's medium and the other
fields it shares with BlockStored), AllBlocksCleared empties the set. A snapshot request is
answered from a frozen copy of the set, rebuilt into BlockStored events of the publisher's
own dialect: applying them to an empty state gives what applying every batch up to the
snapshot's seq would.

Memory: one dict entry per live block holding its parent hash, its token ids packed as
4-byte ints, its per-block extra key and a shared tuple of the event's other fields (interned,
so a run of similar events shares one). `nox -s bench` reports the bytes per live block.

The field names come from the dialect (a generated `BlockShape`); this module knows none.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from .ratelimit import RateLimitedLog

logger = logging.getLogger("kvevents.publisher")

_INTERN_LIMIT = 4096
"""Distinct shared-field tuples kept for interning; past it the table starts afresh."""


@dataclass(frozen=True)
class BlockShape:
    """What a dialect's events look like, as far as the block set needs to know."""

    stored: str
    removed: str
    cleared: str
    """The event class names."""
    tier_fields: tuple[str, ...]
    """Fields of BlockRemoved besides its hashes, which BlockStored also has: a block is live
    per tier (e.g. medium GPU and CPU are two entries)."""
    shared_fields: tuple[str, ...]
    """Fields of BlockStored that are the same for every block of one event."""
    has_extra_keys: bool
    """Whether BlockStored carries one extra key per block (`extra_keys`)."""
    make_stored: Callable[[Any, list[Any], list[Any], list[Any] | None, tuple[Any, ...]], Any]
    """`(parent, hashes, token ids, extra keys or None, shared values)` to a BlockStored."""
    make_batch: Callable[[list[Any], int | None], Any]
    """`(events, rank)` to one batch of the dialect, stamped now."""


class BlockSet:
    """The live blocks of one publisher, keyed by tier, then by block hash in store order."""

    def __init__(self, shape: BlockShape) -> None:
        self.shape = shape
        self.tiers: dict[tuple[Any, ...], dict[Any, tuple[Any, ...]]] = {}
        self._intern: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.untracked = 0
        """Events that could not be applied (not one of the dialect's types, or malformed)."""
        self._log = RateLimitedLog(logger)
        fields = shape.tier_fields
        # attrgetter builds the tier key in C: vLLM publishes a removal per evicted block,
        # and a Python step per field of each one cost a busy publisher thread seconds.
        self._tier_of: Callable[[Any], tuple[Any, ...]]
        if len(fields) > 1:
            self._tier_of = attrgetter(*fields)
        elif fields:
            single = attrgetter(fields[0])
            self._tier_of = lambda event: (single(event),)
        else:
            self._tier_of = lambda event: ()

    def __len__(self) -> int:
        # list() copies the tiers atomically: counters() reads this from another thread.
        return sum(len(tier) for tier in list(self.tiers.values()))

    def apply(self, batch: Any) -> None:
        """Apply one published batch. Never raises: an event that cannot be read is counted."""
        shape = self.shape
        for event in getattr(batch, "events", ()):
            name = type(event).__name__
            try:
                if name == shape.stored:
                    self._store(event)
                elif name == shape.removed:
                    tier = self.tiers.get(self._tier(event))
                    if tier is not None:
                        for block_hash in event.block_hashes:
                            tier.pop(block_hash, None)
                elif name == shape.cleared:
                    self.tiers.clear()
                else:
                    raise TypeError(f"not a {shape.stored}, {shape.removed} or {shape.cleared}")
            except Exception as exc:
                self.untracked += 1
                self._log.warning("kvevents: event left out of the snapshot state: %s", exc)

    def _tier(self, event: Any) -> tuple[Any, ...]:
        try:
            return self._tier_of(event)
        except AttributeError:  # an event of another release, without every field
            return tuple(getattr(event, f, None) for f in self.shape.tier_fields)

    def _store(self, event: Any) -> None:
        shape = self.shape
        hashes = event.block_hashes
        count = len(hashes)
        if not count:
            return
        shared = tuple(getattr(event, f) for f in shape.shared_fields)
        try:
            shared = self._intern.setdefault(shared, shared)
        except TypeError:
            pass  # an unhashable field (e.g. lookahead lists): this event keeps its own
        if len(self._intern) > _INTERN_LIMIT:
            self._intern.clear()
        tokens = event.token_ids
        per_block = len(tokens) // count
        try:
            packed: Any = array("I", tokens).tobytes()
            width = 4 * per_block
        except (TypeError, OverflowError):
            packed = tuple(tokens)  # token pairs (bigram keys) stay as they are
            width = per_block
        extra_keys = event.extra_keys if shape.has_extra_keys else None
        tier = self.tiers.setdefault(self._tier(event), {})
        parent = event.parent_block_hash
        last = count - 1
        for i, block_hash in enumerate(hashes):
            # The last block takes whatever tokens are left, so the run's tokens rebuild exactly.
            part = packed[i * width :] if i == last else packed[i * width : (i + 1) * width]
            extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
            tier.pop(block_hash, None)  # a block stored again moves to the end of store order
            tier[block_hash] = (parent, part, extra, shared)
            parent = block_hash

    def freeze(self) -> Iterator[list[Any]]:
        """A copy of the set as it is now (one pass over it), rebuilt lazily: yields lists of
        BlockStored events of at most `MAX_BLOCKS_PER_BATCH` blocks each."""
        frozen = [list(tier.items()) for tier in self.tiers.values()]
        return _rebuild(self.shape, frozen)


MAX_BLOCKS_PER_BATCH = 1024
"""Blocks per snapshot batch: small enough that one batch never stalls live publishing."""


def _rebuild(
    shape: BlockShape, tiers: list[list[tuple[Any, tuple[Any, ...]]]]
) -> Iterator[list[Any]]:
    events: list[Any] = []
    blocks = 0
    for items in tiers:
        run: list[tuple[Any, tuple[Any, ...]]] = []
        for block_hash, entry in items:
            if run and (
                blocks >= MAX_BLOCKS_PER_BATCH
                or entry[0] != run[-1][0]
                or entry[3] is not run[-1][1][3]
            ):
                events.append(_stored_event(shape, run))
                run = []
                if blocks >= MAX_BLOCKS_PER_BATCH:
                    yield events
                    events, blocks = [], 0
            run.append((block_hash, entry))
            blocks += 1
        if run:
            events.append(_stored_event(shape, run))
    if events:
        yield events


def _stored_event(shape: BlockShape, run: list[tuple[Any, tuple[Any, ...]]]) -> Any:
    """One BlockStored for a chain of blocks stored by one event (or alike events)."""
    first = run[0][1]
    parts = [entry[1] for _, entry in run]
    if isinstance(first[1], bytes):
        tokens = array("I", b"".join(parts)).tolist()
    else:
        tokens = [token for part in parts for token in part]
    extras = [entry[2] for _, entry in run]
    extra_keys = extras if shape.has_extra_keys and any(e is not None for e in extras) else None
    return shape.make_stored(first[0], [h for h, _ in run], tokens, extra_keys, first[3])
