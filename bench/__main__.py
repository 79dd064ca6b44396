"""`python -m bench [--quick] [--out DIR] [--baseline OLD.json]`: the side-by-side benchmark
(`nox -s bench`).

Writes DIR/results.md (also printed), DIR/results.json and DIR/ratios.png. The exit status
is 0 whether or not the targets are met: they are figures of the run, not assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import baseline, report
from .references import ReferenceUnavailable
from .run import Settings, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few, small repetitions: a smoke run, not figures to quote",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="where the report goes (default: bench/results)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="an earlier results.json: append a before/after table of every kvevents row",
    )
    args = parser.parse_args(argv)
    # Read first: the baseline may be the report this run overwrites.
    base = json.loads(args.baseline.read_text(encoding="utf-8")) if args.baseline else None
    settings = Settings.quick() if args.quick else Settings()
    try:
        results = run_all(settings)
    except ReferenceUnavailable as exc:
        print(f"bench: a reference publisher is unavailable: {exc}", file=sys.stderr)
        return 2
    verdict = report.targets(results)
    command = "nox -s bench" + (" -- --quick" if args.quick else "")
    text = report.markdown(results, verdict, command)
    if base is not None:
        current = json.loads(report.to_json(results, verdict))
        text += "\n\n" + baseline.section(base, current, str(args.baseline))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(
        report.to_json(results, verdict) + "\n", encoding="utf-8"
    )
    report.chart(verdict, args.out / "ratios.png")
    if "index" in results:
        report.index_chart(results, args.out / "index_ratios.png")
    print(text)
    met = sum(t["met"] for t in verdict)
    print(f"\n{met} of {len(verdict)} targets met; report in {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
