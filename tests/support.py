"""What the tests share: repository paths, bounded waits, unique endpoints, and small
clients written the way vLLM's own tests consume (SUB for live, DEALER for replay)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import zmq

import kvevents
from kvevents import frames

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"


def start_command(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`kvevents ARGS...` as a process of the checkout, its stderr kept for the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvevents", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def stop_command(process: subprocess.Popen[bytes]) -> str:
    """Interrupt it as a user would (SIGINT), kill it after 15 s; what it wrote to stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.stderr is not None
    if process.stderr.closed:
        return ""  # stopped before (e.g. to show why a wait failed)
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    return err


def stable_tcp() -> str:
    """A loopback endpoint on a port below the ephemeral range, for a publisher that a test
    restarts in place: a reconnecting SUB can take an ephemeral port while it is down
    (kvevents.stable_port says how)."""
    return f"tcp://127.0.0.1:{kvevents.stable_port()}"


def inproc_endpoint() -> str:
    return f"inproc://kvevents-{uuid.uuid4().hex}"


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_sub(sockets, endpoint: str, topic: bytes = b"", hwm: int = 100_000) -> zmq.Socket:
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, hwm)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def recv_live(sub: zmq.Socket, count: int, timeout: float = 5.0) -> list[tuple[bytes, int, bytes]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        if sub.poll(50):
            out.append(frames.parse_live_batch(sub.recv_multipart()))
    return out


def replay(
    sockets, endpoint: str, start: int | bytes, timeout: float = 5.0
) -> tuple[list, list[bytes] | None]:
    """Replay items and the END marker's frames (None if it never came)."""
    dealer = sockets(zmq.DEALER)
    dealer.connect(endpoint)
    request = frames.pack_replay_request(start) if isinstance(start, int) else (b"", start)
    dealer.send_multipart(request)
    items = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dealer.poll(100):
            continue
        message = dealer.recv_multipart()
        item = frames.parse_replay_reply(message)
        if item.is_end:
            return items, message
        items.append(item)
    return items, None


def wait_connected(publisher, sub: zmq.Socket, make_batch, timeout: float = 5.0) -> int:
    """Publish probes until the SUB receives one (the slow-joiner problem); returns probes sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publisher.publish(make_batch())
        sent += 1
        if sub.poll(20):
            while sub.poll(50):
                sub.recv_multipart()
            return sent
    raise TimeoutError("subscriber never connected")
