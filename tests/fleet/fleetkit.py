"""Engines, bridges and replicas for the fleet tests, and the waits they share (every wait
bounded, and each names what it waited for)."""

from __future__ import annotations

import random
from typing import Any

from kvevents.fleet import Bridge, EngineSpec, FleetIndex
from kvevents.mock import MockEngine
from kvevents_apps import fleetdemo

BLOCK = 4


class Fleet:
    """Mock engines with a random workload over a small pool of shared prefixes."""

    def __init__(self, count: int, seed: int, capacity: int = 64, model: str = "m") -> None:
        self.rng = random.Random(seed)
        self.model = model
        self.engines = [
            MockEngine("vllm", capacity_blocks=capacity, block_size=BLOCK) for _ in range(count)
        ]
        self.prefixes = [
            [self.rng.randrange(50_000) for _ in range(BLOCK * self.rng.randint(1, 6))]
            for _ in range(12)
        ]
        self.running: list[list[Any]] = [[] for _ in range(count)]

    def specs(self) -> list[EngineSpec]:
        return [
            EngineSpec(
                e.publisher.connect_endpoint,
                e.publisher.connect_replay_endpoint,
                worker_id=i + 1,
                model=self.model,
            )
            for i, e in enumerate(self.engines)
        ]

    def key(self, index: int) -> tuple[int, int]:
        return (index + 1, 0)

    def step(self, steps: int = 1) -> None:
        rng = self.rng
        for _ in range(steps):
            for i, engine in enumerate(self.engines):
                for _ in range(rng.randint(0, 3)):
                    tokens = rng.choice(self.prefixes) + [
                        rng.randrange(50_000) for _ in range(BLOCK * rng.randint(0, 3))
                    ]
                    allocation = engine.admit(tokens)
                    if allocation is not None:
                        self.running[i].append(allocation)
                while self.running[i] and rng.random() < 0.6:
                    engine.release(self.running[i].pop(rng.randrange(len(self.running[i]))))
                engine.step()

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


async def settle(fleet: Fleet, bridges: list[Bridge], timeout: float = 30.0) -> None:
    """Every engine's batches taken by its bridge and published (the demo's own wait)."""
    for bridge in bridges:
        mine = [i for i in range(len(fleet.engines)) if fleet.key(i) in bridge.worker_keys()]
        await fleetdemo.settle(
            [fleet.engines[i] for i in mine], [fleet.key(i) for i in mine], bridge, timeout
        )


def mismatches(fleet: Fleet, index: FleetIndex) -> list[str]:
    """Where the replica's index differs from the engines' caches (stale workers named)."""
    found = []
    for i, engine in enumerate(fleet.engines):
        key = fleet.key(i)
        if key in index.stale:
            found.append(f"{key} stale: {index.stale[key]}")
            continue
        held, cached = index.engine_blocks(key), engine.blocks()
        if held != cached:
            found.append(f"{key}: {len(held - cached)} extra, {len(cached - held)} missing")
    return found
