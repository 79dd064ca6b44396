"""`kvevents demo`: the whole event plane on loopback, with a gap and a restart repaired.

A producer thread plays a scheduler: prompts that share a system prefix store chains of
blocks, old blocks are evicted, and the cache is cleared once. The subscriber reads in the
main thread with small pipes and small kernel socket buffers, and stalls once while the
producer publishes a burst, so the PUB socket drops batches (a real gap that replay
repairs); half-way the publisher is shut down and a new one starts on the same ports, so the
seq restarts at 0 (a reset). Runs of 4,000 batches or more show both in every run.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    Notice,
    Subscriber,
    stable_port,
)

BLOCK_SIZE = 16
HWM = 200
SOCKET_BUFFER = 16_384
"""Kernel send and receive buffer of every demo socket, in bytes."""
STALL_BURST = 3_000
"""Batches published while the subscriber stalls: far more than its pipes (2 x HWM) and
the small kernel buffers hold (a few hundred of these batches)."""
STALL_MIN_BATCHES = 2_000
"""An epoch this long or longer has a stall: a quarter of it, then the burst."""


@dataclass
class _Totals:
    published: list[int] = field(default_factory=lambda: [0, 0])
    finished: list[bool] = field(default_factory=lambda: [False, False])
    caught_up: list[threading.Event] = field(
        default_factory=lambda: [threading.Event(), threading.Event()]
    )
    events: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    joined: threading.Event = field(default_factory=threading.Event)
    """The subscriber has its first batch: the producer stops pacing."""
    stall_requested: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    """The subscriber stopped reading: the producer's burst now overflows the pipes."""
    burst_done: threading.Event = field(default_factory=threading.Event)
    stall_at: int = -1
    """The seq the producer had reached when the subscriber stopped reading."""
    burst: int = 0


