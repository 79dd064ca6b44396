"""Prometheus collectors for a subscriber's and a publisher's counters (prometheus_client,
the `metrics` extra). They read the counters when scraped, so they cost nothing between
scrapes:

    from prometheus_client import REGISTRY
    REGISTRY.register(kvevents.SubscriberCollector(subscriber))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_GAUGES = frozenset({"queue_depth", "next_seq", "live_blocks"})
"""What can go down; every other counter of a publisher only grows."""


class SubscriberCollector(Collector):
    """`kvevents_subscriber_<stat>_total` for every entry of `subscriber.stats`, and per
    source its next expected seq, epoch, staleness, silence and whether it answers info."""

    def __init__(self, subscriber: Any, prefix: str = "kvevents_subscriber") -> None:
        self._subscriber = subscriber
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        sub, prefix = self._subscriber, self._prefix
        for name, value in sorted(sub.stats.items()):
            yield CounterMetricFamily(
                f"{prefix}_{name}", f"subscriber {name.replace('_', ' ')}", value=value
            )
        per_source = {
            "next_seq": (
                "next seq to deliver (-1 before joining)",
                lambda s: -1 if s.expected is None else s.expected,
            ),
            "epoch": ("publisher restarts seen", lambda s: s.epoch),
            "stale": ("1 while the source is silent past stale_after", lambda s: int(s.stale)),
            "seconds_since_message": (
                "seconds since the source last sent anything",
                lambda s: time.monotonic() - s.last_activity,
            ),
            "info_supported": (
                "1: answers info; 0: does not (restarts seen by seq only); -1: unknown yet",
                lambda s: -1 if s.info_supported is None else int(s.info_supported),
            ),
        }
        for name, (doc, read) in per_source.items():
            family = GaugeMetricFamily(
                f"{prefix}_source_{name}", doc, labels=["source", "endpoint"]
            )
            for source in sub.sources:
                family.add_metric([str(source.index), source.endpoint], read(source))
            yield family


class PublisherCollector(Collector):
    """`kvevents_publisher_<counter>` for every entry of `publisher.counters()`: counters as
    `_total`; the queue depth, next seq and live blocks (with snapshots) as gauges; labelled
    with the PUB endpoint."""

    def __init__(self, publisher: Any, prefix: str = "kvevents_publisher") -> None:
        self._publisher = publisher
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        endpoint = self._publisher.endpoint
        for name, value in sorted(self._publisher.counters().items()):
            kind = GaugeMetricFamily if name in _GAUGES else CounterMetricFamily
            family = kind(
                f"{self._prefix}_{name}", f"publisher {name.replace('_', ' ')}", labels=["endpoint"]
            )
            family.add_metric([endpoint], value)
            yield family
