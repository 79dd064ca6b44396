"""`kvevents demo`: the whole event plane on loopback, with a gap and a restart repaired.

A producer thread plays a scheduler: prompts that share a system prefix store chains of
blocks, old blocks are evicted, and the cache is cleared once. The subscriber reads in the
main thread with a small receive buffer and stalls once, so the PUB socket drops batches
(a real gap that replay repairs); half-way the publisher is shut down and a new one starts
on the same ports, so the seq restarts at 0 (a reset).
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, Notice, Subscriber

BLOCK_SIZE = 16
HWM = 200


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
            )
            if epoch == 0:
                ready.set()
            with publisher:
                for index in range(count):
                    events = scheduler.step(index, clear_at=count // 2 if epoch == 1 else -1)
                    publisher.publish(KVEventBatch(ts=time.time(), events=events))
                    totals.published[epoch] += 1
                    totals.events += len(events)
                    if epoch == 1 and not reset_seen.is_set():
                        # The wire has no epoch: a restart shows only as a live seq going
                        # backwards, so step at a scheduler's pace until the subscriber saw one.
                        time.sleep(0.002)
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
        totals.done.set()


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
            print(f"  notice: {notice}", file=sys.stderr)

    totals = _Totals()
    ready = threading.Event()
    producer = threading.Thread(
        target=_produce,
        args=(dialect, live, replay, batches, totals, ready, reset_seen),
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
    stalled = False
    next_report = started + 1.0
    with Subscriber(live, replay, on_notice=on_notice, rcvhwm=HWM) as sub:
        deadline = started + 120
        while time.monotonic() < deadline:
            for delivery in sub.poll(0.2):
                epoch = min(delivery.epoch, 1)
                delivered[epoch] += 1
                events += len(delivery.batch.events)
            if not stalled and delivered[0] >= totals.published[0] // 4 > 0:
                stalled = True
                time.sleep(0.5)  # a slow consumer: PUB drops what does not fit the HWM
            for epoch in (0, 1):
                if totals.finished[epoch] and delivered[epoch] >= totals.published[epoch]:
                    totals.caught_up[epoch].set()
            if totals.done.is_set() and sum(delivered) >= sum(totals.published):
                break
            now = time.monotonic()
            if not quiet and now >= next_report:
                rate = sum(delivered) / (now - started)
                print(
                    f"  progress: {sum(delivered)}/{batches} batches delivered, {rate:,.0f} batches/s"
                )
                next_report = now + 1.0
        elapsed = time.monotonic() - started
        stats = dict(sub.stats)
    producer.join(5)
    if totals.error is not None:
        raise totals.error
    lost = sum(totals.published) - sum(delivered)
    gaps = sum(1 for n in notices if n.kind == "gap")
    print()
    print("kvevents demo summary")
    print(f"  dialect            {dialect}")
    print(
        f"  batches published  {sum(totals.published)} ({totals.published[0]} + {totals.published[1]} after the restart)"
    )
    print(f"  batches delivered  {sum(delivered)}, in order, each seq once")
    print(f"  events             {totals.events} published, {events} delivered")
    print(
        f"  gaps repaired      {stats['repaired']} ({gaps} live gaps, {stats['replayed']} batches replayed)"
    )
    print(f"  resets             {stats['resets']} (publisher restart detected)")
    print(f"  history lost       {stats['history_lost']}")
    print(
        f"  throughput         {sum(delivered) / max(elapsed, 1e-9):,.0f} batches/s over {elapsed:.2f} s"
    )
    print(f"  lost = {lost}")
    return 0 if lost == 0 and stats["history_lost"] == 0 else 1


def _free_endpoints() -> tuple[str, str]:
    """Two free loopback ports, found by binding port 0 and closing (the publisher rebinds them;
    both probes stay open until both are found, so the two differ)."""
    probes = [socket.socket() for _ in range(2)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        ports = [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
    return f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}"
