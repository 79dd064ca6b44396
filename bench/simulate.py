"""`kvevents simulate` against NVIDIA Dynamo 1.6.1's own replay of the same trace (its mocker
and router, from the ai-dynamo-runtime wheel): the time each takes for the whole Mooncake
conversation trace (8 workers, 16-token blocks, 65,536 blocks each), and what each finds.

- offline (engines hand their batches to an in-memory index) against Dynamo's replay, both
  under KV routing: target at most 3× Dynamo's wall time;
- the socket mode (the real subscriber over loopback), all four policies, the CLI's run from
  start to end (trace loading included, the policies in one process per CPU): target 3
  minutes;
- per policy Dynamo has (round robin, KV), the TTFT and hit rate both report.

Skipped, with the reason, when the trace is not beside the checkout or the wheel cannot be
fetched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_conversation.jsonl"
FIGURES = ("prefix_hit_rate", "ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "wall_s")


def _row(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in FIGURES}


def measure(limit: int | None = None) -> dict[str, Any]:
    from kvevents_apps import simdynamo
    from kvevents_apps import simulate as sim

    from . import dynamo
    from .references import ReferenceUnavailable

    if not TRACE.is_file():
        return {"skipped": f"the Mooncake trace is not at {TRACE}"}
    try:
        dynamo_path = str(dynamo.path())
    except ReferenceUnavailable as exc:
        return {"skipped": f"Dynamo 1.6.1 cannot be fetched: {exc}"}
    requests = list(sim.mooncake(TRACE, limit))
    out: dict[str, Any] = {"requests": len(requests), "dynamo": {}, "offline": {}, "socket": {}}
    options = sim.Options(workers=8, progress=False, offline=True)
    for policy in ("round_robin", "kv"):
        theirs = simdynamo.replay(TRACE, policy, options, limit, dynamo_path)
        out["dynamo"][policy] = _row(theirs)
        print(f"bench: simulate: Dynamo {policy} {theirs['wall_s']:.1f} s", file=sys.stderr)
    for policy in ("round_robin", "kv"):
        ours = asyncio.run(sim.Simulation(policy, requests, options).run())
        out["offline"][policy] = _row(ours)
        print(f"bench: simulate: offline {policy} {ours['wall_s']:.1f} s", file=sys.stderr)
    # The socket mode as a user runs it: the CLI in a process of its own (trace loading
    # included), its policies in as many forked processes as there are CPUs.
    jobs = os.cpu_count() or 1
    command = [sys.executable, "-m", "kvevents_apps.cli", "simulate", "--trace", str(TRACE)]
    command += ["--workers", "8", "--jobs", str(jobs), "--json"]
    command += ["--limit", str(limit)] if limit else []
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    out["socket_four_policies_s"] = time.monotonic() - started
    out["socket_jobs"] = jobs
    if done.returncode != 0:
        raise RuntimeError(f"kvevents simulate failed: {done.stderr.strip()[-2000:]}")
    for ours in json.loads(done.stdout):
        out["socket"][ours["policy"]] = {**_row(ours), "mismatches": ours["mismatches"]}
        print(f"bench: simulate: socket {ours['policy']} {ours['wall_s']:.1f} s", file=sys.stderr)
    print(
        f"bench: simulate: socket, four policies in {jobs} processes: "
        f"{out['socket_four_policies_s']:.1f} s",
        file=sys.stderr,
    )
    return out
