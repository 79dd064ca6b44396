"""`kvevents bridge` and `kvevents index --source nats://...` as processes, against a real
nats-server and mock engines: the replica's HTTP answers equal the engines' caches."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvevents import stable_port
from tests.support import start_command, stop_command, wait_until

from .fleetkit import BLOCK, Fleet

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("uvicorn", reason="the index service needs kvevents[index]")


def _call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body))
        response = conn.getresponse()
        raw = response.read()
        ctype = response.getheader("content-type", "")
        return response.status, json.loads(raw) if "json" in ctype else raw.decode()
    finally:
        conn.close()


def test_bridge_and_replica_commands(nats_server) -> None:
    fleet = Fleet(2, seed=11)
    processes: list[subprocess.Popen[bytes]] = []
    errors: list[str] = []
    try:
        fleet.step(10)
        bridge_args = ["bridge", "--nats", nats_server.url, "--snapshot-interval", "0.5", "--quiet"]
        for spec in fleet.specs():
            bridge_args += ["--engine", spec.endpoint, "--replay", str(spec.replay_endpoint)]
            bridge_args += ["--worker-id", str(spec.worker_id), "--model", spec.model]
        processes.append(start_command(*bridge_args))
        port = stable_port()
        processes.append(
            start_command(
                "index",
                "--port",
                str(port),
                "--block-size",
                str(BLOCK),
                "--source",
                nats_server.url,
                "--models",
                fleet.model,
            )
        )
        fleet.step(10)

        def expected(tokens: list[int]) -> dict[str, dict[str, int]]:
            out = {}
            for i, engine in enumerate(fleet.engines):
                blocks = engine.match(tokens)
                if blocks:
                    out[str(fleet.key(i)[0])] = {"0": blocks * BLOCK}
            return out

        probes = [p + [1, 2, 3, 4] for p in fleet.prefixes]

        def answered() -> bool:
            try:
                for tokens in probes:
                    status, body = _call(
                        port, "POST", "/query", {"token_ids": tokens, "model_name": fleet.model}
                    )
                    if status != 200 or body["scores"] != expected(tokens):
                        return False
                return True
            except (OSError, ValueError, KeyError):
                return False

        def alive() -> str:
            return "" if all(p.poll() is None for p in processes) else "a process exited"

        assert wait_until(answered, 30, 0.2), alive()
        status, health = _call(port, "GET", "/health")
        assert status == 200 and health["fleet"][fleet.model]["caught_up"] is True, health
        status, body = _call(
            port,
            "POST",
            "/register",
            {
                "instance_id": 9,
                "endpoint": "tcp://127.0.0.1:1",
                "model_name": fleet.model,
                "block_size": BLOCK,
            },
        )
        assert status == 409, body
        status, metrics = _call(port, "GET", "/metrics")
        assert f'kvevents_index_fleet_lag{{model_name="{fleet.model}"}} 0.0' in metrics
    finally:
        for process in processes:
            errors.append(stop_command(process))
        fleet.close()
    assert not any("Traceback" in e for e in errors), errors


def test_bridge_command_errors_are_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvevents", "bridge", "--engine", "tcp://127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "kvevents bridge: error: give --worker-id once per --engine"


def test_fleet_demo_command() -> None:
    """`kvevents demo --fleet`: its own nats-server, engines, bridge and replicas; exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", "kvevents", "demo", "--fleet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replica C started from NATS alone" in result.stderr
    assert result.stderr.rstrip().endswith("fleet demo: ok")


def test_simulate_through_the_fleet_with_faults_ends_equal(tmp_path: Path) -> None:
    """`kvevents simulate --fleet --faults`: every fault (a stall, a replica restarted from
    NATS alone, an engine restart, an AllBlocksCleared) injected between the engines and a
    replica behind a bridge; every worker's blocks in the replica equal its engine's cache."""
    argv = ["simulate", "--fleet", "--faults", "--limit", "400", "--workers", "3"]
    result = subprocess.run(
        [sys.executable, "-m", "kvevents", *argv, "--policy", "kv", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(result.stdout)
    assert run["requests"] == 400
    assert run["caught_up"], run["behind"]
    assert run["mismatches"] == 0 and run["stale_workers"] == [], run["mismatches_per_worker"]
    assert len(run["faults"]) == 4, run["faults"]
    assert list(tmp_path.iterdir()) == [], "simulate left a file behind"
