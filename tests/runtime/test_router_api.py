"""What a router builds on: Prometheus metrics and the asyncio subscriber."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import kvevents
from kvevents import vllm

LOOPBACK = "tcp://127.0.0.1:0"


def _batch(n: int) -> vllm.KVEventBatch:
    return vllm.KVEventBatch(ts=float(n), events=[vllm.BlockRemoved(block_hashes=[n], medium=None)])


def test_prometheus_metrics_read_the_live_counters(publishers) -> None:
    prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra")
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    registry = prometheus_client.CollectorRegistry()
    with kvevents.Subscriber(publisher.connect_endpoint, publisher.connect_replay_endpoint) as sub:
        registry.register(kvevents.SubscriberCollector(sub))
        registry.register(kvevents.PublisherCollector(publisher))
        for n in range(5):
            publisher.publish(_batch(n))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sub.stats["delivered"] < 5:
            sub.poll(0.05)
        # The publisher thread writes its counters back after a chunk's sends, so a batch can
        # be delivered a moment before it is counted as published.
        while time.monotonic() < deadline and publisher.counters()["published"] < 5:
            time.sleep(0.01)
        text = prometheus_client.generate_latest(registry).decode()
    assert "kvevents_subscriber_delivered_total 5.0" in text
    assert 'kvevents_subscriber_source_next_seq{endpoint="' in text and "} 5.0" in text
    assert "kvevents_subscriber_source_info_supported{" in text
    assert f'kvevents_publisher_published_total{{endpoint="{publisher.endpoint}"}} 5.0' in text
    assert f'kvevents_publisher_next_seq{{endpoint="{publisher.endpoint}"}} 5.0' in text
    assert "# TYPE kvevents_publisher_next_seq gauge" in text
    assert re.search(r"^# TYPE kvevents_publisher_published(_total)? counter$", text, re.M)
    assert "live_blocks" not in text, "a publisher without snapshots keeps no block set"
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    values = [float(line.rsplit(" ", 1)[1]) for line in samples if "_total" in line]
    assert values and min(values) >= 0, "a counter below zero"


def test_a_publisher_with_snapshots_reports_its_live_blocks_as_a_gauge(publishers) -> None:
    prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra")
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK, snapshots=True)
    publishers.append(publisher)
    registry = prometheus_client.CollectorRegistry()
    registry.register(kvevents.PublisherCollector(publisher))
    stored = vllm.BlockStored(
        block_hashes=[1, 2],
        parent_block_hash=None,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    publisher.publish(vllm.KVEventBatch(ts=0.0, events=[stored]))
    removed = vllm.BlockRemoved(block_hashes=[1], medium="GPU")
    publisher.publish(vllm.KVEventBatch(ts=1.0, events=[removed]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and publisher.counters()["published"] < 2:
        time.sleep(0.01)
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE kvevents_publisher_live_blocks gauge" in text
    assert f'kvevents_publisher_live_blocks{{endpoint="{publisher.endpoint}"}} 1.0' in text


def test_the_asyncio_subscriber_keeps_the_contract(publishers) -> None:
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    for n in range(10):
        publisher.publish(_batch(n))

    async def main() -> list:
        got = []
        async with kvevents.aio.Subscriber(
            publisher.connect_endpoint, publisher.connect_replay_endpoint
        ) as sub:

            async def read() -> None:
                async for delivery in sub:
                    got.append(delivery)
                    if len(got) == 20:
                        return

            reader = asyncio.create_task(read())
            await asyncio.sleep(0.2)
            for n in range(10, 20):
                publisher.publish(_batch(n))
            await asyncio.wait_for(reader, 15)
            assert sub.stats["delivered"] == 20
        return got

    got = asyncio.run(main())
    assert [d.seq for d in got] == list(range(20))
    assert [d.batch.ts for d in got] == [float(n) for n in range(20)]


def test_a_source_with_a_bad_replay_endpoint_is_not_half_added(publishers) -> None:
    """The live socket is opened first; a replay endpoint that cannot be used must close it
    again, so the subscriber is left exactly as it was and the source can be added later."""
    publisher = vllm.ZmqEventPublisher(0, LOOPBACK, LOOPBACK)
    publishers.append(publisher)
    with kvevents.Subscriber(sources=[]) as sub:
        with pytest.raises(kvevents.EndpointError):
            sub.add_source(publisher.connect_endpoint, "udp://127.0.0.1:1")
        assert sub.sources == []
        sub.poll(0)  # no socket of the failed source is left in the poller
        source = sub.add_source(publisher.connect_endpoint, publisher.connect_replay_endpoint)
        assert [s.index for s in sub.sources] == [source.index]
