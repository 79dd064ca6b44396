"""Replay latency: a full buffer of shape (a) batches, asked for from 0, for the last 5 and
for a seq past the end, each timed from request to END marker by the agent process."""

from __future__ import annotations

import time
from typing import Any

from .agent import Agent
from .impls import Impl, endpoints
from .shapes import batch_pool, cycle


def cases(size: int) -> list[tuple[str, int]]:
    return [("from 0", 0), ("last 5", size - 5), ("past end", size + 100)]


def replay_latency(agent: Agent, impl: Impl, size: int, reps: int) -> dict[str, Any]:
    live_bind, _ = endpoints("tcp")
    replay_bind, replay_connect = endpoints("tcp")
    publisher = impl.make(live_bind, replay_bind, buffer_steps=size)
    try:
        for batch in cycle(batch_pool("a", impl.structs, min(size, 1000)), size):
            publisher.publish(batch)
        deadline = time.monotonic() + 60
        while not impl.done(publisher, size):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{impl.label} did not publish {size} batches within 60 s")
            time.sleep(0.01)
        agent.send(op="replay", endpoint=replay_connect, cases=cases(size), reps=reps)
        results = agent.recv()["results"]
    finally:
        impl.close(publisher)
    return {label: [(t, n) for t, n in runs] for label, runs in results.items()}
