"""Clocks and memory figures taken inside a child process."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def rss_kib() -> int:
    """The resident set size right now (KiB), from /proc."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_rss_kib() -> int:
    """The highest resident set size this process has had (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Span:
    seconds: float = 0.0
    #: CPU time of this process in the span: less disturbed by other load than wall time.
    cpu_seconds: float = 0.0
    #: RSS just before the measured work: Django, the app and the connection loaded.
    base_rss_kib: int = 0

    def figures(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "base_rss_kib": self.base_rss_kib,
        }


@contextmanager
def timed() -> Iterator[Span]:
    span = Span(base_rss_kib=rss_kib())
    cpu = cpu_seconds()
    started = time.perf_counter()
    try:
        yield span
    finally:
        span.seconds = time.perf_counter() - started
        span.cpu_seconds = cpu_seconds() - cpu


@contextmanager
def profiled(path: str, interval: float = 0.001) -> Iterator[None]:
    """A pyinstrument profile of the block written to ``path`` as text; '' profiles nothing."""
    if not path:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=interval)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        Path(path).write_text(profiler.output_text(unicode=True, color=False))


def wait_for(
    predicate: object, *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> float:
    """Poll ``predicate()`` until truthy; returns the monotonic time it became true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)
