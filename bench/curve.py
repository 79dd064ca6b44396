"""CURVE against plain on kvevents' own hops, same run, same machine (issue 23's goal: within
10%). Three figures per mode, each the median over the repetitions:

- the publisher thread's CPU per batch (what an engine pays);
- end to end: publish() as fast as the caller can, to the last batch received by a bare SUB
  in the agent process (its rate);
- the subscriber: a kvevents `Subscriber` in the agent draining a backlog sent before it is
  told to start (its own delivered rate).

Both ends use 127.0.0.1 over tcp (CURVE is per connection). The keys are fresh per run; the
publisher's allow-list holds the agent's key.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import shapes
from .agent import Agent
from .impls import TOPIC, free_port
from .live import handshake
from .stats import Figure, thread_cpu

SHAPE = "b"
MODES = ("plain", "curve")
FLUSH_TIMEOUT = 60.0


def _keys(folder: Path) -> dict[str, str]:
    from kvevents import make_keys

    server_public, server_secret = make_keys(folder / "server", "publisher")
    client_public, client_secret = make_keys(folder / "client", "subscriber")
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / client_public.name).write_bytes(client_public.read_bytes())
    return {
        "server_secret": str(server_secret),
        "server_public": str(server_public),
        "client_secret": str(client_secret),
        "allowed": str(allowed),
    }


@contextmanager
def _server_env(keys: dict[str, str] | None) -> Iterator[None]:
    """The vLLM face reads CURVE from the environment (its config class has no field for it),
    as an engine would be configured."""
    from kvevents_runtime.security import ENV_ALLOWED_CLIENTS, ENV_SERVER_SECRET

    if keys is None:
        yield
        return
    os.environ[ENV_SERVER_SECRET] = keys["server_secret"]
    os.environ[ENV_ALLOWED_CLIENTS] = keys["allowed"]
    try:
        yield
    finally:
        del os.environ[ENV_SERVER_SECRET], os.environ[ENV_ALLOWED_CLIENTS]


def _publisher(keys: dict[str, str] | None, endpoint: str, **options: Any) -> Any:
    from kvevents import vllm

    with _server_env(keys):
        return vllm.ZmqEventPublisher(
            0, endpoint=endpoint, replay_endpoint=None, topic=TOPIC, bind=True, **options
        )


def _client(keys: dict[str, str] | None) -> tuple[str, str] | None:
    return None if keys is None else (keys["client_secret"], keys["server_public"])


def end_to_end(agent: Agent, keys: dict[str, str] | None, batches: list[Any]) -> dict[str, Any]:
    port = free_port()
    publisher = _publisher(keys, f"tcp://127.0.0.1:{port}")
    n = len(batches)
    try:
        agent.send(op="count", endpoint=f"tcp://127.0.0.1:{port}", topic=TOPIC, curve=_client(keys))
        publish = publisher.publish
        first = handshake(agent, lambda: publish(batches[0]))
        agent.send(first=first, n=n)
        thread = publisher._thread
        cpu0 = thread_cpu(thread)
        t0 = time.monotonic()
        for batch in batches:
            publish(batch)
        reply = agent.recv()
        cpu1 = thread_cpu(thread)
    finally:
        publisher.shutdown()
    elapsed = reply["t_last"] - t0 if reply["t_last"] is not None else None
    return {
        "batches_per_s": reply["received"] / elapsed if elapsed else None,
        "thread_cpu_us": (cpu1 - cpu0) / n * 1e6,
        "dropped": n - reply["received"],
    }


def delivered(agent: Agent, keys: dict[str, str] | None, batches: list[Any]) -> dict[str, Any]:
    port = free_port()
    n = len(batches)
    # Nothing may be dropped while the backlog waits: no high-water mark, a queue for all.
    publisher = _publisher(keys, f"tcp://127.0.0.1:{port}", hwm=0, max_queue_size=n + 10_000)
    try:
        agent.send(
            op="deliver",
            endpoint=f"tcp://127.0.0.1:{port}",
            topic=TOPIC,
            consumer="kvevents",
            curve=_client(keys),
        )
        first = handshake(agent, lambda: publisher.publish(batches[0]))
        for batch in batches:
            publisher.publish(batch)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while publisher.flushed_next_seq() != first + n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the publisher did not send its backlog in {FLUSH_TIMEOUT} s")
            time.sleep(0.01)
        agent.send(first=first, n=n)
        reply = agent.recv()
    finally:
        publisher.shutdown()
    elapsed = reply["elapsed"]
    return {
        "batches_per_s": reply["received"] / elapsed if elapsed else None,
        "dropped": n - reply["received"],
    }


def measure(agent: Agent, reps: int, count: int) -> dict[str, Any]:
    from kvevents import vllm

    batches = shapes.cycle(shapes.batch_pool(SHAPE, vllm, 1000), count)
    out: dict[str, Any] = {"batches": count, "shape": shapes.SHAPES[SHAPE], "dropped": 0}
    for mode in MODES:
        out[mode] = {
            "thread_cpu_us": Figure("µs"),
            "end_to_end_per_s": Figure("batches/s"),
            "subscriber_per_s": Figure("batches/s"),
        }
    with tempfile.TemporaryDirectory(prefix="kvevents-bench-curve-") as folder:
        keys = _keys(Path(folder))
        for _ in range(reps):
            for mode in MODES:
                mode_keys = keys if mode == "curve" else None
                live = end_to_end(agent, mode_keys, batches)
                backlog = delivered(agent, mode_keys, batches)
                out[mode]["thread_cpu_us"].add(live["thread_cpu_us"])
                out[mode]["end_to_end_per_s"].add(live["batches_per_s"])
                out[mode]["subscriber_per_s"].add(backlog["batches_per_s"])
                out["dropped"] += int(live["dropped"] + backlog["dropped"])
    return out
