"""The simulator's engine and router model (kvevents_apps.simsched, .simroute), without sockets.

- A burst of long prompts on one worker is prefilled in chunks under the pass's token budget,
  first come first served, so their first tokens come one after another (the old model
  charged the whole burst's quadratic prefill to each of them).
- The fast path (an unchanged decode batch's passes taken together) equals the reference that
  runs one pass per step, over random workloads, and every pass keeps the budgets.
- The router's incremental books equal a recomputation from the requests outstanding.
- Offline, the index is exact at every decision, so `kv` routes as `oracle` does; and the
  socket mode runs the same engine model (round robin, which never reads the index, gives
  the same figures both ways). Through the sockets `kv` waits until the index holds every
  published batch, so it gives the offline figures too; a wait that runs out is counted and
  logged, and `event_lag` never waits.
- Policies run in forked processes give what they give one after another in this process,
  in the order asked; a run that fails in its process is an error with its traceback.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import multiprocessing
import re
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvevents.mock import MockEngine, TimingModel, chained_hashes
from kvevents_apps import simulate as sim
from kvevents_apps.simroute import DynamoCost
from kvevents_apps.simsched import Budgets, Job, WorkerScheduler

BLOCK = 16


def _engine(capacity: int = 4096) -> object:
    return MockEngine("vllm", capacity_blocks=capacity, block_size=BLOCK, publish=False)


def _job(ident: int, arrival: float, tokens: list[int], output: int) -> Job:
    return Job(ident, arrival, tokens, chained_hashes(tokens, BLOCK), output)


def drive(scheduler: WorkerScheduler, jobs: list[Job]) -> tuple[dict[int, float], list]:
    """One worker in simulated time, as `Simulation` runs it: arrivals, then passes that start
    before the next arrival. Returns first-token times and every pass result with its start."""
    pending = sorted(jobs, key=lambda j: (j.arrival_ms, j.ident))
    first: dict[int, float] = {}
    passes = []
    steps: list[float] = []
    arrived = 0
    while arrived < len(pending) or steps:
        arrival = pending[arrived].arrival_ms if arrived < len(pending) else float("inf")
        if steps and steps[0] < arrival:
            now = heapq.heappop(steps)
            result = scheduler.step(now, arrival)
            if result is not None:
                passes.append((now, result))
                for job in result.first_tokens:
                    assert job.ident not in first, "a second first token"
                    first[job.ident] = now + result.length_ms
                heapq.heappush(steps, now + result.length_ms)
            continue
        scheduler.add(pending[arrived])
        arrived += 1
        if not steps:
            heapq.heappush(steps, arrival)
    return first, passes


def test_a_burst_of_long_prompts_is_chunked_and_staggered() -> None:
    timing = TimingModel()
    scheduler = WorkerScheduler(_engine(), BLOCK, timing, Budgets())
    jobs = [_job(n, 0.0, list(range(n * 20_000, n * 20_000 + 12_000)), 4) for n in range(4)]
    first, passes = drive(scheduler, jobs)
    assert all(result.prefill_tokens <= 8192 for _, result in passes)
    times = [first[n] for n in range(4)]
    assert times == sorted(times) and len(set(times)) == 4, f"not staggered: {times}"
    # FCFS in 8,192-token chunks: the first prompt is done in the second pass, the fourth in
    # the sixth (48,000 tokens); a prefill-only pass takes the prefill time alone.
    full = timing.prefill_ms(8192)
    assert times[0] == full + full  # 8,192 of it, then 3,808 with 4,384 of the second
    assert times[3] > 5 * full
    assert times[0] < timing.prefill_ms(48_000) / 4, "the burst's whole prefill charged"


@settings(max_examples=150, deadline=None)
@given(
    workload=st.lists(
        st.tuples(
            st.floats(0, 400),  # arrival ms
            st.integers(0, 5),  # shared prefix (one of six)
            st.integers(1, 300),  # own tokens
            st.integers(1, 40),  # output tokens
        ),
        min_size=1,
        max_size=25,
    ),
    budget=st.integers(16, 600),
    seqs=st.integers(1, 6),
    capacity=st.integers(40, 200),
)
def test_the_fast_path_equals_one_pass_per_step(
    workload: list[tuple[float, int, int, int]], budget: int, seqs: int, capacity: int
) -> None:
    def jobs() -> list[Job]:
        out = []
        for n, (arrival, prefix, own, output) in enumerate(workload):
            tokens = [prefix * 1000 + t for t in range(64)] + [
                10**6 + n * 1000 + t for t in range(own)
            ]
            out.append(_job(n, arrival, tokens, output))
        return out

    results = {}
    for fast in (True, False):
        scheduler = WorkerScheduler(
            _engine(capacity), BLOCK, TimingModel(), Budgets(budget, seqs), fast_forward=fast
        )
        first, passes = drive(scheduler, jobs())
        for _, result in passes:
            assert result.prefill_tokens <= budget
            assert result.scheduled <= seqs
        finished = Counter(j.ident for _, r in passes for j in r.finished)
        assert finished == Counter(range(len(workload))), "not every request finished once"
        assert set(first) == set(range(len(workload)))
        for n, (arrival, *_rest) in enumerate(workload):
            assert first[n] > arrival
        results[fast] = first
    for n, at in results[False].items():
        assert abs(results[True][n] - at) <= 1e-6 * max(1.0, at), (n, results[True][n], at)


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["route", "first", "finish"]),
            st.integers(0, 2),  # worker
            st.integers(0, 3),  # shared prefix
            st.integers(1, 6),  # own blocks
            st.integers(0, 8),  # overlap blocks
        ),
        max_size=60,
    ),
    weight=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_the_routers_books_equal_a_recomputation(ops: list[tuple], weight: float) -> None:
    router = DynamoCost(3, BLOCK, weight, seed=0)
    outstanding: dict[int, tuple[int, list[int], int, bool]] = {}
    """request -> (worker, hashes, uncached tokens, prefilled)"""
    for number, (kind, worker, prefix, own, overlap) in enumerate(ops):
        hashes = [prefix * 100 + b for b in range(3)] + [
            10_000 + number * 100 + b for b in range(own)
        ]
        tokens = len(hashes) * BLOCK
        if kind == "route":
            router.routed(number, worker, hashes, tokens, overlap)
            outstanding[number] = (worker, hashes, max(0, tokens - overlap * BLOCK), False)
        elif outstanding:
            request = sorted(outstanding)[number % len(outstanding)]
            held_by = outstanding[request][0]
            if kind == "first":
                router.first_token(request, held_by)
                w, h, t, _ = outstanding[request]
                outstanding[request] = (w, h, t, True)
            else:
                router.finished(request, held_by)
                del outstanding[request]
        for w in range(3):
            active = {h for r in outstanding.values() if r[0] == w for h in r[1]}
            prefill = sum(r[2] for r in outstanding.values() if r[0] == w and not r[3])
            assert set(router.loads[w].blocks) == active
            assert router.loads[w].prefill_tokens == prefill
            probe = [prefix * 100 + b for b in range(3)] + [99_999]
            expected = weight * (max(0, len(probe) * BLOCK - overlap * BLOCK) + prefill) / BLOCK
            expected += len(set(probe) - active) + len(active)
            assert abs(router.cost(w, set(probe), len(probe) * BLOCK, overlap) - expected) < 1e-9


def _workload() -> list[sim.Request]:
    return list(
        sim.synthetic(
            requests=120,
            seed=11,
            prompts=3,
            prompt_tokens=256,
            conversations=10,
            turn_tokens=64,
            output_tokens=8,
            rate_per_s=40.0,
        )
    )


def _figures(result: dict) -> tuple:
    return (
        result["prefix_hit_rate"],
        result["prefill_tokens"],
        result["ttft_mean_ms"],
        result["ttft_p99_ms"],
        result["wait_mean_ms"],
        result["requests_per_pass"],
        result["requests"],
    )


def test_offline_kv_routes_as_the_oracle_does() -> None:
    requests = _workload()
    options = sim.Options(workers=3, capacity_blocks=256, progress=False, offline=True)
    kv = asyncio.run(sim.Simulation("kv", requests, options).run())
    oracle = asyncio.run(sim.Simulation("oracle", requests, options).run())
    assert kv["mismatches"] == 0 and kv["caught_up"]
    assert kv["prefix_hit_rate"] > 0
    assert _figures(kv) == _figures(oracle)


@pytest.mark.parametrize("policy", ["round_robin", "kv"])
def test_the_socket_mode_gives_the_offline_figures(policy: str) -> None:
    # Round robin never reads the index: the same engine model gives the same figures. `kv`
    # waits until the index holds every published batch, so the sockets change nothing it
    # sees either.
    requests = _workload()
    figures = []
    for offline in (True, False):
        options = sim.Options(workers=3, capacity_blocks=256, progress=False, offline=offline)
        result = asyncio.run(sim.Simulation(policy, requests, options).run())
        assert result["mismatches"] == 0 and result["caught_up"], result["behind"]
        assert result["late_routes"] == 0
        figures.append(_figures(result))
    assert figures[0] == figures[1]


def test_a_wait_for_the_index_that_runs_out_is_counted_and_logged(caplog) -> None:
    requests = _workload()
    options = sim.Options(workers=3, capacity_blocks=256, progress=False, route_wait_s=0.0)
    with caplog.at_level("WARNING", logger="kvevents_apps.simulate"):
        result = asyncio.run(sim.Simulation("kv", requests, options).run())
    assert result["late_routes"] > 0
    logged = [r for r in caplog.records if "without the index holding" in r.getMessage()]
    assert len(logged) == result["late_routes"]
    assert result["mismatches"] == 0 and result["caught_up"]  # the end check still waits


def test_with_event_lag_kv_never_waits() -> None:
    options = sim.Options(
        workers=3, capacity_blocks=256, progress=False, route_wait_s=0.0, event_lag=True
    )
    result = asyncio.run(sim.Simulation("kv", _workload(), options).run())
    assert result["late_routes"] == 0
    assert result["mismatches"] == 0 and result["caught_up"]


_FRESH = """
import json
from kvevents_apps import simulate as sim
assert sim.can_fork(), "a fresh interpreter has one thread and fork"
requests = list(sim.synthetic(requests=120, seed=11, prompts=3, prompt_tokens=256,
    conversations=10, turn_tokens=64, output_tokens=8, rate_per_s=40.0))
