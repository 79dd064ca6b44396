"""SGLang's helpers around its kv-events module: publisher-rank selection, the load
publisher's port range, endpoint parsing and the "dynamo" hash namespace."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

import msgspec

LOAD_TOPIC = "load"
"""Topic of SGLang's load publisher (advertised as `load_topic`)."""

_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::"})
_NAMESPACE_TAG = b"sglang-kv-event-namespace-v1"


class OffloadedState(msgspec.Struct):
    """Decode-side offload progress of one request (SGLang's decode KV-cache offload)."""

    inc_len: int = 0
    last_hash: str | None = None


def select_kv_publisher_dp_rank(attn_dp_size: int, attn_dp_rank: int, dp_rank: int | None) -> int:
    """The rank that offsets a scheduler's publisher ports: the attention-DP rank when
    attention is data parallel, else the DP replica index (0 when unset)."""
    return attn_dp_rank if attn_dp_size > 1 else (dp_rank or 0)


def is_kv_publisher_rank(kv_events_config: str | None) -> bool:
    """Whether this scheduler publishes: events configured, and pipeline, attention-TP and
    attention-CP rank all 0. Reads SGLang's parallel state, so it runs inside SGLang only."""
    if not kv_events_config:
        return False
    from sglang.srt.runtime_context import get_parallel  # type: ignore[import-not-found]

    parallel = get_parallel()
    return parallel.pp_rank == 0 and parallel.attn_tp_rank == 0 and parallel.attn_cp_rank == 0


def _host_port(endpoint: str | None) -> tuple[str, int, bool] | None:
    """`(host, port, is_ipv6)` of `tcp://host:port`; IPv6 must be bracketed. None otherwise."""
    if not endpoint or not endpoint.startswith("tcp://"):
        return None
    address = endpoint[len("tcp://") :]
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":") or not _is_ipv6(host):
            return None
        port_text, ipv6 = rest[1:], True
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon or not host or _is_ipv6(host):
            return None
        ipv6 = False
    try:
        port = int(port_text)  # as SGLang parses it, so "+80" and " 80" are ports too
    except ValueError:
        return None
    if not 0 <= port <= 65535:
        return None
    return host, port, ipv6


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).version == 6
    except ValueError:
        return False


def parse_tcp_port(endpoint: str | None) -> int | None:
    """The port (1-65535) of a tcp:// endpoint whatever its host, else None."""
    parsed = _host_port(endpoint)
    return parsed[1] if parsed and 0 < parsed[1] <= 65535 else None


def parse_advertisable_tcp(endpoint: str | None) -> tuple[str, int] | None:
    """`(host, port)` of a tcp:// endpoint a consumer can be told about (IPv6 host
    re-bracketed), else None."""
    parsed = _host_port(endpoint)
    if parsed is None or not 0 < parsed[1] <= 65535:
        return None
    host, port, ipv6 = parsed
    return (f"[{host}]" if ipv6 else host), port


def parse_bindable_tcp(endpoint: str | None) -> tuple[str, int] | None:
    """`(host, port)` when a PUB socket would bind this tcp:// endpoint (a wildcard host),
    else None: a concrete host is connected to."""
    parsed = _host_port(endpoint)
    if parsed is None or parsed[0] not in _WILDCARD_HOSTS or not 0 < parsed[1] <= 65535:
        return None
    return parsed[0], parsed[1]


def _overlaps(base: int, other: int, size: int) -> bool:
    return base < other + size and other < base + size


def resolve_load_pub_range(
    *,
    kv_endpoint: str | None,
    replay_endpoint: str | None,
    dp_size: int,
    load_publish_endpoint: str | None = None,
) -> tuple[tuple[str, int] | None, str | None]:
    """`((host, base port), None)` for SGLang's load publisher range (rank r binds base + r),
    or `(None, reason)`; `(None, None)` when the feature is off (unset or "off").

    "auto" packs the range right after the KV-event range, or after the replay range when
    those would overlap; an explicit tcp:// address must be bindable and clear both ranges.
    """
    mode = (load_publish_endpoint or "").strip()
    if dp_size < 1 or not mode or mode.lower() == "off":
        return None, None
    if mode.lower() == "auto":
        bindable = parse_bindable_tcp(kv_endpoint)
        if bindable is None:
            why = (
                "--kv-events-config is not set"
                if kv_endpoint is None
                else f"{kv_endpoint!r} is not one"
            )
            return None, (
                "--load-publish-endpoint=auto needs a bindable wildcard-host tcp:// "
                f"--kv-events-config endpoint to pack after; {why}"
            )
        host, kv_base = bindable
        base = kv_base + dp_size
        replay_base = parse_tcp_port(replay_endpoint)
        if replay_base is not None and _overlaps(base, replay_base, dp_size):
            base = replay_base + dp_size
    else:
        if parse_tcp_port(kv_endpoint) is None:
            absent = (
                "without --kv-events-config"
                if kv_endpoint is None
                else f"for endpoint {kv_endpoint!r}"
            )
            return None, (
                f"--load-publish-endpoint={mode!r} needs a routable tcp:// --kv-events-config "
                "endpoint: routers discover the load range through /server_info's kv_events "
                f"block, absent {absent}, so the socket would be bound but never advertised"
            )
        bindable = parse_bindable_tcp(mode)
        if bindable is None:
            return None, (
                f"--load-publish-endpoint={mode!r} is not a bindable tcp:// address "
                "(a concrete host would be connected to, not bound)"
            )
        host, base = bindable
        for port in (parse_tcp_port(kv_endpoint), parse_tcp_port(replay_endpoint)):
            if port is not None and _overlaps(base, port, dp_size):
                return None, (
                    f"--load-publish-endpoint range [{base}, {base + dp_size}) overlaps the "
                    f"kv-events range [{port}, {port + dp_size})"
                )
    if base + dp_size - 1 > 65535:
        return None, f"load port range from {base} would run past the u16 ceiling"
    return (host, base), None


def kv_event_namespace_seed(*, extra_key: str | None, cache_salt: str | None) -> bytes | None:
    """The seed of `namespaced_block_hash` for a request's extra key and cache salt; None
    when it has neither. Each part is a presence byte, then an 8-byte little-endian length
    and the UTF-8 text, so ("a", "bc") and ("ab", "c") differ."""
    if extra_key is None and cache_salt is None:
        return None
    digest = hashlib.sha256(_NAMESPACE_TAG)
    for part in (extra_key, cache_salt):
        if part is None:
            digest.update(b"\x00")
        else:
            text = part.encode("utf-8")
            digest.update(b"\x01" + len(text).to_bytes(8, "little") + text)
    return digest.digest()


def namespaced_block_hash(block_hash: int, *, namespace_seed: bytes | None) -> int:
    """`block_hash` itself without a seed; else the first 8 bytes of SHA-256(seed, the hash
    as 8 signed big-endian bytes), read as a signed int64."""
    if namespace_seed is None:
        return block_hash
    digest = hashlib.sha256(namespace_seed + block_hash.to_bytes(8, "big", signed=True)).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def uses_dynamo_format(kv_events_config: str | None) -> bool:
    """Whether the `--kv-events-config` JSON asks for the "dynamo" hash format."""
    if not kv_events_config:
        return False
    config: Any = msgspec.json.decode(kv_events_config)  # a msgspec.DecodeError is a ValueError
    if not isinstance(config, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    value = config.get("format", "default")
    if value not in ("default", "dynamo"):
        raise ValueError(f"format: Input should be 'default' or 'dynamo', got {value!r}")
    return bool(value == "dynamo")
