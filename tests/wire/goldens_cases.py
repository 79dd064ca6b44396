"""Builds the language-neutral golden vectors from the current code.

Written to tests/goldens/ only by `pytest --update-goldens` (nox -s update_goldens); the
test suite compares what this module builds with the checked-in files. One file per case:
- cases/<name>.json: a canonical batch, and per dialect its wire form (plain msgpack
  values, bytes as {"$bytes": hex}) and exact msgpack hex.
- decode/<name>.json: payloads any producer may send, with the canonical value they decode to.
- rejects/<name>.json: bad payloads with the expected outcome ("error": no batch;
  "partial": the good events kept and the bad ones listed by index).
- frames/<name>.json: ZeroMQ frame lists as hex.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

import kvevents
from kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, frames


def plain(value: Any) -> Any:
    """JSON form of decoded msgpack values: bytes become {"$bytes": hex}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def canonical_json(batch: KVEventBatch) -> Any:
    return plain(msgspec.to_builtins(batch, builtin_types=(bytes,)))


def _stored(**kw: Any) -> BlockStored:
    base: dict[str, Any] = {"block_hashes": [1, 2], "token_ids": [1, 2, 3, 4], "block_size": 2}
    base.update(kw)
    return BlockStored(**base)


CASES: dict[str, KVEventBatch] = {
    "stored_basic": KVEventBatch(ts=1.5, events=[_stored()], dp_rank=0),
    "stored_dp_none": KVEventBatch(ts=1.5, events=[_stored()], dp_rank=None),
    "stored_u64_boundaries": KVEventBatch(
        ts=1.5,
        events=[
            _stored(
                block_hashes=[0, 2**63 - 1, 2**63, 2**64 - 1],
                parent_block_hash=7,
                token_ids=list(range(8)),
            )
        ],
        dp_rank=1,
    ),
    "stored_negative_i64": KVEventBatch(
        ts=1.5,
        events=[_stored(block_hashes=[-4123456789012345678, -1], parent_block_hash=-(2**63))],
        dp_rank=0,
    ),
    "stored_bytes_hash": KVEventBatch(
        ts=1.5,
        events=[
            _stored(block_hashes=[b"\x01\x02", bytes(range(8))], parent_block_hash=b"\xff" * 8)
        ],
        dp_rank=0,
    ),
    "stored_bigram_tokens": KVEventBatch(
        ts=1.5, events=[_stored(block_hashes=[1], token_ids=[(1, 2), (2, 3)])], dp_rank=0
    ),
    "stored_every_field": KVEventBatch(
        ts=1.5,
        events=[
            _stored(
                parent_block_hash=9,
                lora_id=3,
                medium="GPU",
                lora_name="my-lora",
                extra_keys=[("my-lora", ("mm-hash", 0), "salt"), None],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
                kv_cache_spec_sliding_window=128,
                locality="LOCAL",
                ownership="kvcr",
                session_id="s1",
                lookahead_token_ids=[[5], [6]],
                cache_salt="tenant-a",
            )
        ],
        dp_rank=0,
    ),
    "removed_every_field": KVEventBatch(
        ts=1.5,
        events=[
            BlockRemoved(
                block_hashes=[1, 2], medium="CPU", group_idx=1, locality="REMOTE", ownership="kvcr"
            )
        ],
        dp_rank=0,
    ),
    "cleared": KVEventBatch(ts=1.5, events=[AllBlocksCleared()], dp_rank=None),
    "mixed": KVEventBatch(
        ts=1700000000.25,
        events=[_stored(), BlockRemoved(block_hashes=[2], medium="GPU"), AllBlocksCleared()],
        dp_rank=3,
    ),
    "empty_events": KVEventBatch(ts=1.5, events=[], dp_rank=0),
}

_STORED_MAP = {
    "type": "BlockStored",
    "block_hashes": [1, 2],
    "parent_block_hash": None,
    "token_ids": [1, 2, 3, 4],
    "block_size": 2,
    "lora_id": None,
}

DECODE: dict[str, Any] = {
    "two_element_batch": [1.5, [_STORED_MAP]],
    "extra_batch_elements": [1.5, [_STORED_MAP], 0, "future", 7],
    "unknown_map_keys": [
        1.5,
        [{**_STORED_MAP, "future_field": {"nested": [1]}, "block_mm_infos": None}],
        0,
    ],
    "keys_in_another_order": [
        1.5,
        [
            {
                "block_size": 2,
                "token_ids": [1, 2, 3, 4],
                "type": "BlockStored",
                "block_hashes": [1, 2],
            }
        ],
        0,
    ],
    "positional_tail": [
        1.5,
        [
            [
                "BlockStored",
                [1, 2],
                None,
                [1, 2, 3, 4],
                2,
                None,
                "GPU",
                "lora",
                None,
                1,
                "sliding_window",
                64,
                "x",
                "y",
            ]
        ],
        0,
    ],
    "positional_extra_elements": [
        1.5,
        [["BlockRemoved", [1], "GPU", None, None, None, "future"]],
        0,
    ],
    "integer_ts": [2, [["AllBlocksCleared"]], None],
}

INFO = frames.PublisherInfo(
    instance=bytes(range(16)),
    next_seq=12,
    oldest_seq=2,
    topic="kv",
    dialect="vllm",
    schema_version="0.2.0",
)

REJECTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "unknown_tag_beside_good": (
        [1.5, [{"type": "Bogus", "x": 1}, _STORED_MAP], 0],
        {"outcome": "partial", "events": 1, "error_indexes": [0]},
    ),
    "map_encoded_batch": ({"ts": 1.5, "events": [], "dp_rank": 0}, {"outcome": "error"}),
    "token_id_over_u32": (
        [1.5, [{**_STORED_MAP, "token_ids": [2**32]}], 0],
        {"outcome": "partial", "events": 0, "error_indexes": [0]},
    ),
    "missing_block_size": (
        [1.5, [{k: v for k, v in _STORED_MAP.items() if k != "block_size"}], 0],
        {"outcome": "partial", "events": 0, "error_indexes": [0]},
    ),
    "bad_event_between_good": (
        [
            1.5,
            [
                _STORED_MAP,
                {"type": "BlockStored", "token_ids": [1], "block_size": 1},
                ["BlockRemoved", [2]],
            ],
            0,
        ],
        {"outcome": "partial", "events": 2, "error_indexes": [1]},
    ),
    "event_not_map_or_array": (
        [1.5, [7, ["AllBlocksCleared"]], 0],
        {"outcome": "partial", "events": 1, "error_indexes": [0]},
    ),
    "bytes_hash_too_long": (
        [1.5, [{**_STORED_MAP, "block_hashes": [b"\x00" * 65]}], 0],
        {"outcome": "partial", "events": 0, "error_indexes": [0]},
    ),
    "not_an_array": ("hello", {"outcome": "error"}),
    "missing_events": ([1.5], {"outcome": "error"}),
}
RAW_REJECTS: dict[str, tuple[bytes, dict[str, Any]]] = {
    "truncated_payload": (
        bytes.fromhex("93cb3ff800000000000091de0008a474797065"),
        {"outcome": "error"},
    ),
    "huge_declared_array": (bytes.fromhex("93cb3ff8000000000000ddffffffff"), {"outcome": "error"}),
    "deep_nesting": (
        bytes.fromhex("93cb3ff8000000000000") + b"\x91" * 5000 + b"\xc0",
        {"outcome": "error"},
    ),
    "invalid_utf8_string": (
        bytes.fromhex(
            "93cb3ff80000000000009182a474797065ac426c6f636b52656d6f766564a66d656469756da2fffe00"
        ),
        {"outcome": "partial", "events": 0, "error_indexes": [0]},
    ),
    "empty_payload": (b"", {"outcome": "error"}),
}


def _payload(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def _dump(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def build() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, batch in CASES.items():
        dialects = {}
        for dialect in kvevents.DIALECTS:
            payload = kvevents.encode(batch, dialect)
            dialects[dialect] = {
                "wire": plain(msgspec.msgpack.decode(payload)),
                "hex": payload.hex(),
                "decodes_to": canonical_json(kvevents.decode(payload)),
                "dropped_fields": {
                    k: list(v) for k, v in kvevents.DROPPED_FIELDS[dialect].items() if v
                },
            }
        out[f"cases/{name}.json"] = _dump(
            {"canonical": canonical_json(batch), "dialects": dialects}
        )
    for name, wire in DECODE.items():
        payload = _payload(wire)
        out[f"decode/{name}.json"] = _dump(
            {
                "wire": plain(wire),
                "hex": payload.hex(),
                "decodes_to": canonical_json(kvevents.decode(payload)),
            }
        )
    rejects = {name: (_payload(wire), expect) for name, (wire, expect) in REJECTS.items()}
    rejects.update(RAW_REJECTS)
    for name, (payload, expect) in rejects.items():
        out[f"rejects/{name}.json"] = _dump({"hex": payload.hex(), "expect": expect})
    payload = kvevents.encode(CASES["stored_basic"], "vllm")
    seq2 = frames.seq_bytes(2)
    frame_cases = {
        "live": {"frames": frames.pack_live_batch(b"kv", seq2, payload)},
        "replay_request_dealer": {"frames": frames.pack_replay_request(10)},
        "replay_reply_with_topic": {
            "frames": frames.pack_replay_reply_with_topic(b"id", b"kv", seq2, payload),
            "as_router_sends": True,
        },
        "replay_end_with_topic": {
            "frames": frames.pack_replay_end_with_topic(b"id"),
            "as_router_sends": True,
        },
        "replay_reply_without_topic": {
            "frames": frames.pack_replay_reply_without_topic(b"id", seq2, payload),
            "as_router_sends": True,
        },
        "replay_end_without_topic": {
            "frames": frames.pack_replay_end_without_topic(b"id"),
            "as_router_sends": True,
        },
        "info_request_dealer": {"frames": frames.pack_info_request()},
        "replay_request_with_info_dealer": {"frames": frames.pack_replay_request_with_info(10)},
        "info_reply_with_topic": {
            "frames": frames.pack_info_reply_with_topic(b"id", b"kv", frames.encode_info(INFO)),
            "as_router_sends": True,
        },
        "info_reply_without_topic": {
            "frames": frames.pack_info_reply_without_topic(b"id", frames.encode_info(INFO)),
            "as_router_sends": True,
        },
        "snapshot_request_dealer": {"frames": frames.pack_snapshot_request(0)},
        "snapshot_info_reply_with_topic": {
            "frames": frames.pack_info_reply_with_topic(
                b"id", b"kv", frames.encode_info(msgspec.structs.replace(INFO, snapshots=True))
            ),
            "as_router_sends": True,
        },
    }
    for name, case in frame_cases.items():
        case["frames"] = [f.hex() for f in case["frames"]]
        out[f"frames/{name}.json"] = _dump(case)
    out["frames/start_seq_rules.json"] = _dump(
        {
            "rule": "empty is 0; up to 8 bytes big-endian; longer is invalid",
            "vectors": [
                {"hex": "", "start": 0},
                {"hex": "0004", "start": 4},
                {"hex": "000000000000000a", "start": 10},
                {"hex": "000000000000000000", "start": None},
            ],
        }
    )
    return dict(sorted(out.items()))
