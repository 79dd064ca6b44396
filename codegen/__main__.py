"""`python -m codegen` writes generated/kvevents/; `--check` exits 1 with a diff on drift."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .render import DERIVED, PACKAGE, ROOT, render_all


def _on_disk() -> set[Path]:
    """Every file under the folders codegen owns: each must be one it renders."""
    return {
        p.relative_to(ROOT)
        for folder in (PACKAGE, DERIVED)
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codegen", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="compare with the checked-in files instead of writing"
    )
    args = parser.parse_args(argv)
    files = render_all()
    if args.check:
        drift: list[str] = []
        for path, text in files.items():
            target = ROOT / path
            current = target.read_text(encoding="utf-8") if target.exists() else ""
            if current != text:
                drift.extend(
                    difflib.unified_diff(
                        current.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        f"a/{path}",
                        f"b/{path}",
                    )
                )
        for stray in sorted(_on_disk() - set(files)):
            drift.append(f"stray file not produced by codegen: {stray}\n")
        if drift:
            sys.stdout.writelines(drift)
            print(
                "\ngenerated code drifted from schema/ or codegen/: run `nox -s regenerate` (python -m codegen)"
            )
            return 1
        print(f"generated code is up to date ({len(files)} files)")
        return 0
    for stray in sorted(_on_disk() - set(files)):
        (ROOT / stray).unlink()
    for path, text in files.items():
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
