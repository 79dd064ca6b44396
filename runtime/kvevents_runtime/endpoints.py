"""Endpoint rules of the publisher: DP-rank offsets, bind or connect, bound-address read-back.

Where upstream is wrong this module fixes it, and says so:
- `tcp://0.0.0.0:N` binds (vLLM connects to it); `[::]` and `*` bind; a concrete IPv6 host
  such as `[fe80::1]` connects (vLLM's `"::" in endpoint` test would bind it).
- Port 0 is never offset, in every dialect: the OS picks a free port per rank (SGLang turns
  `:0` into `:rank`).
- An `ipc://` endpoint with rank > 0 gets the suffix `_dp{rank}`, as inproc does (upstream
  raises ValueError), so every rank has its own socket file.
- A tcp endpoint with port 0 always binds: there is nothing to connect to.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable

import zmq

from .errors import EndpointError

BIND_RETRY_SECONDS = 1.0
"""libzmq closes a listener asynchronously, so a publisher restarted on the same port can
find it still taken for a few milliseconds; a bind is retried this long before failing."""

_TCP = re.compile(r"^tcp://(?P<host>[^/]+):(?P<port>\d+)$")
WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "[::]", "::"})


def split_tcp(endpoint: str) -> tuple[str, int]:
    """`(host, port)` of a tcp endpoint; the host keeps IPv6 brackets."""
    match = _TCP.match(endpoint)
    if match is None:
        raise EndpointError(f"not a tcp endpoint with a port: {endpoint!r}")
    port = int(match["port"])
    if port > 65535:
        raise EndpointError(f"port out of range in {endpoint!r}")
    return match["host"], port


def check_endpoint(endpoint: str) -> None:
    """Raise EndpointError unless `endpoint` is tcp://host:port, ipc://path or inproc://name."""
    if endpoint.startswith("tcp://"):
        split_tcp(endpoint)
    elif endpoint.startswith(("ipc://", "inproc://")):
        if endpoint.endswith("//"):
            raise EndpointError(f"empty address in {endpoint!r}")
    else:
        raise EndpointError(
            f"unsupported endpoint {endpoint!r}: expected tcp://, ipc:// or inproc://"
        )


def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
    """The endpoint of DP rank `data_parallel_rank`: rank 0 unchanged, tcp port + rank,
    inproc and ipc names suffixed `_dp{rank}`, port 0 left for the OS."""
    if not endpoint or data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith(("inproc://", "ipc://")):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        host, port = split_tcp(endpoint)
        if port == 0:
            return endpoint
        return f"tcp://{host}:{port + data_parallel_rank}"
    raise EndpointError(f"Invalid endpoint {endpoint!r}: must be tcp://, ipc:// or inproc://")


def check_rank_ports(endpoint: str | None, replay_endpoint: str | None, rank: int) -> None:
    """Refuse a rank whose live port is a lower rank's replay port, or the other way round.

    Every rank r publishes on live port L + r and serves replay on R + r, so when the two
    base ports are closer than the number of ranks, rank r's live port is rank (r - (R - L))'s
    replay port. Lower ranks always exist, so that collision is certain; it is refused here,
    before any bind, with both ranks named.
    """
    if not endpoint or not replay_endpoint:
        return
    if not endpoint.startswith("tcp://") or not replay_endpoint.startswith("tcp://"):
        return
    live_host, live_base = split_tcp(endpoint)
    replay_host, replay_base = split_tcp(replay_endpoint)
    if live_base == 0 or replay_base == 0:
        return  # the OS picks distinct ports
    if live_host != replay_host and WILDCARD_HOSTS.isdisjoint({live_host, replay_host}):
        return  # different interfaces
    rule = (
        f"every rank r uses live port {live_base}+r and replay port {replay_base}+r, so with "
        "N data-parallel ranks the two base ports must be at least N apart"
    )
    if live_base == replay_base:
        raise EndpointError(f"live and replay endpoints share port {live_base}: {rule}")
    other = live_base - replay_base + rank
    if 0 <= other < rank:
        raise EndpointError(
            f"data-parallel rank {rank}'s live port {live_base + rank} is rank {other}'s replay port: {rule}"
        )
    other = replay_base - live_base + rank
    if 0 <= other < rank:
        raise EndpointError(
            f"data-parallel rank {rank}'s replay port {replay_base + rank} is rank {other}'s live port: {rule}"
        )


def node_ip_endpoint(endpoint: str, node_ip: Callable[[], str], hint: str) -> str:
    """A wildcard tcp endpoint with port 0 bound on this node's IP instead, so the endpoint
    read back is one a remote subscriber can dial; other endpoints unchanged. Refused when
    the node has no usable IP (`hint` says how to give one)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = split_tcp(endpoint)
    if port != 0 or host not in WILDCARD_HOSTS:
        return endpoint
    ip = node_ip()
    if ip in ("0.0.0.0", "::", ""):
        raise EndpointError(f"{endpoint} binds this node's IP, and none is known ({ip!r}): {hint}")
    return f"tcp://[{ip}]:0" if ":" in ip else f"tcp://{ip}:0"


def advertised(configured: str, bound: str) -> str:
    """`configured` unless it asked for port 0, in which case the bound endpoint."""
    if configured.startswith("tcp://") and split_tcp(configured)[1] == 0:
        return bound
    return configured


def should_bind(endpoint: str, bind: bool | None = None) -> bool:
    """Bind wildcards, port 0, ipc and inproc; connect to a concrete host. `bind` overrides."""
    if bind is not None:
        return bind
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host, port = split_tcp(endpoint)
    return port == 0 or host in WILDCARD_HOSTS


def is_ipv6(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return False
    host, _ = split_tcp(endpoint)
    return host.startswith("[") or host == "::"


def attach(socket: zmq.Socket, endpoint: str, bind: bool | None = None) -> str:
    """Bind or connect `socket`; return the real endpoint (port 0 resolved when bound)."""
    check_endpoint(endpoint)
    if is_ipv6(endpoint):
        socket.setsockopt(zmq.IPV6, 1)
    if endpoint.startswith("tcp://"):
        host, port = split_tcp(endpoint)
        if host == "::":
            endpoint = f"tcp://[::]:{port}"
    deadline = time.monotonic() + BIND_RETRY_SECONDS
    while True:
        try:
            if should_bind(endpoint, bind):
                socket.bind(endpoint)
                return socket.getsockopt_string(zmq.LAST_ENDPOINT)
            socket.connect(endpoint)
            return endpoint
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise EndpointError(f"cannot use {endpoint!r}: {exc.strerror}") from None


def connectable(endpoint: str) -> str:
    """A bound endpoint a local client can connect to: wildcard hosts become loopback."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = split_tcp(endpoint)
    if host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"tcp://[::1]:{port}"
    return endpoint
