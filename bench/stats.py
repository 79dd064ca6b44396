"""Medians with their spread, and the clocks the benchmark reads."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Figure:
    """One measured quantity over repetitions: reported as median with min–max."""

    unit: str
    samples: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.samples.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(
            median=self.median,
            min=min(self.samples) if self.samples else None,
            max=max(self.samples) if self.samples else None,
        )
        return data

    def text(self, digits: int = 3) -> str:
        if not self.samples:
            return "n/a"
        return f"{fmt(self.median, digits)} ({fmt(min(self.samples), digits)}–{fmt(max(self.samples), digits)})"


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds one thread has used, read from outside it (Linux per-thread clock)."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def rss_kib(field: str = "VmRSS") -> int:
    """The process's resident set now (VmRSS) or at its peak (VmHWM), in KiB.

    VmHWM, unlike getrusage's ru_maxrss, starts afresh at exec, so a spawned child does not
    report the peak of the parent it was forked from."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0