class SyntheticScheduler:
    """Block stores that share prefixes, evictions and one clear, with stable hashes."""

    def __init__(self, seed: int = 7, signed: bool = False) -> None:
        self._rng = random.Random(seed)
        self._signed = signed
        self._system_prompts = [
            [self._rng.randrange(32_000) for _ in range(BLOCK_SIZE * 4)] for _ in range(3)
        ]
        self._resident: list[int | bytes] = []

    def _hash(self, parent: int | None, tokens: list[int]) -> int:
        digest = hashlib.blake2b(repr((parent, tokens)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=self._signed)

    def step(
        self, index: int, clear_at: int
    ) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
        if index == clear_at:
            self._resident.clear()
            return [AllBlocksCleared()]
        prompt = self._rng.choice(self._system_prompts) + [
            self._rng.randrange(32_000) for _ in range(BLOCK_SIZE * self._rng.randint(1, 3))
        ]
        parent: int | None = None
        hashes: list[int | bytes] = []
        for start in range(0, len(prompt), BLOCK_SIZE):
            parent = self._hash(parent, prompt[start : start + BLOCK_SIZE])
            hashes.append(parent)
        shared = 4  # the system prompt's blocks are usually resident already
        events: list[BlockStored | BlockRemoved | AllBlocksCleared] = [
            BlockStored(
                block_hashes=hashes[shared:],
                parent_block_hash=hashes[shared - 1],
                token_ids=prompt[shared * BLOCK_SIZE :],
                block_size=BLOCK_SIZE,
                medium="GPU",
            )
        ]
        self._resident.extend(hashes[shared:])
        if len(self._resident) > 512:
            evicted, self._resident = self._resident[:64], self._resident[64:]
            events.append(BlockRemoved(block_hashes=evicted, medium="GPU"))
        return events


def _produce(
    dialect: str,
    live: str,
    replay: str,
    batches: int,
    totals: _Totals,
    ready: threading.Event,
    reset_seen: threading.Event,
    context: zmq.Context,
) -> None:
    from importlib import import_module

    module = import_module(f"kvevents.{dialect}")
    scheduler = SyntheticScheduler(signed=dialect != "vllm")
    halves = (batches // 2, batches - batches // 2)
    try:
        for epoch, count in enumerate(halves):
            publisher = module.ZmqEventPublisher(
                0,
                endpoint=live,
                replay_endpoint=replay,
                hwm=HWM,
                buffer_steps=max(batches, 1),
                bind=True,
                context=context,
            )
            if epoch == 0:
                ready.set()
            # The wire has no epoch and ZeroMQ connects late (the slow joiner): step at a
            # scheduler's pace until the subscriber has the stream (epoch 0) or has seen the
            # restart (epoch 1), then at full speed.
            settled = totals.joined if epoch == 0 else reset_seen
            stall_at = count // 4 if epoch == 0 and count >= STALL_MIN_BATCHES else -1
            clear_at = count // 2 if epoch == 1 else -1
            with publisher:
                for index in range(count):
                    if index == stall_at:
                        _burst_while_stalled(publisher, scheduler, count - index, totals)
                        break
                    _publish(publisher, scheduler, index, clear_at, epoch, totals)
                    if not settled.is_set():
                        settled.wait(0.002)
                    elif index % 64 == 0:
                        time.sleep(0)  # let the subscriber's thread run, as a scheduler step would
                totals.finished[epoch] = True
                # Stop only once the subscriber holds this publisher's whole stream: a real
                # restart loses what nobody received, and the demo shows what is repaired.
                totals.caught_up[epoch].wait(60)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        totals.error = exc
        ready.set()
    finally:
        totals.burst_done.set()
        totals.done.set()


def _publish(
    publisher: Any,
    scheduler: SyntheticScheduler,
    index: int,
    clear_at: int,
    epoch: int,
    totals: _Totals,
) -> None:
    events = scheduler.step(index, clear_at)
    publisher.publish(KVEventBatch(ts=time.time(), events=events))
    totals.published[epoch] += 1
    totals.events += len(events)


def _burst_while_stalled(
    publisher: Any, scheduler: SyntheticScheduler, remaining: int, totals: _Totals
) -> None:
    """Ask the subscriber to stop reading, publish at full speed while it does (the PUB socket
    drops what its pipe and the small kernel buffers cannot hold), then publish the rest of
    the epoch as usual."""
    totals.stall_requested.set()
    totals.stalled.wait(30)
    totals.stall_at = totals.published[0]
    burst = min(STALL_BURST, remaining)
    for index in range(totals.published[0], totals.published[0] + burst):
        _publish(publisher, scheduler, index, -1, 0, totals)
    totals.burst = burst
    # Until the publisher thread has sent the burst, the PUB has dropped nothing yet.
    deadline = time.monotonic() + 10
    while publisher.flushed_next_seq() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    totals.burst_done.set()
    for index in range(totals.published[0], totals.published[0] + remaining - burst):
        _publish(publisher, scheduler, index, -1, 0, totals)
        if index % 64 == 0:
            time.sleep(0)


def run_demo(
    batches: int = 20_000, dialect: str = "vllm", port: int = 0, quiet: bool = False
) -> int:
    """Run the demo and print its summary; 0 when nothing was lost."""
    if port:
        live, replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    else:
        live, replay = _free_endpoints()
    notices: list[Notice] = []
    reset_seen = threading.Event()

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        if notice.kind == "reset":
            reset_seen.set()
        if not quiet:
            print(f"  notice: {live}: {notice}", file=sys.stderr)

    totals = _Totals()
    ready = threading.Event()
    # Small kernel socket buffers: without them a stalled reader's TCP buffers absorb
    # megabytes (about 10,000 of these batches), and the PUB socket would drop nothing.
    context = zmq.Context()
    context.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    context.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    producer = threading.Thread(
        target=_produce,
        args=(dialect, live, replay, batches, totals, ready, reset_seen, context),
        daemon=True,
    )
    print(f"kvevents demo: {dialect} publisher on {live} (replay {replay}), {batches} batches")
    producer.start()
    ready.wait(10)
    if totals.error is not None:
        raise totals.error
    started = time.monotonic()
    delivered = [0, 0]
    events = 0
    next_report = started + 1.0
    try:
        with Subscriber(live, replay, on_notice=on_notice, rcvhwm=HWM, context=context) as sub:
            deadline = started + 120
            while time.monotonic() < deadline:
                for delivery in sub.poll(0.2):
                    epoch = min(delivery.epoch, 1)
                    delivered[epoch] += 1
                    events += len(delivery.batch.events)
                if delivered[0]:
                    totals.joined.set()
                if (
                    totals.stall_requested.is_set()
                    and not totals.stalled.is_set()
                    and delivered[0] >= totals.published[0]
                ):
                    # Caught up, and the producer waits: once a quiet poll has let any
                    # replay session end, the subscriber is live, so what the PUB drops
                    # next is a live gap. Then a slow consumer: nothing is read during the
                    # producer's burst.
                    for delivery in sub.poll(0.1):
                        delivered[min(delivery.epoch, 1)] += 1
                        events += len(delivery.batch.events)
                    totals.stalled.set()
                    totals.burst_done.wait(30)
                    time.sleep(0.2)  # let the I/O threads fill the pipes and drop the rest
                for epoch in (0, 1):
                    if totals.finished[epoch] and delivered[epoch] >= totals.published[epoch]:
                        totals.caught_up[epoch].set()
                if totals.done.is_set() and sum(delivered) >= sum(totals.published):
                    break
                now = time.monotonic()
                if not quiet and now >= next_report:
                    rate = sum(delivered) / (now - started)
                    print(
                        f"  progress: {sum(delivered)}/{batches} batches delivered, "
                        f"{rate:,.0f} batches/s"
                    )
                    next_report = now + 1.0
            elapsed = time.monotonic() - started
            stats = dict(sub.stats)
    finally:
        totals.caught_up[0].set()
        totals.caught_up[1].set()
        producer.join(5)
        context.destroy(linger=100)  # not 0: kvevents_runtime.closing says why
    if totals.error is not None:
        raise totals.error
    lost = sum(totals.published) - sum(delivered)
    print()
    print("kvevents demo summary")
    print(f"  dialect            {dialect}")
    print(
        f"  batches published  {sum(totals.published)} "
        f"({totals.published[0]} + {totals.published[1]} after the restart)"
    )
    print(f"  batches delivered  {sum(delivered)}, in order, each seq once")
    print(f"  events             {totals.events} published, {events} delivered")
    print(f"  live gaps          {_describe_gaps(stats, totals)}")
    resets = stats["resets"]
    restart = "publisher restart detected" if resets else "no restart: too few batches"
    print(f"  resets             {resets} ({restart})")
    print(f"  history lost       {stats['history_lost']}")
    print(
        f"  throughput         {sum(delivered) / max(elapsed, 1e-9):,.0f} batches/s "
        f"over {elapsed:.2f} s"
    )
    print(f"  lost = {lost}")
    return 0 if lost == 0 and stats["history_lost"] == 0 else 1


def _describe_gaps(stats: dict[str, int], totals: _Totals) -> str:
    """The gaps the subscriber saw (the PUB socket drops whatever a slower or stalled reader's
    pipes cannot hold) and the stall that guarantees one."""
    if stats["gaps"]:
        told = (
            f"{stats['gaps']}, {stats['repaired']} repaired by replay "
            f"({stats['replayed']} batches replayed)"
        )
    else:
        told = "0"
    if totals.stall_at < 0:
        return f"{told}; no stall: it comes in runs of {2 * STALL_MIN_BATCHES} batches or more"
    return (
        f"{told}; the subscriber stalled at seq {totals.stall_at} for a {totals.burst}-batch "
        "burst, and the PUB socket dropped what its pipes could not hold"
    )


def _free_endpoints() -> tuple[str, str]:
    """Two free loopback ports below the ephemeral range, so the restarted publisher can bind
    them again (kvevents.stable_port)."""
    live = stable_port()
    replay = stable_port()
    while replay == live:
        replay = stable_port()
    return f"tcp://127.0.0.1:{live}", f"tcp://127.0.0.1:{replay}"
