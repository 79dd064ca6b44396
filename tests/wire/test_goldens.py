"""Golden vectors: language-neutral JSON, compared with what the code builds now."""

from __future__ import annotations

import json

import pytest

import kvevents
from tests.support import GOLDENS
from tests.wire.goldens_cases import build

UPDATE = "pytest tests/wire/test_goldens.py --update-goldens   (or: nox -s update_goldens)"
BUILT = build()


def test_goldens_match_the_code(update_goldens: bool) -> None:
    if update_goldens:
        for stale in GOLDENS.rglob("*.json"):
            stale.unlink()
        for name, text in BUILT.items():
            path = GOLDENS / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return
    on_disk = {
        str(p.relative_to(GOLDENS)): p.read_text(encoding="utf-8") for p in GOLDENS.rglob("*.json")
    }
    missing = sorted(set(BUILT) - set(on_disk))
    extra = sorted(set(on_disk) - set(BUILT))
    changed = sorted(n for n in set(BUILT) & set(on_disk) if BUILT[n] != on_disk[n])
    assert not (missing or extra or changed), (
        f"goldens differ from the code: missing={missing} extra={extra} changed={changed}\n"
        f"If the change is intended, review it and run: {UPDATE}"
    )


@pytest.mark.parametrize("name", sorted(n for n in BUILT if n.startswith("rejects/")))
def test_reject_vectors_have_their_outcome(name: str) -> None:
    case = json.loads(BUILT[name])
    payload = bytes.fromhex(case["hex"])
    expect = case["expect"]
    if expect["outcome"] == "error":
        with pytest.raises(kvevents.DecodeError):
            kvevents.decode(payload)
        return
    batch = kvevents.decode(payload)
    assert len(batch.events) == expect["events"]
    assert [e.index for e in batch.errors] == expect["error_indexes"]
    assert all(e.reason for e in batch.errors)


@pytest.mark.parametrize("name", sorted(n for n in BUILT if n.startswith("decode/")))
def test_tolerant_decode_vectors(name: str) -> None:
    case = json.loads(BUILT[name])
    batch = kvevents.decode(bytes.fromhex(case["hex"]))
    assert not batch.errors
    assert len(batch.events) == len(case["wire"][1])
