"""Live-stream measurements: end to end through a subscriber process, and that process's own
delivered rate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .agent import Agent
from .impls import TOPIC, Impl, RawSender, endpoints
from .stats import thread_cpu

HANDSHAKE_TIMEOUT = 10.0


def handshake(agent: Agent, publish_one: Callable[[], None]) -> int:
    """Publishes warm-up batches until the agent has seen one; returns how many were sent,
    which is the first timed seq."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    sent = 0
    while not agent.poll(0.002):
        publish_one()
        sent += 1
        if time.monotonic() > deadline:
            raise TimeoutError("the subscriber process saw no warm-up batch")
    agent.recv()
    return sent


def end_to_end(agent: Agent, impl: Impl, transport: str, batches: list[Any]) -> dict[str, Any]:
    """`len(batches)` publish() calls as fast as the caller can make them, until the
    subscriber process has received the last one."""
    bind, connect = endpoints(transport)
    replay_bind, _ = endpoints(transport)
    publisher = impl.make(bind, replay_bind)
    n = len(batches)
    try:
        agent.send(op="count", endpoint=connect, topic=TOPIC)
        publish = publisher.publish
        first = handshake(agent, lambda: publish(batches[0]))
        agent.send(first=first, n=n)
        thread = impl.thread(publisher)
        thread_cpu0 = thread_cpu(thread)
        t0 = time.monotonic()
        cpu0 = time.thread_time()
        for batch in batches:
            publish(batch)
        cpu1 = time.thread_time()
        t1 = time.monotonic()
        reply = agent.recv()
        thread_cpu1 = thread_cpu(thread)
    finally:
        impl.close(publisher)
    return _live_result(n, reply, t0, t1, cpu1 - cpu0) | {
        "thread_cpu_us": (thread_cpu1 - thread_cpu0) / n * 1e6,
    }


def raw_end_to_end(
    agent: Agent, transport: str, payloads: list[bytes], n: int, unwrapped: bool
) -> dict[str, Any]:
    """The floor: pre-encoded frames, per-frame send, from the caller's thread."""
    bind, connect = endpoints(transport)
    sender = RawSender(bind, payloads, unwrapped=unwrapped)
    try:
        agent.send(op="count", endpoint=connect, topic=TOPIC)
        first = handshake(agent, sender.send_one)
        sender.prepare(n)
        agent.send(first=first, n=n)
        t0 = time.monotonic()
        cpu0 = time.thread_time()
        sender.send_prepared()
        cpu1 = time.thread_time()
        t1 = time.monotonic()
        reply = agent.recv()
    finally:
        sender.close()
    return _live_result(n, reply, t0, t1, cpu1 - cpu0)


def _live_result(n: int, reply: dict[str, Any], t0: float, t1: float, cpu: float) -> dict[str, Any]:
    received = reply["received"]
    elapsed = (reply["t_last"] - t0) if reply["t_last"] is not None else None
    return {
        "batches_per_s": received / elapsed if elapsed else None,
        "received": received,
        "dropped": n - received,
        "in_order": reply["in_order"],
        "publish_wall_us": (t1 - t0) / n * 1e6,
        "publish_cpu_us": cpu / n * 1e6,
    }


def delivered_rate(
    agent: Agent, consumer: str, transport: str, payloads: list[bytes], n: int
) -> dict[str, Any]:
    """The consumer drains a backlog of `n` batches sent before it is told to start: its
    rate, not the sender's, is what is timed."""
    bind, connect = endpoints(transport)
    # Nothing may be dropped while the backlog waits: no high-water mark on either side.
    sender = RawSender(bind, payloads, hwm=0)
    try:
        agent.send(op="deliver", endpoint=connect, topic=TOPIC, consumer=consumer)
        first = handshake(agent, sender.send_one)
        sender.prepare(n)
        sender.send_prepared()
        agent.send(first=first, n=n)
        reply = agent.recv()
    finally:
        sender.close()
    elapsed = reply["elapsed"]
    return {
        "batches_per_s": reply["received"] / elapsed if elapsed else None,
        "received": reply["received"],
        "dropped": n - reply["received"],
        "in_order": reply["in_order"],
    }
