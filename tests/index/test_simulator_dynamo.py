"""`kvevents simulate` tracks NVIDIA Dynamo's own replay (ai-dynamo-runtime 1.6.1's mocker and
router, fetched at test time) on a slice of the Mooncake conversation trace: mean TTFT within
10% and prefix hit rate within 0.02, for round robin and KV routing at 4, 8 and 16 workers
(offline), for KV routing at overlap weights 0, 0.5 and 2 (8 workers), and for KV routing
through the real sockets at 8. Skipped, with the reason, when
the wheel cannot be fetched or the trace is not beside the checkout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvevents_apps import simdynamo
from kvevents_apps import simulate as sim

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation.jsonl"
SLICE = 1000

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dynamo_path() -> str:
    from bench import dynamo
    from bench.references import ReferenceUnavailable

    if not TRACE.is_file():
        pytest.skip(f"the Mooncake trace is not at {TRACE} (../shared beside the checkout)")
    try:
        return str(dynamo.path())
    except ReferenceUnavailable as exc:
        pytest.skip(f"Dynamo 1.6.1 cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def requests() -> list[sim.Request]:
    return list(sim.mooncake(TRACE, SLICE))


@pytest.mark.parametrize("workers", [4, 8, 16])
@pytest.mark.parametrize("policy", ["round_robin", "kv"])
def test_the_simulator_tracks_dynamos_replay(
    dynamo_path: str, requests: list[sim.Request], policy: str, workers: int
) -> None:
    options = sim.Options(workers=workers, progress=False, offline=True)
    ours = asyncio.run(sim.Simulation(policy, requests, options).run())
    theirs = simdynamo.replay(TRACE, policy, options, limit=SLICE, dynamo_path=dynamo_path)
    assert ours["requests"] == theirs["requests"] == SLICE
    assert ours["mismatches"] == 0
    ratio = ours["ttft_mean_ms"] / theirs["ttft_mean_ms"]
    assert abs(ratio - 1) <= 0.10, (ours["ttft_mean_ms"], theirs["ttft_mean_ms"])
    assert abs(ours["prefix_hit_rate"] - theirs["prefix_hit_rate"]) <= 0.02


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_the_kv_router_tracks_dynamos_at_other_overlap_weights(
    dynamo_path: str, requests: list[sim.Request], weight: float
) -> None:
    options = sim.Options(workers=8, progress=False, offline=True, overlap_weight=weight)
    ours = asyncio.run(sim.Simulation("kv", requests, options).run())
    theirs = simdynamo.replay(TRACE, "kv", options, limit=SLICE, dynamo_path=dynamo_path)
    assert abs(ours["ttft_mean_ms"] / theirs["ttft_mean_ms"] - 1) <= 0.10
    assert abs(ours["prefix_hit_rate"] - theirs["prefix_hit_rate"]) <= 0.02


def test_kv_routing_through_the_sockets_tracks_dynamos_replay(
    dynamo_path: str, requests: list[sim.Request]
) -> None:
    options = sim.Options(workers=8, progress=False)
    ours = asyncio.run(sim.Simulation("kv", requests, options).run())
    theirs = simdynamo.replay(TRACE, "kv", options, limit=SLICE, dynamo_path=dynamo_path)
    assert ours["mismatches"] == 0 and ours["caught_up"]
    assert abs(ours["ttft_mean_ms"] / theirs["ttft_mean_ms"] - 1) <= 0.10
    assert abs(ours["prefix_hit_rate"] - theirs["prefix_hit_rate"]) <= 0.02


def test_a_relative_trace_path_is_found(dynamo_path: str, monkeypatch) -> None:
    monkeypatch.chdir(TRACE.parent)
    options = sim.Options(workers=2)
    theirs = simdynamo.replay(Path(TRACE.name), "round_robin", options, 20, dynamo_path)
    assert theirs["requests"] == 20


def test_a_missing_dynamo_is_a_clear_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 32, "output_length": 2, "hash_ids": [1]}\n')
    with pytest.raises(simdynamo.DynamoUnavailable, match="ai-dynamo-runtime"):
        simdynamo.replay(trace, "kv", sim.Options(workers=2), dynamo_path=str(tmp_path))
