"""Compares a run with a baseline run (an earlier results.json): every kvevents row of the
publisher thread, end to end, replay and subscriber tables, before and after.

Two runs on a noisy 2-core machine differ by 10-20% on their own, so each row also gives
kvevents' ratio to the reference measured in the same run: the reference is the same code
in both runs, so that ratio cancels most of the machine's drift.

`python -m bench.baseline OLD.json NEW.json` prints the table; `python -m bench --baseline
OLD.json` appends it to the report of the run it makes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .impls import PAIRS
from .stats import fmt

REGRESSION = 0.9
"""A row regresses when its reference-normalised ratio falls below this share of the baseline's."""
_REFERENCE = dict(PAIRS)
_LIVE = (
    ("thread_cpu_us", "publisher-thread CPU µs/batch", False),
    ("batches_per_s", "end to end batches/s", True),
)


def _median(table: dict[str, Any], key: str, figure: str) -> float | None:
    row = table.get(key)
    if not row or figure not in row["figures"]:
        return None
    return float(row["figures"][figure]["median"])


def _rows(run: dict[str, Any]) -> dict[str, tuple[float | None, float | None, bool]]:
    """`what -> (kvevents, reference, higher is better)` for every comparable row."""
    out: dict[str, tuple[float | None, float | None, bool]] = {}
    for key in run["live"]:
        impl, shape, transport = key.split(" / ")
        if impl not in _REFERENCE:
            continue
        ref_key = f"{_REFERENCE[impl]} / {shape} / {transport}"
        for figure, label, higher in _LIVE:
            out[f"{label}, ({shape}) {transport}, {impl}"] = (
                _median(run["live"], key, figure),
                _median(run["live"], ref_key, figure),
                higher,
            )
    for key in run["replay"]:
        impl, size, case = key.split(" / ")
        if impl not in _REFERENCE or case == "past end":
            continue
        ref_key = f"{_REFERENCE[impl]} / {size} / {case}"
        out[f"replay latency µs, {size} {case}, {impl}"] = (
            _median(run["replay"], key, "latency_us"),
            _median(run["replay"], ref_key, "latency_us"),
            False,
        )
    for key in run["delivered"]:
        consumer, shape, transport = key.split(" / ")
        if consumer != "kvevents":
            continue
        ref_key = f"vllm_example / {shape} / {transport}"
        out[f"subscriber delivered batches/s, ({shape}) {transport}"] = (
            _median(run["delivered"], key, "batches_per_s"),
            _median(run["delivered"], ref_key, "batches_per_s"),
            True,
        )
    return out


def _advantage(ours: float | None, reference: float | None, higher: bool) -> float | None:
    """How many times better than the reference (> 1 is better), whichever way the unit runs."""
    if not ours or not reference:
        return None
    return ours / reference if higher else reference / ours


def compare(baseline: dict[str, Any], run: dict[str, Any]) -> tuple[str, list[str]]:
    """The markdown table and the rows whose normalised advantage regressed."""
    before, after = _rows(baseline), _rows(run)
    lines = [
        "| row | baseline | this run | this ÷ baseline | advantage over the reference, baseline → this run |",
        "|---|---|---|---|---|",
    ]
    regressed = []
    for what, (ours, reference, higher) in after.items():
        old = before.get(what)
        if old is None:
            continue
        change = ours / old[0] if ours and old[0] else None
        adv_old, adv_new = _advantage(*old), _advantage(ours, reference, higher)
        flag = ""
        if adv_old and adv_new and adv_new < REGRESSION * adv_old:
            regressed.append(what)
            flag = " **regressed**"
        lines.append(
            f"| {what} | {fmt(old[0])} | {fmt(ours)} | {fmt(change)} | "
            f"{fmt(adv_old)}× → {fmt(adv_new)}×{flag} |"
        )
    return "\n".join(lines), regressed


def section(baseline: dict[str, Any], run: dict[str, Any], label: str) -> str:
    table, regressed = compare(baseline, run)
    verdict = (
        "no row regressed"
        if not regressed
        else f"{len(regressed)} rows regressed: {'; '.join(regressed)}"
    )
    return (
        f"## Against the baseline ({label})\n\n"
        f"A row regresses when kvevents' advantage over the reference falls below "
        f"{REGRESSION:.0%} of the baseline's: {verdict}.\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("baseline", type=Path)
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text(encoding="utf-8"))
    run = json.loads(args.run.read_text(encoding="utf-8"))
    print(section(baseline, run, str(args.baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
