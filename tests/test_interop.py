"""Interop with the real SGLang 0.5.23 publisher, loaded from its wheel at run time.

The wheel is fetched with `pip download --no-deps` into tests/.cache (never committed); only
`sglang/srt/disaggregation/kv_events.py` is loaded, with its two package-internal imports
stubbed. Skipped, with the reason, when the wheel cannot be fetched."""

from __future__ import annotations

import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest

from kvevents import Subscriber

CACHE = Path(__file__).resolve().parent / ".cache"
MODULE = "sglang/srt/disaggregation/kv_events.py"


def load_reference_sglang() -> types.ModuleType:
    CACHE.mkdir(exist_ok=True)
    wheels = sorted(CACHE.glob("sglang-0.5.23-*.whl"))
    if not wheels:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(CACHE), "sglang==0.5.23"],
            capture_output=True, text=True, timeout=600,
        )
        wheels = sorted(CACHE.glob("sglang-0.5.23-*.whl"))
        if fetched.returncode != 0 or not wheels:
            pytest.skip(f"sglang 0.5.23 wheel could not be fetched: {fetched.stderr.strip()[-300:]}")
    source = zipfile.ZipFile(wheels[0]).read(MODULE).decode("utf-8")
    stubs = {
        "sglang": types.ModuleType("sglang"),
        "sglang.srt": types.ModuleType("sglang.srt"),
        "sglang.srt.runtime_context": types.ModuleType("sglang.srt.runtime_context"),
        "sglang.srt.utils": types.ModuleType("sglang.srt.utils"),
        "sglang.srt.utils.network": types.ModuleType("sglang.srt.utils.network"),
    }
    stubs["sglang.srt.runtime_context"].get_parallel = lambda: None  # type: ignore[attr-defined]
    stubs["sglang.srt.utils.network"].NetworkAddress = object  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType("reference_sglang_kv_events")
        exec(compile(source, MODULE, "exec"), module.__dict__)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


@pytest.mark.interop
def test_subscriber_consumes_the_real_sglang_publisher():
    ref = load_reference_sglang()
    publisher = ref.ZmqEventPublisher(0, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, topic="kv")
    try:
        live = publisher._local_pub_endpoint
        replay = publisher._local_replay_endpoint
        for n in range(40):
            publisher.publish(ref.KVEventBatch(ts=float(n), events=[
                ref.BlockStored(block_hashes=[-n - 1], parent_block_hash=None, token_ids=[(1, 2), (2, 3)] if n % 2 else [1, 2],
                                block_size=2, lora_id=None, medium=ref.StorageMedium.CPU, cache_salt="tenant")]))
        time.sleep(0.3)
        with Subscriber(live, replay, topic="kv") as sub:
            got = []
            deadline = time.monotonic() + 15
            while len(got) < 40 and time.monotonic() < deadline:
                got += sub.poll(0.2)
    finally:
        publisher.shutdown()
    assert [d.seq for d in got] == list(range(40))
    first = got[1].batch.events[0]
    assert first.block_hashes == [-2] and first.token_ids == [(1, 2), (2, 3)]
    assert first.medium == "CPU_PINNED" and first.cache_salt == "tenant"
