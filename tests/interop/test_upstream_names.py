"""Every name that vLLM 0.33.0's and SGLang 0.5.23's own source trees import from their
kv-events module exists in kvevents' face for it, with the same kind and signature.

The trees are the wheels (`pip download --no-deps`, cached in .cache/wheels): every .py file
is read with `ast` and every `from <module> import ...` (absolute or relative) is collected.
Skipped, with the reason, when a wheel cannot be fetched."""

from __future__ import annotations

import ast
import importlib
import inspect
import zipfile
from collections import defaultdict
from collections.abc import Iterable

import pytest

from bench.references import SGLANG, VLLM, Reference, ReferenceUnavailable, fetch_wheel, load

pytestmark = pytest.mark.interop

TARGETS = {
    "vllm": (VLLM, "vllm.distributed.kv_events"),
    "sglang": (SGLANG, "sglang.srt.disaggregation.kv_events"),
}


def scan(files: Iterable[tuple[str, bytes]], module: str) -> dict[str, list[str]]:
    """name -> the files (path, source) that import it from `module`, absolutely or relatively."""
    found: dict[str, list[str]] = defaultdict(list)
    leaf = module.rpartition(".")[2].encode()
    for path, data in files:
        if not path.endswith(".py") or leaf not in data:
            continue
        try:
            tree = ast.parse(data)
        except SyntaxError:
            continue
        package = path[:-3].replace("/", ".").split(".")
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                source = ".".join(package[: -node.level] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == module:
                for alias in node.names:
                    found[alias.name].append(path)
    return dict(found)


def imported_names(reference: Reference, module: str) -> dict[str, list[str]]:
    try:
        wheel = fetch_wheel(reference)
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))
    with zipfile.ZipFile(wheel) as archive:
        files = (
            (info.filename, archive.read(info))
            for info in archive.infolist()
            if info.filename.endswith(".py")
        )
        return scan(files, module)


def kind(value: object) -> str:
    if inspect.isclass(value):
        return "class"
    if callable(value):
        return "function"
    return type(value).__name__


def parameters(value: object) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(value).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", sorted(TARGETS))
def test_every_name_the_upstream_tree_imports_exists_with_its_kind(dialect: str) -> None:
    reference, module = TARGETS[dialect]
    names = imported_names(reference, module)
    assert len(names) >= 8, f"the scan found too little in {reference.requirement}: {sorted(names)}"
    face = importlib.import_module(f"kvevents.{dialect}")
    missing = sorted(name for name in names if not hasattr(face, name))
    assert missing == [], (
        f"kvevents.{dialect} lacks names {reference.name}'s code imports: {missing}"
    )
    try:
        theirs = load(reference)
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))
    for name in sorted(names):
        ours_value, their_value = getattr(face, name), getattr(theirs, name)
        assert kind(ours_value) == kind(their_value), name
        if kind(their_value) == "function":
            assert parameters(ours_value) == parameters(their_value), name


def test_the_scan_sees_relative_and_absolute_imports_and_nothing_else() -> None:
    files = [
        (
            "x/y/user.py",
            b"from .kv_events import A, B\nfrom x.y.kv_events import C\nfrom x.y import kv_events\n",
        ),
        (
            "x/z/other.py",
            b"from ..y.kv_events import D\nfrom .kv_events import E  # x.z.kv_events\n",
        ),
        ("x/y/data.txt", b"from .kv_events import F\n"),
    ]
    assert scan(files, "x.y.kv_events") == {
        "A": ["x/y/user.py"],
        "B": ["x/y/user.py"],
        "C": ["x/y/user.py"],
        "D": ["x/z/other.py"],
    }
