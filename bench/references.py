"""The real publishers, loaded from the producers' wheels at run time.

`pip download --no-deps` fetches a wheel into `.cache/wheels/` (never committed); only its
`kv_events.py` is read out of the zip and executed, with the few package-internal imports
stubbed, so no code of theirs is ever copied into this repository and nothing else of the
engine (torch, CUDA) is needed.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "wheels"


class ReferenceUnavailable(RuntimeError):
    """The wheel could not be fetched or its module could not be loaded."""


@dataclass(frozen=True)
class Reference:
    name: str
    requirement: str
    module_path: str


VLLM = Reference("vLLM 0.33.0", "vllm==0.33.0", "vllm/distributed/kv_events.py")
SGLANG = Reference("SGLang 0.5.23", "sglang==0.5.23", "sglang/srt/disaggregation/kv_events.py")


def _pip() -> list[str]:
    # A uv-made venv has no pip; the interpreter it was made from does.
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    return [getattr(sys, "_base_executable", sys.executable), "-m", "pip"]


def fetch_wheel(reference: Reference) -> Path:
    """The cached wheel, downloaded first if needed."""
    project, version = reference.requirement.split("==")
    pattern = f"{project}-{version}-*.whl"
    wheels = sorted(CACHE.glob(pattern))
    if wheels:
        return wheels[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [*_pip(), "download", "--no-deps", "--quiet", "-d", str(CACHE), reference.requirement]
    try:
        fetched = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReferenceUnavailable(f"{reference.requirement}: {exc}") from None
    wheels = sorted(CACHE.glob(pattern))
    if fetched.returncode != 0 or not wheels:
        raise ReferenceUnavailable(
            f"{reference.requirement} could not be fetched: {fetched.stderr.strip()[-300:]}"
        )
    return wheels[0]


def _stub(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class _VllmKVEventsConfig:
    """Stands in for vLLM's config dataclass: the publisher only stores it."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _vllm_stubs() -> dict[str, types.ModuleType]:
    def get_tcp_uri(ip: str, port: int) -> str:
        return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"

    def is_valid_ipv6_address(address: str) -> bool:
        try:
            return ipaddress.ip_address(address).version == 6
        except ValueError:
            return False

    def split_zmq_path(path: str) -> tuple[str, str, str]:
        scheme, _, rest = path.partition("://")
        host, _, port = rest.rpartition(":")
        return scheme, host.strip("[]"), port

    return {
        "vllm": _stub("vllm"),
        "vllm.config": _stub("vllm.config"),
        "vllm.config.kv_events": _stub("vllm.config.kv_events", KVEventsConfig=_VllmKVEventsConfig),
        "vllm.logger": _stub("vllm.logger", init_logger=logging.getLogger),
        "vllm.utils": _stub("vllm.utils"),
        "vllm.utils.network_utils": _stub(
            "vllm.utils.network_utils",
            get_ip=lambda: "127.0.0.1",
            get_tcp_uri=get_tcp_uri,
            is_valid_ipv6_address=is_valid_ipv6_address,
            split_zmq_path=split_zmq_path,
        ),
        "vllm.v1": _stub("vllm.v1"),
        "vllm.v1.core": _stub("vllm.v1.core"),
        "vllm.v1.core.kv_cache_utils": _stub(
            "vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int
        ),
    }


def _sglang_stubs() -> dict[str, types.ModuleType]:
    return {
        "sglang": _stub("sglang"),
        "sglang.srt": _stub("sglang.srt"),
        "sglang.srt.runtime_context": _stub(
            "sglang.srt.runtime_context", get_parallel=lambda: None
        ),
        "sglang.srt.utils": _stub("sglang.srt.utils"),
        "sglang.srt.utils.network": _stub("sglang.srt.utils.network", NetworkAddress=object),
    }


_STUBS = {VLLM: _vllm_stubs, SGLANG: _sglang_stubs}
_loaded: dict[Reference, types.ModuleType] = {}


def load(reference: Reference) -> types.ModuleType:
    """The producer's kv_events module, executed from its wheel with its imports stubbed.

    The stubs are in `sys.modules` only while the module executes, so they never shadow a
    real installation."""
    if reference in _loaded:
        return _loaded[reference]
    wheel = fetch_wheel(reference)
    try:
        source = zipfile.ZipFile(wheel).read(reference.module_path).decode("utf-8")
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ReferenceUnavailable(f"{wheel.name}: {exc}") from None
    stubs = _STUBS[reference]()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType(f"reference_{reference.requirement.split('==')[0]}_kv_events")
        # msgspec resolves the structs' annotations through the module's globals.
        sys.modules[module.__name__] = module
        exec(compile(source, reference.module_path, "exec"), module.__dict__)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    _loaded[reference] = module
    return module