options = sim.Options(workers=WORKERS, capacity_blocks=256, progress=False, offline=True)
policies = POLICIES
try:
    out = {name: sim.run_policies(policies, requests, options, jobs=jobs)
           for name, jobs in (("together", 3), ("alone", 1))}
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""
"""Run in an interpreter of its own: this one has threads left by other tests, and forks
only from a process with none (`sim.can_fork`)."""


def _fresh(workers: int, policies: list[str]) -> dict:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform: policies run one after another")
    code = _FRESH.replace("WORKERS", str(workers)).replace("POLICIES", repr(policies))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_policies_in_processes_equal_policies_one_after_another() -> None:
    policies = ["oracle", "round_robin", "kv", "random"]
    out = _fresh(3, policies)
    assert [r["policy"] for r in out["together"]] == policies
    assert [_figures(r) for r in out["together"]] == [_figures(r) for r in out["alone"]]
    assert all(r["mismatches"] == 0 and r["caught_up"] for r in out["together"])
    assert out["together"][0]["prefix_hit_rate"] > 0


def test_a_policy_that_fails_in_its_process_is_an_error_with_its_traceback() -> None:
    out = _fresh(0, ["round_robin", "kv"])
    assert out["error"] == "SimulationError"
    assert re.search(
        # Both runs fail; whichever process reports first is the error.
        r"(?s)the (round_robin|kv) run failed \(process \d+, exit code 0\).*"
        r"ValueError: workers must be at least 1",
        out["message"],
    ), out["message"]


@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.integers(0, 2**23 - 2), min_size=1, max_size=4), st.integers(1, 2100)
        ),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=50, deadline=None)
def test_a_trace_row_becomes_its_hash_ids_tokens_cut_to_its_length(tmp_path_factory, rows) -> None:
    trace = tmp_path_factory.mktemp("trace") / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 0, "input_length": n, "output_length": 1, "hash_ids": ids})
            + "\n"
            for ids, n in rows
        )
    )
    for request, (ids, n) in zip(sim.mooncake(trace), rows, strict=True):
        expected = [h * sim.TRACE_BLOCK + 1 + i for h in ids for i in range(sim.TRACE_BLOCK)]
        assert list(request.tokens) == expected[:n]


def test_a_hash_id_whose_tokens_pass_32_bits_is_a_trace_error(tmp_path) -> None:
    trace = tmp_path / "t.jsonl"
    row = {"timestamp": 0, "input_length": 16, "output_length": 1, "hash_ids": [2**23]}
    trace.write_text(json.dumps(row) + "\n")
    with pytest.raises(sim.TraceError, match="beyond 32 bits"):
        list(sim.mooncake(trace))
