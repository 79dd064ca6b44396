"""NVIDIA Dynamo's own offline replay of a Mooncake trace (its mocker engines and its router),
run beside `kvevents simulate` with the same engine shape, to compare the two models.

Dynamo is not a dependency: its `dynamo._core` must be importable from the running
interpreter, or from a folder given as `dynamo_path` (or KVEVENTS_DYNAMO_PATH), such as the
`ai-dynamo-runtime==1.6.1` wheel unpacked (its compiled core needs none of the wheel's
dependencies for the replay). It runs in a child process, so its runtime and its logging stay
out of ours and a crash of it is an error here, not the end of the simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .simulate import TRACE_BLOCK, Options, ms_text

MODES = {"round_robin": "round_robin", "kv": "kv_router"}
"""Our policies that Dynamo's replay has (it routes only round robin or by its KV router)."""

_REPLAY = """
import json, sys
from dynamo._core import KvRouterConfig, run_mocker_trace_replay
args = json.loads(sys.argv[1])
router = KvRouterConfig(overlap_score_weight=args["overlap_weight"])
summary = run_mocker_trace_replay(
    [args["trace"]],
    extra_engine_args={"engine": args["engine"]},
    num_workers=args["workers"],
    router_mode=args["mode"],
    router_config=router,
    trace_block_size=args["trace_block"],
    trace_format="mooncake",
).summary
print(json.dumps(dict(summary)))
"""


class DynamoUnavailable(RuntimeError):
    """Dynamo's replay cannot be run here (not importable, or it failed); says why."""


def replay(
    trace: Path,
    policy: str,
    options: Options,
    limit: int | None = None,
    dynamo_path: str | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Dynamo's replay of the first `limit` requests of `trace` under `policy`, as a result
    row with our keys (`prefix_hit_rate`, `ttft_mean_ms`, ...)."""
    if policy not in MODES:
        raise ValueError(f"Dynamo's replay has no policy {policy!r} (it has {sorted(MODES)})")
    dynamo_path = dynamo_path or os.environ.get("KVEVENTS_DYNAMO_PATH")
    trace = trace.resolve()  # the replay runs in a scratch folder
    with tempfile.TemporaryDirectory(prefix="kvevents-dynamo-") as scratch:
        if limit is not None:
            sliced = Path(scratch) / "trace.jsonl"
            with trace.open(encoding="utf-8") as source, sliced.open("w") as out:
                for number, line in enumerate(source):
                    if number >= limit:
                        break
                    out.write(line)
            trace = sliced
        args = {
            "trace": str(trace),
            "workers": options.workers,
            "mode": MODES[policy],
            "overlap_weight": options.overlap_weight,
            "trace_block": TRACE_BLOCK,
            "engine": {
                "block_size": options.block_size,
                "num_gpu_blocks": options.capacity_blocks,
                "max_num_batched_tokens": options.budgets.max_num_batched_tokens,
                "max_num_seqs": options.budgets.max_num_seqs,
            },
        }
        env = dict(os.environ, DYN_LOG="error")
        if dynamo_path:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(Path(dynamo_path).resolve()), env.get("PYTHONPATH")) if p
            )
        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-c", _REPLAY, json.dumps(args)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=scratch,
            )
        except subprocess.TimeoutExpired:
            raise DynamoUnavailable(f"Dynamo's replay ran past {timeout:.0f} s") from None
        wall = time.monotonic() - started
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        if "No module named 'dynamo" in done.stderr:
            raise DynamoUnavailable(
                "dynamo is not importable: pip install ai-dynamo-runtime==1.6.1, or set "
                "KVEVENTS_DYNAMO_PATH to a folder holding its unpacked wheel"
            )
        raise DynamoUnavailable(f"Dynamo's replay failed: {lines[-1]}")
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DynamoUnavailable("Dynamo's replay printed no summary") from None
    return {
        "policy": policy,
        "engine": "dynamo",
        "requests": summary.get("completed_requests"),
        "prefix_hit_rate": summary.get("prefix_cache_reused_ratio"),
        "ttft_mean_ms": summary.get("mean_ttft_ms"),
        "ttft_p50_ms": summary.get("median_ttft_ms"),
        "ttft_p99_ms": summary.get("p99_ttft_ms"),
        "requests_per_s": summary.get("request_throughput_rps"),
        "wall_s": wall,
    }


def comparison_table(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """Each policy both models ran, side by side, with our TTFT mean over Dynamo's."""
    by_policy = {r["policy"]: r for r in theirs}
    lines = [
        "| policy | model | prefix hit rate | TTFT mean ms | p50 ms | p99 ms | mean ÷ Dynamo's "
        "| wall s |",
        "|" + "---|" * 8,
    ]
    for mine in ours:
        other = by_policy.get(mine["policy"])
        if other is None:
            continue
        ratio = (
            f"{mine['ttft_mean_ms'] / other['ttft_mean_ms']:.3f}"
            if mine["ttft_mean_ms"] and other["ttft_mean_ms"]
            else "n/a"
        )
        for name, row, shown in (("kvevents", mine, ratio), ("Dynamo 1.6.1", other, "")):
            lines.append(
                f"| {mine['policy']} | {name} | {row['prefix_hit_rate']:.3f} | "
                f"{ms_text(row['ttft_mean_ms'])} | {ms_text(row['ttft_p50_ms'])} | "
                f"{ms_text(row['ttft_p99_ms'])} | {shown} | {row['wall_s']:.1f} |"
            )
    return "\n".join(lines)
