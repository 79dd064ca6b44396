"""Interop with the real SGLang 0.5.23 publisher, loaded from its wheel at run time.

The wheel is fetched by `bench.references` (the loader `nox -s bench` uses) into .cache/wheels
(never committed); only `sglang/srt/disaggregation/kv_events.py` is loaded, with its two
package-internal imports stubbed. Skipped, with the reason, when the wheel cannot be fetched."""

from __future__ import annotations

import time

import pytest

from bench.references import SGLANG, ReferenceUnavailable, load
from kvevents import Subscriber


def load_reference_sglang():
    try:
        return load(SGLANG)
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.interop
def test_subscriber_consumes_the_real_sglang_publisher():
    ref = load_reference_sglang()
    publisher = ref.ZmqEventPublisher(
        0, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, topic="kv"
    )
    try:
        live = publisher._local_pub_endpoint
        replay = publisher._local_replay_endpoint
        for n in range(40):
            publisher.publish(
                ref.KVEventBatch(
                    ts=float(n),
                    events=[
                        ref.BlockStored(
                            block_hashes=[-n - 1],
                            parent_block_hash=None,
                            token_ids=[(1, 2), (2, 3)] if n % 2 else [1, 2],
                            block_size=2,
                            lora_id=None,
                            medium=ref.StorageMedium.CPU,
                            cache_salt="tenant",
                        )
                    ],
                )
            )
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
