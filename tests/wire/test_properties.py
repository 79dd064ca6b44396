"""Random canonical batches survive every dialect, up to the fields the dialect cannot carry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import kvevents
from kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

u64 = st.integers(min_value=0, max_value=2**64 - 1)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
hashes = st.one_of(u64, i64, st.binary(min_size=1, max_size=64))
token = st.integers(min_value=0, max_value=2**32 - 1)
text = st.one_of(st.none(), st.text(max_size=8))
opt_int = st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31))

stored = st.builds(
    BlockStored,
    block_hashes=st.lists(hashes, max_size=4),
    token_ids=st.one_of(st.lists(token, max_size=8), st.lists(st.tuples(token, token), max_size=4)),
    block_size=st.integers(min_value=0, max_value=2**32 - 1),
    parent_block_hash=st.one_of(st.none(), hashes),
    lora_id=opt_int,
    medium=text,
    lora_name=text,
    extra_keys=st.one_of(
        st.none(),
        st.lists(
            st.one_of(st.none(), st.tuples(st.text(max_size=4), st.integers(0, 9))), max_size=3
        ),
    ),
    group_idx=opt_int,
    kv_cache_spec_kind=text,
    kv_cache_spec_sliding_window=opt_int,
    locality=text,
    ownership=text,
    session_id=text,
    lookahead_token_ids=st.one_of(st.none(), st.lists(st.lists(token, max_size=3), max_size=3)),
    cache_salt=text,
)
removed = st.builds(
    BlockRemoved,
    block_hashes=st.lists(hashes, max_size=4),
    medium=text,
    group_idx=opt_int,
    locality=text,
    ownership=text,
)
events = st.lists(st.one_of(stored, removed, st.just(AllBlocksCleared())), max_size=5)
batches = st.builds(
    KVEventBatch,
    ts=st.floats(allow_nan=False),
    events=events,
    dp_rank=st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(batch=batches, dialect=st.sampled_from(kvevents.DIALECTS))
def test_encode_decode_round_trip_up_to_what_the_dialect_carries(
    batch: KVEventBatch, dialect: str
) -> None:
    decoded = kvevents.decode(kvevents.encode(batch, dialect))
    assert not decoded.errors
    assert decoded == kvevents.project(batch, dialect)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_the_typed_error(payload: bytes) -> None:
    try:
        batch = kvevents.decode(payload)
    except kvevents.DecodeError:
        return
    assert isinstance(batch, KVEventBatch)


def test_a_map_event_without_its_tag_is_an_error_not_a_guess() -> None:
    """With bigram token pairs a BlockStored's fields fit only the split-union alternative;
    without a "type" key the event is reported, never taken for a BlockStored."""
    import msgspec

    fields = {
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [[1, 2], [3, 4]],
        "block_size": 2,
    }
    batch = kvevents.decode(
        msgspec.msgpack.encode([1.0, [fields, {**fields, "type": "BlockStored"}], None])
    )
    assert [type(e).__name__ for e in batch.events] == ["BlockStored"]
    assert batch.events[0].token_ids == [(1, 2), (3, 4)]
    assert [e.index for e in batch.errors] == [0] and "type" in batch.errors[0].reason
