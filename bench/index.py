"""kvevents.index against NVIDIA Dynamo 1.6.1 (ai-dynamo-runtime wheel), side by side in one
run, on the workload of `index_workload`:

- query: hash 1,024 tokens and match (`PrefixIndex.query` against Dynamo's
  `compute_block_hash_for_seq` + `RadixTree.find_matches`);
- ingest: a wire payload to the applied index, decode included, against Dynamo's
  `apply_event` on pre-built JSON events; blocks/s;
- memory per (worker, block) entry at ~1M entries, RSS growth in a fresh process each;
- HTTP /query, `kvevents index` against `python -m dynamo.indexer --threads 1` (its
  single-threaded, correct mode), both fed over ZeroMQ by the same 8 engines, with the same
  raw-socket client on 1 and on 16 connections; requests/s and p50/p99. The same ASGI app
  also runs on granian (a Rust-backed server: uvloop, one worker, single-threaded runtime),
  so the choice of server is a measurement; it lacks only the service's fast lane, which
  is uvicorn's protocol (see kvevents_apps.indexd).

Both answers are compared before anything is timed: a ratio between indexes that disagree
would mean nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from . import dynamo, index_workload
from .child import run_in_child
from .impls import free_port
from .stats import Figure, rss_kib

ROOT = Path(__file__).resolve().parent.parent


def _ours(workload: index_workload.Workload) -> Any:
    from kvevents import decode
    from kvevents.index import PrefixIndex

    index = PrefixIndex(index_workload.BLOCK_SIZE)
    started = time.perf_counter()
    for worker, payload in workload.payloads:
        index.apply((worker, 0), decode(payload))
    return index, time.perf_counter() - started


def _theirs(llm: Any, workload: index_workload.Workload) -> Any:
    tree = llm.RadixTree()
    started = time.perf_counter()
    for worker, event in workload.dynamo_events:
        tree.apply_event(worker, event)
    return tree, time.perf_counter() - started


def measure_core(
    sequences: int, reps: int, workers: int = index_workload.WORKERS
) -> dict[str, Figure]:
    llm = dynamo.llm()
    workload = index_workload.build(
        sequences, dynamo_hash=llm.compute_block_hash_for_seq, workers=workers
    )
    figures = {
        name: Figure(unit)
        for name, unit in (
            ("ours_ingest_blocks_per_s", "blocks/s"),
            ("dynamo_ingest_blocks_per_s", "blocks/s"),
            ("ours_query_per_s", "q/s"),
            ("dynamo_query_per_s", "q/s"),
        )
    }
    hash_seq = llm.compute_block_hash_for_seq
    bs = index_workload.BLOCK_SIZE
    for _ in range(reps):
        ours, ours_s = _ours(workload)
        theirs, theirs_s = _theirs(llm, workload)
        figures["ours_ingest_blocks_per_s"].add(workload.entries / ours_s)
        figures["dynamo_ingest_blocks_per_s"].add(workload.entries / theirs_s)
        for tokens in workload.queries[:50]:
            mine = {w: m.blocks for w, m in ours.query(tokens).items() if m.blocks}
            dyn = {w: n for w, n in theirs.find_matches(hash_seq(tokens, bs)).scores.items() if n}
            if mine != dyn:
                raise AssertionError(f"kvevents and Dynamo answer differently: {mine} != {dyn}")
        started = time.perf_counter()
        for tokens in workload.queries:
            ours.query(tokens)
        figures["ours_query_per_s"].add(len(workload.queries) / (time.perf_counter() - started))
        started = time.perf_counter()
        for tokens in workload.queries:
            theirs.find_matches(hash_seq(tokens, bs))
        figures["dynamo_query_per_s"].add(len(workload.queries) / (time.perf_counter() - started))
        del ours, theirs
    figures["entries"] = Figure("entries")
    figures["entries"].add(workload.entries)
    figures["workers"] = Figure("workers")
    figures["workers"].add(workers)
    return figures


def _write_inputs(sequences: int, folder: str, conn: Any) -> None:
    """Builds the workload in its own process: the garbage of building it (every token list,
    the other index's events) must not be memory the measured index can reuse unseen."""
    sys.path.append(str(dynamo.path()))
    llm = dynamo.llm()
    workload = index_workload.build(sequences, dynamo_hash=llm.compute_block_hash_for_seq)
    encode = msgspec.msgpack.encode
    Path(folder, "ours").write_bytes(encode(workload.payloads))
    Path(folder, "dynamo").write_bytes(encode(workload.dynamo_events))
    conn.send({"entries": workload.entries})


def _memory(which: str, folder: str, entries: int, conn: Any) -> None:
    """RSS growth of applying every event, in a process that holds the inputs before and
    after (so freeing them cannot hide the index's own growth)."""
    import gc

    sys.path.append(str(dynamo.path()))
    llm = dynamo.llm() if which == "dynamo" else None
    inputs = [
        (worker, payload)
        for worker, payload in msgspec.msgpack.decode(Path(folder, which).read_bytes())
    ]
    workload = index_workload.Workload(
        payloads=inputs if llm is None else [],
        dynamo_events=inputs if llm is not None else [],
        entries=entries,
        queries=[],
        last_of_worker={},
    )
    if llm is None:
        from kvevents import decode
        from kvevents.index import PrefixIndex

        PrefixIndex(index_workload.BLOCK_SIZE).apply((0, 0), decode(inputs[0][1]))  # imports
    gc.collect()
    before = rss_kib()
    held = _ours(workload)[0] if llm is None else _theirs(llm, workload)[0]
    gc.collect()
    time.sleep(0.5)  # Dynamo applies on its own thread
    after = rss_kib()
    conn.send({"bytes_per_entry": (after - before) * 1024 / entries, "entries": entries})
    del held, inputs


def measure_memory(sequences: int) -> dict[str, Figure]:
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        entries = run_in_child(_write_inputs, (sequences, folder), 900, "index memory inputs")[
            "entries"
        ]
        for which in ("ours", "dynamo"):
            result = run_in_child(_memory, (which, folder, entries), 900, f"index memory ({which})")
            out[f"{which}_bytes_per_entry"] = Figure("B")
            out[f"{which}_bytes_per_entry"].add(result["bytes_per_entry"])
    out["entries"] = Figure("entries")
    out["entries"].add(entries)
    return out


# -- HTTP ---------------------------------------------------------------------------------


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw
    finally:
        conn.close()


def _request(body: bytes) -> bytes:
    head = (
        "POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _body_end(head: bytes, buffer: bytearray, start: int) -> int | None:
    """Where the body that starts at `start` ends, or None if more bytes are needed: a
    Content-Length body, or a chunked one (hyper sends some answers chunked)."""
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        end = start + int(lower[at + 15 :].split(b"\r\n", 1)[0])
        return end if len(buffer) >= end else None
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        position = line_end + 2 + size + 2
        if len(buffer) < position:
            return None
        if size == 0:
            return position


def _read_response(sock: socket.socket, buffer: bytearray) -> None:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            total = _body_end(head, buffer, end + 4)
            if total is not None:
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"query failed: {bytes(buffer[:total])[:200]!r}")
                del buffer[:total]
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer += chunk


def one_connection(port: int, requests: list[bytes], count: int) -> tuple[float, list[float]]:
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        started = time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            sock.sendall(requests[i % len(requests)])
            _read_response(sock, buffer)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies


async def _connection(port: int, requests: list[bytes], count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buffer = bytearray()
    try:
        for i in range(count):
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            while True:
                end = buffer.find(b"\r\n\r\n")
                total = None if end < 0 else _body_end(bytes(buffer[:end]), buffer, end + 4)
                if total is not None:
                    break
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buffer += chunk
            if not buffer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"query failed: {bytes(buffer[:100])!r}")
            del buffer[:total]
            latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


def many_connections(
    port: int, requests: list[bytes], connections: int, per_connection: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(
            *(_connection(port, requests, per_connection, latencies) for _ in range(connections))
        )
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    return connections * per_connection / elapsed, latencies


class _Engines:
    """8 PUB sockets standing in for engines, sending the workload as vLLM frames."""

    def __init__(self, count: int) -> None:
        self.ctx = zmq.Context()
        self.socks = []
        self.endpoints = []
        for _ in range(count):
            sock = self.ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.socks.append(sock)
            self.endpoints.append(f"tcp://127.0.0.1:{port}")
        self.seqs = [0] * count

    def send(self, payloads: list[tuple[int, bytes]]) -> None:
        for worker, payload in payloads:
            seq = self.seqs[worker]
            self.seqs[worker] = seq + 1
            self.socks[worker].send_multipart([b"", seq.to_bytes(8, "big"), payload])

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def _start(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not start listening on {port}")


GRANIAN_OPTIONS = [
    "--interface",
    "asgi",
    "--host",
    "127.0.0.1",
    "--workers",
    "1",
    "--http",
    "1",
    "--no-ws",
    "--loop",
    "uvloop",
    "--runtime-mode",
    "st",
    "--log-level",
    "error",
]
"""Its best measured here (plain asyncio loop: half the rate; `--task-impl rust` within noise)."""


def measure_http(sequences: int, reps: int) -> dict[str, Figure]:
    workload = index_workload.build(sequences)
    engines = _Engines(index_workload.WORKERS)
    ours_port, theirs_port, default_port = free_port(), free_port(), free_port()
    granian_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(dynamo.path()), str(ROOT)]),
        "DYN_LOG": "error",
    }
    servers = {
        "ours": _start(
            [sys.executable, "-m", "kvevents", "index", "--port", str(ours_port)], env, ours_port
        ),
        "dynamo": _start(
            [sys.executable, "-m", "dynamo.indexer", "--port", str(theirs_port), "--threads", "1"],
            env,
            theirs_port,
        ),
        # Its default: four runtime threads (on this machine's two cores).
        "dynamo4": _start(
            [sys.executable, "-m", "dynamo.indexer", "--port", str(default_port), "--threads", "4"],
            env,
            default_port,
        ),
        "granian": _start(
            [
                sys.executable,
                "-m",
                "granian",
                *GRANIAN_OPTIONS,
                "--port",
                str(granian_port),
                "--factory",
                "kvevents_apps.indexd:IndexService",
            ],
            env,
            granian_port,
        ),
    }
    ports = {
        "ours": ours_port,
        "dynamo": theirs_port,
        "dynamo4": default_port,
        "granian": granian_port,
    }
    figures: dict[str, Figure] = {}
    try:
        for port in ports.values():
            for worker, endpoint in enumerate(engines.endpoints):
                body = {
                    "instance_id": worker,
                    "endpoint": endpoint,
                    "model_name": "bench",
                    "block_size": index_workload.BLOCK_SIZE,
                }
                status, answer = _http(port, "POST", "/register", body)
                if status != 201:
                    raise RuntimeError(f"register failed on {port}: {status} {answer}")
        time.sleep(1.5)  # both subscribers connected before anything is sent
        engines.send(workload.payloads)
        full = index_workload.SEQ_TOKENS
        for name, port in ports.items():
            deadline = time.monotonic() + 120
            for worker, tokens in workload.last_of_worker.items():
                while True:
                    status, answer = _http(
                        port, "POST", "/query", {"token_ids": tokens, "model_name": "bench"}
                    )
                    if answer.get("scores", {}).get(str(worker), {}).get("0") == full:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not ingest the workload: {answer}")
                    time.sleep(0.05)
        for tokens in workload.queries[:100]:
            body = {"token_ids": tokens, "model_name": "bench"}
            a = _http(ours_port, "POST", "/query", body)[1]["scores"]
            for port in (theirs_port, default_port, granian_port):
                b = _http(port, "POST", "/query", body)[1]["scores"]
                if a != b:
                    raise AssertionError(f"/query answers differ: kvevents {a} Dynamo {b}")
        requests = [
            _request(json.dumps({"token_ids": t, "model_name": "bench"}).encode())
            for t in workload.queries[:200]
        ]
        for _ in range(reps):
            for name, port in ports.items():
                rate, lat = one_connection(port, requests, 2000)
                _add(figures, f"{name}_1conn", rate, lat)
                rate, lat = many_connections(port, requests, 16, 250)
                _add(figures, f"{name}_16conn", rate, lat)
    finally:
        for process in servers.values():
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        engines.close()
    return figures


def _add(figures: dict[str, Figure], key: str, rate: float, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    for suffix, value, unit in (
        ("req_per_s", rate, "req/s"),
        ("p50_us", statistics.median(ordered) * 1e6, "µs"),
        ("p99_us", ordered[int(len(ordered) * 0.99) - 1] * 1e6, "µs"),
    ):
        figures.setdefault(f"{key}_{suffix}", Figure(unit)).add(value)
