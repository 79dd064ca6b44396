"""vLLM 0.33.0's own kv-events tests and example subscriber, run against kvevents with only the
import lines rewritten, and against vLLM's module itself for the pass set to match.

The files come from vLLM's source distribution, fetched at test time (`bench.references.
fetch_sdist`, cached in .cache/sdists, never committed): tests/distributed/test_events.py,
tests/distributed/test_kv_cache_events.py with their conftest.py, and
examples/features/kv_events/kv_events_subscriber.py. Each suite runs twice in a pytest
subprocess: once with vLLM's import paths resolving to vLLM's own module (loaded from its
wheel by `bench.references.install`), once with them rewritten to `kvevents.vllm`. The one
stub, `split_zmq_path` from `vllm.utils.network_utils`, is a URL splitter the tests use to
read endpoints, nothing of the events. Upstream's `random_port` fixture draws from 10000-59900,
which overlaps the kernel's ephemeral range, so a port a live connection holds fails the bind
by chance (seen once in CI); both runs draw instead from `free_port_block`, a port whose
neighbours the tests use (+1, +100, +101) were all free a moment before, below that range.

Invariant: every upstream test that passes on vLLM's module passes on kvevents.

SGLang 0.5.23 publishes no source distribution and its tests are not in its wheel, so its
suite cannot be fetched here: that test skips and says so. SGLang's helpers are compared
with its module in test_upstream_helpers.py instead.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from bench.references import SGLANG, VLLM, ReferenceUnavailable, fetch_sdist, fetch_wheel
from tests.support import ROOT

pytestmark = pytest.mark.interop

SUITE = {
    "tests/distributed/test_events.py": "test_events.py",
    "tests/distributed/test_kv_cache_events.py": "test_kv_cache_events.py",
    "tests/distributed/conftest.py": "conftest.py",
}
EXAMPLE = "examples/features/kv_events/kv_events_subscriber.py"
IMPORTS_TO_KVEVENTS = [
    (r"from vllm\.distributed\.kv_events import", "from kvevents.vllm import"),
    (r"from vllm\.config\.kv_events import", "from kvevents.vllm import"),
    (r"from vllm\.distributed import kv_events\b", "from kvevents import vllm as kv_events"),
    (r"from vllm\.v1\.core\.kv_cache_utils import", "from kvevents.vllm import"),
    (r"from vllm\.utils\.network_utils import", "from upstream_stubs import"),
    (r"from sglang\.srt\.disaggregation\.kv_events import", "from kvevents.sglang import"),
    (
        r"from sglang\.srt\.disaggregation import kv_events\b",
        "from kvevents import sglang as kv_events",
    ),
]
RANDOM_PORT_DRAW = "random.randint(10000, 59900)"
STUBS = '''"""Stubs for vLLM utilities the upstream tests use that have nothing to do with events."""

import random
import socket

# Below the kernel's ephemeral range, so no connection's local port takes one while a test runs.
_LOW, _HIGH = 10000, 32000
# The upstream tests bind the drawn port, the next (dp rank 1) and both of those + 100 (replay).
_OFFSETS = (0, 1, 100, 101)


def _bindable(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block():
    """A port whose block of offsets could all be bound just now."""
    for _ in range(200):
        port = random.randint(_LOW, _HIGH - max(_OFFSETS))
        if all(_bindable(port + offset) for offset in _OFFSETS):
            return port
    raise RuntimeError(f"no free port block in {_LOW}-{_HIGH} after 200 draws")


def split_zmq_path(path):
    """vLLM's zmq URL splitter: (scheme, host, port), IPv6 brackets removed."""
    scheme, _, rest = path.partition("://")
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), port
'''
UPSTREAM_CONFTEST = """import sys

sys.path.insert(0, {root!r})
from bench.references import VLLM, install  # noqa: E402

install(VLLM)
"""


def _sources() -> dict[str, str]:
    try:
        fetch_wheel(VLLM)  # the upstream run loads vLLM's module from it
        sdist = fetch_sdist(VLLM)
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        out = {}
        for member in [*SUITE, EXAMPLE]:
            extracted = archive.extractfile(f"{top}/{member}")
            assert extracted is not None, member
            out[member] = extracted.read().decode("utf-8")
    return out


def _rewrite(source: str) -> str:
    for pattern, replacement in IMPORTS_TO_KVEVENTS:
        source = re.sub(pattern, replacement, source)
    leftover = [
        line
        for line in source.splitlines()
        if re.match(r"\s*(from|import)\s+(vllm|sglang)\b", line)
    ]
    assert not leftover, f"an upstream import was not rewritten: {leftover}"
    return source


def _write_suite(base: Path, sources: dict[str, str], target: str) -> Path:
    base.mkdir(parents=True)
    package = base / "upstream_vllm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for member, name in SUITE.items():
        text = sources[member] if target == "vllm" else _rewrite(sources[member])
        if name == "conftest.py":
            assert RANDOM_PORT_DRAW in text, "upstream's random_port fixture changed"
            text = text.replace(RANDOM_PORT_DRAW, "__import__('upstream_stubs').free_port_block()")
        (package / name).write_text(text)
    (base / "upstream_stubs.py").write_text(STUBS)
    (base / "pytest.ini").write_text("[pytest]\ntimeout = 120\n")
    if target == "vllm":
        (base / "conftest.py").write_text(UPSTREAM_CONFTEST.format(root=str(ROOT)))
    return base


def _run(base: Path) -> dict[str, str]:
    """nodeid -> passed/failed/skipped of one pytest subprocess run."""
    report = base / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(base), str(ROOT)])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(base / "pytest.ini"),
            "--rootdir",
            str(base),
            f"--junitxml={report}",
            "upstream_vllm",
        ],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        for child in case:
            if child.tag in ("failure", "error"):
                # Printed, so a failure in CI says what upstream's assertion was.
                print(f"{base.name} {name}: {(child.get('message') or '')[:1000]}")
        outcomes[name] = (
            "failed"
            if kinds & {"failure", "error"}
            else "skipped"
            if "skipped" in kinds
            else "passed"
        )
    return outcomes


@pytest.mark.timeout(900)
def test_vllms_own_kv_events_tests_pass_on_kvevents(tmp_path: Path) -> None:
    sources = _sources()
    upstream = _run(_write_suite(tmp_path / "vllm", sources, "vllm"))
    ours = _run(_write_suite(tmp_path / "kvevents", sources, "kvevents"))
    passed_upstream = {name for name, outcome in upstream.items() if outcome == "passed"}
    passed_ours = {name for name, outcome in ours.items() if outcome == "passed"}
    print(
        f"vLLM 0.33.0 suite: {len(passed_upstream)}/{len(upstream)} pass on vLLM's module, "
        f"{len(passed_ours)}/{len(ours)} on kvevents"
    )
    assert len(upstream) >= 20, upstream
    assert set(upstream) == set(ours)
    assert sorted(passed_upstream - passed_ours) == []  # the messages are printed above


def test_sglangs_own_kv_events_tests_pass_on_kvevents(tmp_path: Path) -> None:
    """Runs every test file of SGLang's source distribution that imports its kv-events module,
    as for vLLM. SGLang 0.5.23 publishes no source distribution on the index this machine
    reaches and its tests are not in its wheel, so this skips with that reason today."""
    try:
        sdist = fetch_sdist(SGLANG)
    except ReferenceUnavailable as exc:
        pytest.skip(f"SGLang's tests cannot be fetched: {exc}")
    with tarfile.open(sdist) as archive:
        members = [
            m
            for m in archive.getmembers()
            if Path(m.name).name.startswith("test") and m.name.endswith(".py")
        ]
        suite = {}
        for member in members:
            extracted = archive.extractfile(member)
            text = extracted.read().decode("utf-8") if extracted else ""
            if "disaggregation.kv_events" in text or "disaggregation import kv_events" in text:
                suite[Path(member.name).name] = text
    if not suite:
        pytest.skip(f"{sdist.name} holds no test of the kv-events module")
    upstream_dir, ours_dir = tmp_path / "sglang", tmp_path / "kvevents"
    for base, target in ((upstream_dir, "sglang"), (ours_dir, "kvevents")):
        package = base / "upstream_vllm"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for name, text in suite.items():
            (package / name).write_text(text if target == "sglang" else _rewrite(text))
        (base / "pytest.ini").write_text("[pytest]\ntimeout = 120\n")
        (base / "upstream_stubs.py").write_text(STUBS)
    (upstream_dir / "conftest.py").write_text(
        UPSTREAM_CONFTEST.format(root=str(ROOT)).replace("VLLM", "SGLANG")
    )
    upstream, ours = _run(upstream_dir), _run(ours_dir)
    passed = {n for n, o in upstream.items() if o == "passed"}
    print(
        f"SGLang 0.5.23 suite: {len(passed)}/{len(upstream)} pass upstream, "
        f"{sum(o == 'passed' for o in ours.values())}/{len(ours)} on kvevents"
    )
    assert sorted(passed - {n for n, o in ours.items() if o == "passed"}) == []


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("publisher", ["kvevents", "vllm"])
def test_vllms_example_subscriber_reads_the_stream(tmp_path: Path, publisher: str) -> None:
    """The example dials the fixed ports 5557/5558 with topic "kv-events"; it is run against
    kvevents' publisher and against vLLM's own, and must print every batch for both."""
    sources = _sources()
    if not (_port_free(5557) and _port_free(5558)):
        pytest.skip("ports 5557/5558, which vLLM's example dials, are in use on this machine")
    script = tmp_path / "kv_events_subscriber.py"
    # The example imports one name of vLLM's (ExternalBlockHash), rewritten for either publisher.
    script.write_text(_rewrite(sources[EXAMPLE]))
    (tmp_path / "upstream_stubs.py").write_text(STUBS)
    if publisher == "kvevents":
        import kvevents.vllm as module
    else:
        from bench.references import load

        module = load(VLLM)
    pub = module.ZmqEventPublisher(0, "tcp://*:5557", "tcp://*:5558", topic="kv-events")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    example = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(example.stdout.readline, "")), daemon=True
    )  # type: ignore[union-attr]
    reader.start()

    def received(prefix: str = "Received event batch") -> int:
        return sum(line.startswith(prefix) for line in list(lines))

    try:
        # PUB drops what is sent before the subscription lands: publish until the example hears one.
        deadline = time.monotonic() + 30
        sent = 0
        while time.monotonic() < deadline and not received():
            pub.publish(
                module.KVEventBatch(
                    ts=float(sent), events=[module.BlockRemoved(block_hashes=[sent], medium="GPU")]
                )
            )
            sent += 1
            time.sleep(0.05)
        assert received(), lines[-20:]
        stored = module.BlockStored(
            block_hashes=[7, 8],
            parent_block_hash=6,
            token_ids=[1, 2, 3, 4],
            block_size=2,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        for n in range(50):
            pub.publish(module.KVEventBatch(ts=1000.0 + n, events=[stored]))
        while time.monotonic() < deadline and received("Received event batch at 10") < 50:
            time.sleep(0.05)
        assert received("Received event batch at 10") == 50, lines[-20:]
        assert not any("Error decoding" in line for line in lines), lines
        assert any(
            "block_hashes=[7, 8]" in line and "token_ids=[1, 2, 3, 4]" in line for line in lines
        )
    finally:
        example.kill()
        example.wait(10)
        reader.join(5)
        pub.shutdown()
