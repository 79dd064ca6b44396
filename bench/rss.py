"""Peak resident memory of a publisher process over a long run, in a fresh process per
publisher so no other measurement's memory is counted."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

from .child import run_in_child
from .stats import rss_kib

SAMPLES = 10


def _run(key: str, n: int, conn: Connection) -> None:
    from .impls import endpoints, load_impls
    from .shapes import batch_pool

    impl = load_impls()[key]
    pool = batch_pool("a", impl.structs, 1000)
    live, _ = endpoints("tcp")
    replay, _ = endpoints("tcp")
    # kvevents drops on a full queue by default; for this run it waits like the references'
    # blocking Queue.put, so all n batches go through.
    publisher = impl.make(live, replay, queue_full_policy="block", block_timeout=5.0)
    samples: list[tuple[int, int]] = []
    step = n // SAMPLES
    start = time.monotonic()
    try:
        publish = publisher.publish
        for i in range(n):
            publish(pool[i % 1000])
            if (i + 1) % step == 0:
                samples.append((i + 1, rss_kib()))
        while not impl.done(publisher, n):
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        dropped = (
            sum(v for k, v in publisher.counters().items() if k.startswith("dropped"))
            if impl.ours
            else 0
        )
    finally:
        impl.close(publisher)
    conn.send(
        {
            "samples_kib": samples,
            "peak_kib": rss_kib("VmHWM"),
            "seconds": elapsed,
            "dropped": dropped,
        }
    )


def peak_rss(key: str, n: int) -> dict[str, Any]:
    result = run_in_child(_run, (key, n), 600, f"{key}: {n} batches")
    samples = [kib for _, kib in result["samples_kib"]]
    # Growth after the first tenth: the buffer and the queue have filled by then.
    result["growth_kib"] = max(samples) - samples[0] if samples else None
    return result
