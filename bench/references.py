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
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
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


def _vllm_config() -> types.ModuleType:
    """vLLM's own `vllm/config/kv_events.py`, its `@config` decorator stubbed as what it is
    in vLLM: a pydantic dataclass with extra fields forbidden."""
    from pydantic import ConfigDict
    from pydantic.dataclasses import dataclass as pydantic_dataclass

    def config(cls: Any = None, **kwargs: Any) -> Any:
        def decorate(target: Any) -> Any:
            return pydantic_dataclass(target, config=ConfigDict(extra="forbid"))

        return decorate if cls is None else decorate(cls)

    return _exec(
        _read(VLLM, "vllm/config/kv_events.py"),
        "vllm/config/kv_events.py",
        "vllm.config.kv_events",
        {"vllm.config.utils": _stub("vllm.config.utils", config=config)},
    )


def _exec(
    source: str, path: str, name: str, stubs: dict[str, types.ModuleType]
) -> types.ModuleType:
    """Executes `source` as module `name` with `stubs` in sys.modules only meanwhile."""
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType(name)
        # msgspec and pydantic resolve annotations through the module's entry in sys.modules.
        sys.modules[name] = module
        exec(compile(source, path, "exec"), module.__dict__)
    finally:
        for key, previous in saved.items():
            if previous is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = previous
    return module


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
        "vllm.config.kv_events": _vllm_config(),
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


class _Parallel:
    """Stands in for SGLang's parallel state: the ranks `is_kv_publisher_rank` reads."""

    pp_rank = 0
    attn_tp_rank = 0
    attn_cp_rank = 0


def _sglang_network() -> types.ModuleType:
    """SGLang's own `sglang/srt/utils/network.py` (its NetworkAddress parser), executed from
    the wheel with `psutil`, which only its port helpers use, stubbed."""
    path = "sglang/srt/utils/network.py"
    return _exec(_read(SGLANG, path), path, "reference_sglang_network", {"psutil": _stub("psutil")})


def _sglang_stubs() -> dict[str, types.ModuleType]:
    return {
        "sglang": _stub("sglang"),
        "sglang.srt": _stub("sglang.srt"),
        "sglang.srt.runtime_context": _stub(
            "sglang.srt.runtime_context", get_parallel=lambda: _Parallel()
        ),
        "sglang.srt.utils": _stub("sglang.srt.utils"),
        "sglang.srt.utils.network": _sglang_network(),
    }


_STUBS = {VLLM: _vllm_stubs, SGLANG: _sglang_stubs}
_loaded: dict[Reference, types.ModuleType] = {}


def _read(reference: Reference, path: str) -> str:
    wheel = fetch_wheel(reference)
    try:
        return zipfile.ZipFile(wheel).read(path).decode("utf-8")
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ReferenceUnavailable(f"{wheel.name}: {exc}") from None


def load(reference: Reference) -> types.ModuleType:
    """The producer's kv_events module, executed from its wheel with its imports stubbed.

    The stubs are in `sys.modules` only while the module executes, so they never shadow a
    real installation."""
    if reference not in _loaded:
        stubs = _STUBS[reference]()
        name = f"reference_{reference.requirement.split('==')[0]}_kv_events"
        module = _exec(_read(reference, reference.module_path), reference.module_path, name, stubs)
        module.__dict__["_reference_stubs"] = stubs
        _loaded[reference] = module
    return _loaded[reference]


def install(reference: Reference) -> types.ModuleType:
    """Makes the producer's own import paths resolve to its loaded module (and the stubs it
    was loaded with), for running the producer's tests against it unchanged. For a process
    of its own: the entries stay in sys.modules."""
    module = load(reference)
    entries = dict(module.__dict__["_reference_stubs"])
    dotted = reference.module_path.removesuffix(".py").replace("/", ".")
    entries[dotted] = module
    parts = dotted.split(".")
    for depth in range(1, len(parts)):
        entries.setdefault(".".join(parts[:depth]), _stub(".".join(parts[:depth])))
    for key, value in sorted(entries.items()):
        sys.modules[key] = value
        parent, _, leaf = key.rpartition(".")
        if parent in entries:
            setattr(entries[parent], leaf, value)
    return module


def fetch_sdist(reference: Reference) -> Path:
    """The producer's source distribution (its tests and examples are there, not in the
    wheel), cached in .cache/sdists. Found through pip's own index configuration with pip's
    finder, because `pip download` would build the sdist's metadata (vLLM's needs torch)."""
    project, version = reference.requirement.split("==")
    cache = CACHE.parent / "sdists"
    found = sorted(cache.glob(f"{project}-{version}.tar.gz"))
    if found:
        return found[0]
    try:
        from pip._internal.configuration import Configuration
        from pip._internal.index.collector import LinkCollector
        from pip._internal.index.package_finder import PackageFinder
        from pip._internal.models.index import PyPI
        from pip._internal.models.search_scope import SearchScope
        from pip._internal.models.selection_prefs import SelectionPreferences
        from pip._internal.network.session import PipSession

        configuration = Configuration(isolated=False)
        configuration.load()
        index = dict(configuration.items()).get("global.index-url") or PyPI.simple_url
        session = PipSession()
        scope = SearchScope.create(find_links=[], index_urls=[str(index)], no_index=False)
        finder = PackageFinder.create(
            link_collector=LinkCollector(session=session, search_scope=scope),
            selection_prefs=SelectionPreferences(allow_yanked=False),
        )
        links = [
            c.link
            for c in finder.find_all_candidates(project)
            if str(c.version) == version and c.link.filename.endswith(".tar.gz")
        ]
        if not links:
            raise ReferenceUnavailable(
                f"no source distribution of {reference.requirement} on the index"
            )
        response = session.get(links[0].url_without_fragment, timeout=300)
        response.raise_for_status()
    except ReferenceUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - pip's internals or the network: say which and skip
        raise ReferenceUnavailable(
            f"{reference.requirement} sdist: {type(exc).__name__}: {exc}"
        ) from None
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / links[0].filename
    target.write_bytes(response.content)
    return target
