"""Checks an installed kvevents wheel from outside the checkout (`nox -s wheel` runs it in a
fresh venv holding the wheel and nothing editable). Not a pytest module: it must not import
the checkout. Usage: python installed.py CHECKOUT_ROOT; exit 0 when every check passed."""

from __future__ import annotations

import http.client
import importlib
import importlib.metadata
import json
import os
import pkgutil
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PACKAGES = ("kvevents", "kvevents_runtime", "kvevents_apps")
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()
BIN = Path(sysconfig.get_paths()["scripts"])


def command(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def installed(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(SITE)


def kvevents_script() -> str:
    found = shutil.which("kvevents", path=str(BIN))
    assert found, f"no kvevents script in {BIN}"
    return found


def every_module_imports_from_the_installed_wheel() -> None:
    count = 0
    for name in PACKAGES:
        package = importlib.import_module(name)
        assert installed(package.__file__), f"{name} from {package.__file__}, not {SITE}"
        assert (Path(package.__file__).parent / "py.typed").is_file(), f"{name}: no py.typed"
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            if module.name == "kvevents.__main__":
                continue  # runs the command: checked below
            loaded = importlib.import_module(module.name)
            assert installed(loaded.__file__), f"{module.name} from {loaded.__file__}"
            count += 1
    assert count >= 40, f"only {count} modules found"


def schema_path_finds_the_schema_documents_in_the_wheel() -> None:
    import kvevents

    path = kvevents.schema_path()
    assert installed(str(path)), path
    for name in ("kvevents.schema.json", "kvevents.asyncapi.json", "config.schema.json"):
        json.loads((path / name).read_text(encoding="utf-8"))
    json.loads((path / "derived" / "wire.schema.json").read_text(encoding="utf-8"))


def python_dash_m_kvevents_help_lists_every_command() -> None:
    result = command(sys.executable, "-m", "kvevents", "--help")
    assert result.returncode == 0, result.stderr
    for name in ("tap", "demo", "index", "bridge", "simulate"):
        assert re.search(rf"^    {name} ", result.stdout, re.MULTILINE), name


def kvevents_version_names_the_installed_version() -> None:
    result = command(kvevents_script(), "--version")
    expected = importlib.metadata.version("kvevents")
    assert result.returncode == 0 and result.stdout.strip() == f"kvevents {expected}", (
        result.stdout + result.stderr
    )


def a_short_demo_repairs_a_gap_and_a_restart() -> None:
    result = command(kvevents_script(), "demo", "--batches", "4000", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("lost = 0"), result.stdout
    assert re.search(r"^  resets +1 ", result.stdout, re.MULTILINE), result.stdout


def kvevents_index_answers_health() -> None:
    server = subprocess.Popen(
        [kvevents_script(), "index", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        ready, _, _ = select.select([server.stderr], [], [], 60)
        line = server.stderr.readline() if ready else ""
        match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        assert match, f"no 'serving on' line: {line!r}"
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=5)
                connection.request("GET", "/health")
                response = connection.getresponse()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert response.status == 200, (response.status, response.read())
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(30)


def the_fleet_demo_runs_on_its_own_nats_server() -> None:
    """`kvevents demo --fleet` after installing the fleet extra: nothing else to set up."""
    result = command(kvevents_script(), "demo", "--fleet", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.rstrip().endswith("fleet demo: ok"), result.stderr


CHECKS = [
    every_module_imports_from_the_installed_wheel,
    schema_path_finds_the_schema_documents_in_the_wheel,
    python_dash_m_kvevents_help_lists_every_command,
    kvevents_version_names_the_installed_version,
    a_short_demo_repairs_a_gap_and_a_restart,
    kvevents_index_answers_health,
    the_fleet_demo_runs_on_its_own_nats_server,
]


def main() -> int:
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
    if checkout is not None and Path.cwd().resolve().is_relative_to(checkout):
        print("run this from outside the checkout", file=sys.stderr)
        return 2
    failed = 0
    for run_check in CHECKS:
        name = run_check.__name__.replace("_", " ")
        try:
            run_check()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the status
            failed += 1
            print(f"FAILED: {name}: {type(exc).__name__}: {exc}")
        else:
            print(f"ok: {name}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
