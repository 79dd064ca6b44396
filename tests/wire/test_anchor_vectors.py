"""The producers' own bytes, reproduced and decoded. The vectors are facts (payloads vLLM's and
SGLang's own structs emitted) copied into tests/data/ from shared/reference/anchor-vectors.json,
so the suite runs on a plain clone; where shared/ sits beside the checkout the copy must equal it."""

from __future__ import annotations

import importlib
import json
from typing import Any

import msgspec
import pytest

import kvevents
from tests.support import ROOT

ANCHORS = ROOT / "tests" / "data" / "anchor-vectors.json"
SHARED_ANCHORS = ROOT.parent / "shared" / "reference" / "anchor-vectors.json"
VECTORS = json.loads(ANCHORS.read_text())["vectors"]
CASES = [(d, name) for d, named in VECTORS.items() for name in named]


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def build(module: Any, wire: list[Any]) -> Any:
    """The producer's struct for a wire value, built as producer code builds it."""

    def event(e: Any) -> Any:
        if isinstance(e, dict):
            return getattr(module, e["type"])(**{k: v for k, v in e.items() if k != "type"})
        return getattr(module, e[0])(*e[1:])

    return module.KVEventBatch(wire[0], [event(e) for e in wire[1]], *wire[2:])


def test_every_dialect_has_anchor_vectors() -> None:
    assert set(VECTORS) == set(kvevents.DIALECTS)
    assert all(len(named) >= 3 for named in VECTORS.values())


def test_the_copied_vectors_equal_the_shared_reference() -> None:
    if not SHARED_ANCHORS.exists():
        pytest.skip(
            f"{SHARED_ANCHORS} is not beside this checkout: nothing to compare the copy with"
        )
    assert json.loads(SHARED_ANCHORS.read_text()) == json.loads(ANCHORS.read_text()), (
        f"the reference changed: copy {SHARED_ANCHORS} to {ANCHORS}"
    )


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_dialect_structs_reproduce_the_producer_bytes(dialect: str, name: str) -> None:
    vector = VECTORS[dialect][name]
    module = importlib.import_module(f"kvevents.{dialect}")
    batch = build(module, from_json(vector["wire"]))
    assert msgspec.msgpack.encode(batch).hex() == vector["hex"]


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_decode_then_encode_gives_the_same_bytes(dialect: str, name: str) -> None:
    payload = bytes.fromhex(VECTORS[dialect][name]["hex"])
    batch = kvevents.decode(payload)
    assert not batch.errors
    assert len(batch.events) == len(VECTORS[dialect][name]["wire"][1])
    assert kvevents.encode(batch, dialect) == payload


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_the_dialects_typed_structs_read_every_vector_and_write_it_back(
    dialect: str, name: str
) -> None:
    """Bigram (EAGLE) token pairs included: a consumer on the typed structs reads every payload
    its producer emits."""
    module = importlib.import_module(f"kvevents.{dialect}")
    payload = bytes.fromhex(VECTORS[dialect][name]["hex"])
    typed = msgspec.msgpack.Decoder(module.KVEventBatch).decode(payload)
    assert msgspec.msgpack.encode(typed) == payload
    tolerant = kvevents.decode(payload)
    assert [type(e).__name__ for e in typed.events] == [type(e).__name__ for e in tolerant.events]
    for ours, theirs in zip(typed.events, tolerant.events, strict=True):
        for field in ours.__struct_fields__:
            assert getattr(ours, field) == getattr(theirs, field), field
