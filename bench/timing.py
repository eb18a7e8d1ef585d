"""What the benchmarks share: pinning to a CPU, and calls per second."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def pin(cpu: int | None) -> None:
    """Run this process on ``cpu`` only; None: on every CPU."""
    os.sched_setaffinity(0, {cpu} if cpu is not None else set(range(os.cpu_count() or 1)))


def timed(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of fn() over about ``seconds``."""
    n, batch = 0, 200
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)
