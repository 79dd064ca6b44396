"""Runs every measurement of `nox -s bench` and collects the raw figures.

Repetitions are the outer loop and the publishers the inner one, so a slow patch of this
noisy machine lands on every publisher alike instead of on one of them.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from . import codec, curve, fleet, index, live, mock, replay, rss, shapes, simulate, snapshot
from .agent import Agent
from .impls import PAIRS, RAW_SENDERS, Impl, encode_all, load_impls
from .stats import Figure

TRANSPORTS = ("tcp", "ipc")
CONSUMERS = ("kvevents", "vllm_example", "recv_floor", "strict_floor")


@dataclass(frozen=True)
class Settings:
    reps: int = 5
    batches: int = 50_000
    replay_sizes: tuple[int, ...] = (1_000, 10_000)
    replay_reps: int = 7
    decode_rounds: int = 20
    rss_batches: int = 1_000_000
    snapshot_blocks: tuple[int, ...] = (10_000, 100_000)
    index_sequences: tuple[int, ...] = (2_600, 31_000)
    """Appendix A's ~99.5k (worker, block) entries, and ~1M; memory is read at the last."""
    index_wide: tuple[int, int] | None = (31_000, 64)
    """(sequences, workers) of one more query/ingest row: ~1M entries over 64 workers."""
    index_large: int | None = 310_000
    """Sequences of the ~10M-entry query/ingest row (8 workers), measured once: one
    repetition of it, workload included, takes about 3 minutes and 6.2 GB peak RSS here."""
    fleet_batches: int = 20_000
    """Batches of the fleet's throughput rows (each of 16 blocks)."""
    fleet_bootstrap_blocks: int = 1_000_000
    curve_batches: int = 50_000
    """Batches of each CURVE-against-plain row (shape b)."""
    simulate_limit: int | None = None
    """Requests of the Mooncake trace the simulator section replays (None: all)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            reps=2,
            batches=5_000,
            replay_reps=2,
            decode_rounds=2,
            rss_batches=50_000,
            snapshot_blocks=(10_000,),
            index_sequences=(2_600,),
            index_wide=None,
            index_large=None,
            fleet_batches=3_000,
            fleet_bootstrap_blocks=100_000,
            curve_batches=5_000,
            simulate_limit=500,
        )


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _figures(*names_units: tuple[str, str]) -> dict[str, Figure]:
    return {name: Figure(unit) for name, unit in names_units}


def check_same_bytes(impls: dict[str, Impl]) -> None:
    """Every ratio compares equal work: each pair must put identical bytes on the wire."""
    for ours, reference in PAIRS:
        for shape in shapes.SHAPES:
            mine = encode_all(shapes.batch_pool(shape, impls[ours].structs, 50))
            theirs = encode_all(shapes.batch_pool(shape, impls[reference].structs, 50))
            if mine != theirs:
                raise AssertionError(f"{ours} and {reference} encode shape ({shape}) differently")


def measure_live(agent: Agent, impls: dict[str, Impl], settings: Settings) -> dict[str, Any]:
    n = settings.batches
    batches = {
        (key, shape): shapes.cycle(shapes.batch_pool(shape, impl.structs, 1000), n)
        for key, impl in impls.items()
        for shape in shapes.SHAPES
    }
    raw_payloads = {
        shape: encode_all(shapes.batch_pool(shape, impls["vllm"].structs, 1000))
        for shape in shapes.SHAPES
    }
    live_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    delivered_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    senders = [*RAW_SENDERS, *impls]
    for rep in range(settings.reps):
        for shape in shapes.SHAPES:
            for transport in TRANSPORTS:
                for sender in senders:
                    if sender in RAW_SENDERS:
                        result = live.raw_end_to_end(
                            agent, transport, raw_payloads[shape], n, unwrapped=sender != "raw"
                        )
                    else:
                        result = live.end_to_end(
                            agent, impls[sender], transport, batches[sender, shape]
                        )
                    row = live_rows.setdefault(
                        (sender, shape, transport),
                        {
                            "figures": _figures(
                                ("batches_per_s", "batches/s"),
                                ("events_per_s", "events/s"),
                                ("publish_wall_us", "µs"),
                                ("publish_cpu_us", "µs"),
                                ("thread_cpu_us", "µs"),
                            ),
                            "dropped": [],
                            "in_order": True,
                        },
                    )
                    figures = row["figures"]
                    for name in (
                        "batches_per_s",
                        "publish_wall_us",
                        "publish_cpu_us",
                        "thread_cpu_us",
                    ):
                        figures[name].add(result.get(name))
                    if result["batches_per_s"] is not None:
                        figures["events_per_s"].add(
                            result["batches_per_s"] * shapes.EVENTS_PER_BATCH[shape]
                        )
                    row["dropped"].append(result["dropped"])
                    row["in_order"] &= result["in_order"]
                for consumer in CONSUMERS:
                    result = live.delivered_rate(agent, consumer, transport, raw_payloads[shape], n)
                    row = delivered_rows.setdefault(
                        (consumer, shape, transport),
                        {
                            "figures": _figures(("batches_per_s", "batches/s")),
                            "dropped": [],
                            "in_order": True,
                        },
                    )
                    row["figures"]["batches_per_s"].add(result["batches_per_s"])
                    row["dropped"].append(result["dropped"])
                    row["in_order"] &= result["in_order"]
        _log(f"live: repetition {rep + 1} of {settings.reps} done")
    return {"live": live_rows, "delivered": delivered_rows}


def measure_replay(
    agent: Agent, impls: dict[str, Impl], settings: Settings
) -> dict[tuple[str, int, str], dict[str, Any]]:
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for size in settings.replay_sizes:
        for key, impl in impls.items():
            results = replay.replay_latency(agent, impl, size, settings.replay_reps)
            for label, runs in results.items():
                latency = Figure("µs")
                per_entry = Figure("µs")
                completed = [(t, entries) for t, entries in runs if t is not None]
                for t, entries in completed:
                    latency.add(t * 1e6)
                    if entries:
                        per_entry.add(t * 1e6 / entries)
                rows[key, size, label] = {
                    "figures": {"latency_us": latency, "per_entry_us": per_entry},
                    "entries": [entries for _, entries in runs],
                    "end_missing": len(runs) - len(completed),
                }
        _log(f"replay: buffer of {size} done")
    return rows


def measure_codec(impls: dict[str, Impl], settings: Settings) -> dict[str, Any]:
    decode_rows: dict[tuple[str, str], dict[str, Figure]] = {}
    encode_rows: dict[str, Figure] = {}
    for _ in range(settings.reps + 2):
        for shape in shapes.SHAPES:
            for _, reference in PAIRS:
                tolerant, typed = codec.decode_pair(impls[reference], shape, settings.decode_rounds)
                row = decode_rows.setdefault(
                    (reference, shape), _figures(("tolerant_us", "µs"), ("typed_us", "µs"))
                )
                row["tolerant_us"].add(tolerant)
                row["typed_us"].add(typed)
            encode_rows.setdefault(shape, Figure("µs")).add(
                codec.encode_alone(impls["kvevents-vllm"], shape, settings.decode_rounds)
            )
    _log("codec done")
    return {"decode": decode_rows, "encode": encode_rows}


def measure_rss(impls: dict[str, Impl], settings: Settings) -> dict[str, dict[str, Any]]:
    rows = {}
    for key in impls:
        rows[key] = rss.peak_rss(key, settings.rss_batches)
        _log(f"rss: {key} done ({rows[key]['seconds']:.1f} s)")
    return rows


def measure_index(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"core": {}}
    for sequences in settings.index_sequences:
        out["core"][sequences] = index.measure_core(sequences, settings.reps)
        _log(f"index: {sequences} sequences done")
    if settings.index_wide is not None:
        sequences, workers = settings.index_wide
        out["core"][f"{sequences}x{workers}"] = index.measure_core(
            sequences, settings.reps, workers
        )
        _log(f"index: {sequences} sequences over {workers} workers done")
    out["memory"] = index.measure_memory(settings.index_sequences[-1])
    _log("index: memory done")
    out["http"] = index.measure_http(settings.index_sequences[0], settings.reps)
    _log("index: HTTP done")
    if settings.index_large is not None:
        # Last: the memory its workload and indexes used is not handed to another section.
        out["core"][settings.index_large] = index.measure_core(settings.index_large, 1)
        _log(f"index: {settings.index_large} sequences done")
    return out


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgspec": msgspec.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


SECTIONS = (
    "codec",
    "live",
    "replay",
    "rss",
    "snapshot",
    "index",
    "mock",
    "fleet",
    "curve",
    "simulate",
)
"""What `python -m bench --only` can select; `live` measures publishers and subscribers."""


def run_all(settings: Settings, only: frozenset[str] | None = None) -> dict[str, Any]:
    """Every section, or those in `only` (`live` brings `codec`: its targets are judged
    against encoding alone)."""
    wanted = set(SECTIONS if only is None else only)
    if "live" in wanted:
        wanted.add("codec")
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": settings.__dict__,
        "impls": {},
        "sections": [name for name in SECTIONS if name in wanted],
    }
    if wanted & {"codec", "live", "replay", "rss"}:
        _log("loading the reference publishers from their wheels")
        impls = load_impls()
        check_same_bytes(impls)
        results["impls"] = {key: impl.label for key, impl in impls.items()}
        results["codec"] = measure_codec(impls, settings)
        if wanted & {"live", "replay"}:
            agent = Agent()
            try:
                # Collections triggered by the setup of one run must not land inside another's timing.
                gc.collect()
                if "live" in wanted:
                    results.update(measure_live(agent, impls, settings))
                if "replay" in wanted:
                    results["replay"] = measure_replay(agent, impls, settings)
            finally:
                agent.close()
        if "rss" in wanted:
            results["rss"] = measure_rss(impls, settings)
    if "snapshot" in wanted:
        results["snapshot"] = snapshot.measure(settings.snapshot_blocks, settings.reps)
        _log("snapshots done")
    if "index" in wanted:
        results["index"] = measure_index(settings)
    if "mock" in wanted:
        results["mock"] = mock.measure(settings.reps)
        _log("mock engine done")
    if "fleet" in wanted:
        results["fleet"] = fleet.measure(
            settings.reps, settings.fleet_batches, settings.fleet_bootstrap_blocks
        )
        _log("fleet done")
    if "curve" in wanted:
        agent = Agent()
        try:
            results["curve"] = curve.measure(agent, settings.reps, settings.curve_batches)
        finally:
            agent.close()
        _log("CURVE against plain done")
    if "simulate" in wanted:
        results["simulate"] = simulate.measure(settings.simulate_limit)
        _log("simulate against Dynamo's replay done")
    results["seconds"] = time.monotonic() - started
    return results
