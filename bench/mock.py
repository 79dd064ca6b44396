"""The mock engine's own speed: blocks stored plus evicted per second, with its events
published through a real kvevents publisher (vLLM dialect) and with the cache alone, on the
Mooncake-like shape of `kvevents simulate` (16-token blocks, requests of 8,192 tokens that
share a 2,048-token prefix among 16, a cache of 16,384 blocks that keeps evicting)."""

from __future__ import annotations

import random
import time

from .stats import Figure

REQUESTS = 400
TOKENS = 8192
PREFIX = 2048


def _requests(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(150_000) for _ in range(PREFIX)] for _ in range(16)]
    return [
        prefixes[rng.randrange(16)] + [rng.randrange(150_000) for _ in range(TOKENS - PREFIX)]
        for _ in range(REQUESTS)
    ]


def _run(publish: bool, requests: list[list[int]]) -> float:
    from kvevents.mock import MockEngine, chained_hashes

    engine = MockEngine("vllm", capacity_blocks=16_384, publish=publish, hwm=1_000_000)
    try:
        hashes = [chained_hashes(r, 16) for r in requests]
        started = time.perf_counter()
        for tokens, request_hashes in zip(requests, hashes, strict=True):
            allocation = engine.admit(tokens, hashes=request_hashes)
            engine.step()
            if allocation is not None:
                engine.release(allocation)
        if publish:
            deadline = time.monotonic() + 60
            while engine.publisher.flushed_next_seq() is None and time.monotonic() < deadline:
                time.sleep(0.001)
        elapsed = time.perf_counter() - started
        return (engine.counters["stored"] + engine.counters["evicted"]) / elapsed
    finally:
        engine.close()


def measure(reps: int) -> dict[str, Figure]:
    requests = _requests(0)
    out = {"published": Figure("blocks/s"), "cache_only": Figure("blocks/s")}
    for _ in range(reps):
        out["published"].add(_run(True, requests))
        out["cache_only"].add(_run(False, requests))
    return out
