"""vLLM's helpers around its events: the connector event containers and the node-IP lookup
behind `tcp://*:0`."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

logger = logging.getLogger("kvevents.vllm")
_warned: list[bool] = []


class KVEventAggregator:
    """Counts events reported by several workers; an event every worker reported is common.

    Events must be hashable (vLLM's structs are). As upstream, a worker that reports the
    same event twice counts twice."""

    __slots__ = ("_counts", "_workers")

    def __init__(self, num_workers: int) -> None:
        if num_workers <= 0:
            raise ValueError("num_workers must be greater than zero.")
        self._counts: Counter[Any] = Counter()
        self._workers = num_workers

    def add_events(self, events: list[Any]) -> None:
        if not isinstance(events, list):
            raise TypeError("events must be a list of KVCacheEvent.")
        self._counts.update(events)

    def get_common_events(self) -> list[Any]:
        """The events reported exactly once per worker, in first-seen order."""
        return [event for event, seen in self._counts.items() if seen == self._workers]

    def get_all_events(self) -> list[Any]:
        """Every reported event, each as many times as it was reported."""
        return list(self._counts.elements())

    def clear_events(self) -> None:
        self._counts.clear()

    def increment_workers(self, count: int = 1) -> None:
        if count <= 0:
            raise ValueError("count must be positive.")
        self._workers += count

    def reset_workers(self) -> None:
        self._workers = 1

    def get_number_of_workers(self) -> int:
        return self._workers

    def __repr__(self) -> str:
        return f"<KVEventAggregator workers={self._workers}, events={len(self._counts)}>"


class KVConnectorKVEvents(ABC):
    """The container a KV connector hands its events over in."""

    @abstractmethod
    def add_events(self, events: list[Any]) -> None:
        raise NotImplementedError

    @abstractmethod
    def aggregate(self) -> KVConnectorKVEvents:
        raise NotImplementedError

    @abstractmethod
    def increment_workers(self, count: int = 1) -> None:
        raise NotImplementedError

    @abstractmethod
    def get_all_events(self) -> list[Any]:
        raise NotImplementedError

    @abstractmethod
    def get_number_of_workers(self) -> int:
        raise NotImplementedError

    @abstractmethod
    def clear_events(self) -> None:
        raise NotImplementedError

    def merge(self, other: KVConnectorKVEvents) -> KVConnectorKVEvents:
        self.add_events(other.get_all_events())
        return self


def get_ip() -> str:
    """This node's IP, as `tcp://*:0` is bound and advertised: `VLLM_HOST_IP` when set (the
    override hook, as in vLLM), else the first address the host name resolves to, a
    non-loopback one first, else "0.0.0.0", which the publisher refuses. Unlike vLLM it
    never opens a socket towards a public address to find the default route, so a host whose
    name resolves to loopback only advertises loopback (logged): set VLLM_HOST_IP there."""
    configured = os.environ.get("VLLM_HOST_IP", "").strip()
    if configured:
        return configured
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return "0.0.0.0"
    addresses = [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    routable = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if routable:
        return routable[0]
    if addresses:
        if not _warned:
            _warned.append(True)
            logger.warning(
                "kvevents: %s resolves to loopback only; advertising %s (set VLLM_HOST_IP)",
                socket.gethostname(),
                addresses[0],
            )
        return addresses[0]
    return "0.0.0.0"
