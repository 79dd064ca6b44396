"""Short queries beside long ones: the latency of a 1,024-token /query while two clients send
1M-token queries back to back to one `kvevents index` (a worker registered, nothing indexed).

    python -m bench.starvation [--seconds 15] [--port 0]

Prints p50 and p99 of the short query, idle and under the long ones. Not part of
`nox -s bench`: no reference answers HTTP queries of this size alike to compare with.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[int(fraction * (len(ordered) - 1))] * 1000


def _timed(conn: http.client.HTTPConnection, body: bytes) -> float:
    started = time.perf_counter()
    conn.request("POST", "/query", body=body)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"/query answered {response.status}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    port = args.port or _free_port()
    command = [sys.executable, "-m", "kvevents", "index", "--port", str(port)]
    command += ["--workers", "1=tcp://127.0.0.1:9"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("kvevents index did not start") from None
                time.sleep(0.1)
        rng = random.Random(1)
        long_body = json.dumps({"token_ids": [rng.randrange(50_000) for _ in range(1 << 20)]})
        short_body = json.dumps({"token_ids": [rng.randrange(50_000) for _ in range(1024)]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        idle = [_timed(conn, short_body.encode()) for _ in range(200)]
        stop = threading.Event()

        def long_client() -> None:
            own = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while not stop.is_set():
                _timed(own, long_body.encode())

        clients = [threading.Thread(target=long_client) for _ in range(2)]
        for client in clients:
            client.start()
        loaded = []
        until = time.monotonic() + args.seconds
        try:
            while time.monotonic() < until:
                loaded.append(_timed(conn, short_body.encode()))
                time.sleep(0.01)
        finally:
            stop.set()
            for client in clients:
                client.join(60)
        print(
            f"1,024-token /query: idle p50 {_percentile(idle, 0.5):.2f} ms, "
            f"p99 {_percentile(idle, 0.99):.2f} ms; beside two 1M-token clients "
            f"(n={len(loaded)}) p50 {_percentile(loaded, 0.5):.2f} ms, "
            f"p99 {_percentile(loaded, 0.99):.2f} ms"
        )
        return 0
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
