"""`python -m bench [--quick] [--only SECTION,...] [--out DIR] [--baseline OLD.json]`: the
side-by-side benchmark (`nox -s bench`).

Writes DIR/results.md (also printed), DIR/results.json and DIR/ratios.png. The exit status
is 0 whether or not the targets are met: they are figures of the run, not assertions.
`--only index` (or any of the sections, comma-separated) reruns those sections alone, into
bench/results/partial unless `--out` says otherwise: the checked-in report is one whole run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import baseline, report
from .references import ReferenceUnavailable
from .run import SECTIONS, Settings, run_all


def _sections(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}: choose from {', '.join(SECTIONS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few, small repetitions: a smoke run, not figures to quote",
    )
    parser.add_argument(
        "--only",
        type=_sections,
        help=f"comma-separated sections to run alone ({', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report goes (default: bench/results, or bench/results/partial with --only)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="an earlier results.json: append a before/after table of every kvevents row",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("bench/results/partial" if args.only else "bench/results")
    # Read first: the baseline may be the report this run overwrites.
    base = json.loads(args.baseline.read_text(encoding="utf-8")) if args.baseline else None
    settings = Settings.quick() if args.quick else Settings()
    try:
        results = run_all(settings, args.only)
    except ReferenceUnavailable as exc:
        print(f"bench: a reference publisher is unavailable: {exc}", file=sys.stderr)
        return 2
    verdict = report.targets(results)
    extra = (["--quick"] if args.quick else []) + (
        [f"--only {','.join(sorted(args.only))}"] if args.only else []
    )
    command = "nox -s bench" + (" -- " + " ".join(extra) if extra else "")
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
