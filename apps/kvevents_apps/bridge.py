"""`kvevents bridge`: the node-local bridge from the engines of one node into NATS JetStream.

Engines are given on the command line (`--engine` with `--worker-id`, and optionally
`--replay`, `--dp-rank`, `--model`, `--dialect`, each repeated once per engine, in the same
order) or in a JSON file (`--config`):

    {"engines": [{"endpoint": "tcp://127.0.0.1:5557", "replay_endpoint": "tcp://127.0.0.1:5558",
                  "worker_id": 1, "dp_rank": 0, "model": "llama", "dialect": "vllm"}]}

An engine whose publisher uses CURVE names its public key (`"curve_server_key"`, z85); the
bridge's own pair comes from KVEVENTS_CURVE_CLIENT_SECRET (README, Security).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from kvevents.fleet import Bridge, EngineSpec


class EngineEntry(msgspec.Struct, forbid_unknown_fields=True):
    endpoint: str
    worker_id: int
    replay_endpoint: str | None = None
    dp_rank: int = 0
    model: str = "default"
    dialect: str = "vllm"
    topic: str | None = None
    curve_server_key: str | None = None
    """The engine's CURVE public key (z85), when its publisher uses CURVE."""


class BridgeConfig(msgspec.Struct, forbid_unknown_fields=True):
    engines: list[EngineEntry]


def engines_from_file(path: Path) -> list[EngineSpec]:
    """ValueError naming the file and what is wrong with it."""
    try:
        config = msgspec.json.decode(path.read_bytes(), type=BridgeConfig)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return [EngineSpec(**msgspec.structs.asdict(e)) for e in config.engines]


def engines_from_options(
    endpoints: Sequence[str],
    worker_ids: Sequence[int],
    replays: Sequence[str] | None,
    dp_ranks: Sequence[int] | None,
    models: Sequence[str] | None,
    dialects: Sequence[str] | None,
) -> list[EngineSpec]:
    """One spec per `--engine`; every other repeated option is given once per engine, or
    not at all (its default for all). ValueError saying which count is off."""
    count = len(endpoints)

    def aligned(name: str, values: Sequence[Any] | None, default: Any) -> list[Any]:
        if not values:
            return [default] * count
        if len(values) != count:
            raise ValueError(f"{name} is given {len(values)} times for {count} --engine")
        return list(values)

    ids = aligned("--worker-id", worker_ids, None)
    if None in ids:
        raise ValueError("give --worker-id once per --engine")
    replay = aligned("--replay", replays, None)
    ranks = aligned("--dp-rank", dp_ranks, 0)
    model = aligned("--model", models, "default")
    dialect = aligned("--dialect", dialects, "vllm")
    return [
        EngineSpec(endpoints[i], replay[i] or None, ids[i], ranks[i], model[i], dialect[i])
        for i in range(count)
    ]


async def run(
    servers: str,
    engines: list[EngineSpec],
    stream: str,
    snapshot_interval: float,
    max_age: float,
    quiet: bool,
    duration: float | None = None,
    nats_options: dict[str, Any] | None = None,
    redact: bool = False,
) -> int:
    bridge = Bridge(
        servers,
        engines,
        stream=stream,
        snapshot_interval=snapshot_interval,
        max_age=max_age,
        nats_options=nats_options,
        redact=redact,
    )
    await bridge.start()
    print(
        f"kvevents bridge: {len(engines)} engines -> {servers} stream {stream}",
        file=sys.stderr,
        flush=True,
    )
    following = asyncio.create_task(bridge.run())
    started = time.monotonic()
    try:
        last = dict(bridge.counters)
        while not following.done():
            await asyncio.wait({following}, timeout=10.0)
            if duration is not None and time.monotonic() - started >= duration:
                break
            if quiet or following.done():
                continue
            now = dict(bridge.counters)
            rate = (now["published"] - last["published"]) / 10.0
            print(
                f"kvevents bridge: {now['published']} published ({rate:.0f}/s), "
                f"{bridge.queued} queued, {now['dropped']} dropped, "
                f"{now['snapshots_written']} snapshots, {now['publish_errors']} publish errors",
                file=sys.stderr,
                flush=True,
            )
            last = now
        if following.done():
            following.result()  # a defect ends the command with its traceback
    finally:
        await bridge.close()
        if not following.done():
            following.cancel()
    return 0
