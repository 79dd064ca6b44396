"""The layout rule: generated/ holds exactly what codegen renders, the runtime imports nothing
generated, apps use only the public API, and `import kvevents` stays cheap."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kvevents
from codegen.render import DERIVED, PACKAGE, render_all
from tests.support import ROOT


def _tracked(folder: Path) -> set[Path]:
    out = subprocess.run(
        ["git", "ls-files", str(folder)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {Path(line) for line in out.splitlines()}


def _imports(folder: Path) -> list[tuple[Path, str, list[str]]]:
    """(file, module, names) of every import under `folder`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path, node.module, [alias.name for alias in node.names]))
    return found


def test_codegen_renders_exactly_the_files_under_generated_and_derived() -> None:
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: the tracked-file list is unknown")
    rendered = set(render_all())
    on_disk = _tracked(PACKAGE) | _tracked(DERIVED)
    assert on_disk, "git lists no generated files"
    assert on_disk - rendered == set(), "hand-written or stray files under a generated folder"
    assert rendered - on_disk == set(), "rendered files missing from the checkout"


def test_no_template_is_a_copied_python_file() -> None:
    templates = ROOT / "codegen" / "templates"
    assert not list(templates.rglob("*.py")), (
        "templates are Jinja (.j2); hand-written code lives in runtime/ or apps/"
    )


def test_the_runtime_imports_nothing_from_kvevents() -> None:
    offenders = [
        (str(p), m)
        for p, m, _ in _imports(ROOT / "runtime")
        if m == "kvevents" or m.startswith("kvevents.")
    ]
    assert offenders == []


def test_generated_code_imports_no_app() -> None:
    offenders = [
        (str(p), m)
        for p, m, _ in _imports(ROOT / "generated")
        if m.split(".")[0] == "kvevents_apps"
    ]
    assert offenders == []


def test_the_apps_use_only_the_public_kvevents_api() -> None:
    public = set(kvevents.__all__) | set(kvevents.DIALECTS)
    offenders = []
    for path, module, names in _imports(ROOT / "apps"):
        if module.startswith("kvevents_runtime"):
            offenders.append((str(path), module))
        elif module == "kvevents":
            offenders += [(str(path), f"kvevents.{n}") for n in names if n not in public]
        elif module.startswith("kvevents."):
            face = module.split(".")[1]
            if face not in PUBLIC_FACES or module.count(".") > 1:
                offenders.append((str(path), module))
    assert offenders == []


PUBLIC_FACES = {*kvevents.DIALECTS, "aio", "index", "mock", "fleet"}
"""The public submodules: the dialects, the asyncio subscriber, the index, the mock engine and
the fleet."""


def test_import_kvevents_and_decode_load_neither_zmq_nor_pydantic_nor_a_publisher() -> None:
    probe = (
        "import sys, kvevents\n"
        "batch = kvevents.KVEventBatch(ts=1.0, events=[kvevents.BlockRemoved(block_hashes=[1])])\n"
        "assert kvevents.decode(kvevents.encode(batch, 'sglang')).events == batch.events\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('zmq', 'pydantic')\n"
        "         or m.endswith(('.publisher', '.config')) or m.startswith('kvevents_runtime.subscriber')]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_lazy_names_resolve() -> None:
    from kvevents.vllm import EventPublisherFactory, KVEventsConfig

    assert kvevents.Subscriber.wire is kvevents.wire.WIRE
    assert kvevents.Notice.__module__ == "kvevents_runtime.subscriber"
    assert EventPublisherFactory.__module__ == "kvevents.vllm.publisher"
    assert KVEventsConfig.__module__ == "kvevents.vllm.config"
    with pytest.raises(AttributeError):
        kvevents.no_such_name  # noqa: B018


def test_python_dash_m_kvevents_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvevents", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "tap" in result.stdout


def test_schema_path_finds_the_schema_in_a_checkout() -> None:
    path = kvevents.schema_path()
    assert (path / "kvevents.schema.json").is_file()
    assert (path / "derived" / "wire.schema.json").is_file()


SOURCE_ROOTS = {"generated": "", "runtime": "", "apps": "", "schema": "kvevents/schema/"}
"""Where each source root's files land in the wheel (schema/ is package data of kvevents)."""


@pytest.mark.timeout(300)
def test_the_wheel_carries_every_file_of_every_source_root(tmp_path: Path) -> None:
    """Every tracked file under generated/, runtime/, apps/ and schema/ is in the wheel, at its
    package path: a subpackage added later cannot be left out. (Whether the wheel *works*
    without the checkout is `nox -s wheel`'s job: this venv also holds the editable install.)"""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: the tracked-file list is unknown")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=280,
    )
    if built.returncode and "No matching distribution" in built.stderr:
        pytest.skip(f"the build backend could not be fetched: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("kvevents-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for root, prefix in SOURCE_ROOTS.items():
        for path in _tracked(ROOT / root):
            expected.add(prefix + str(path.relative_to(root)))
    assert any(name.startswith("kvevents_runtime/compat/") for name in expected)
    assert expected - names == set(), "source files missing from the wheel"
    shipped = {n for n in names if ".dist-info/" not in n}
    assert shipped - expected == set(), "files in the wheel that no source root tracks"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    )
    assert b"kvevents = kvevents_apps.cli:main" in entry_points


@pytest.mark.parametrize("dialect", kvevents.DIALECTS)
def test_the_config_model_is_the_derived_schema(dialect: str) -> None:
    import importlib

    model = importlib.import_module(f"kvevents.{dialect}").KVEventsConfig
    derived = json.loads((ROOT / DERIVED / f"config.{dialect}.schema.json").read_text())
    # A BaseModel's fields (pydantic >= 2.5) or a pydantic dataclass's.
    fields = getattr(model, "model_fields", None) or model.__pydantic_fields__
    assert list(fields) == list(derived["properties"])
    for name, prop in derived["properties"].items():
        assert fields[name].default == prop["default"], name
    assert (
        "datamodel-code-generator"
        in Path(sys.modules[model.__module__].__file__).read_text().splitlines()[0]
    )


@pytest.mark.parametrize("dialect", kvevents.DIALECTS)
def test_cli_json_is_validated_by_the_generated_model(dialect: str) -> None:
    import importlib

    import pydantic

    mod = importlib.import_module(f"kvevents.{dialect}")
    with pytest.raises(pydantic.ValidationError, match="buffer_steps"):
        mod.KVEventsConfig.from_cli('{"buffer_steps": 0}')
    with pytest.raises(pydantic.ValidationError, match="queue_full_policy"):
        mod.KVEventsConfig.from_cli('{"queue_full_policy": "sometimes"}')
    if dialect != "vllm":
        with pytest.raises(pydantic.ValidationError, match="hwm"):
            mod.EventPublisherFactory.create('{"publisher": "zmq", "hwm": -1}')


def test_a_nox_session_whose_interpreter_is_missing_fails() -> None:
    pytest.importorskip("nox", reason="the nox session installs nox")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nox",
            "-f",
            str(ROOT / "noxfile.py"),
            "-s",
            "check_generated",
            "--force-python",
            "3.99",
            "--no-install",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "3.99" in result.stderr
