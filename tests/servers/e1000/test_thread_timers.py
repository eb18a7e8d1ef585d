"""The e1000's real timer thread: deadlines fire in order, whatever order
they were armed in, and re-arming or cancelling a key takes effect."""

from __future__ import annotations

import threading
import time

from servers.e1000.timers import ThreadTimers


def test_deadlines_fire_in_order_and_rearm_postpones() -> None:
    timers = ThreadTimers()
    fired: list[str] = []
    at: dict[str, float] = {}
    done = threading.Event()

    def record(name: str) -> None:
        fired.append(name)
        at[name] = time.monotonic()
        if len(fired) == 3:
            done.set()

    start = time.monotonic()
    try:
        timers.arm("late", 0.30, lambda: record("late"))
        # Earlier than the one the thread sleeps towards: it must wake for it.
        timers.arm("early", 0.02, lambda: record("early"))
        timers.arm("middle", 0.10, lambda: record("middle"))
        timers.arm("gone", 0.05, lambda: record("gone"))
        timers.cancel("gone")
        # Re-armed later than first armed: fires at the new time only.
        timers.arm("middle", 0.20, lambda: record("middle"))
        assert done.wait(5.0), fired
        assert fired == ["early", "middle", "late"]
        # Not merely in order once "late" woke the thread: "early" came on
        # its own (a generous bound; it is due after 20 ms).
        assert at["early"] - start < 0.25, at
        assert not timers.armed("late")
    finally:
        timers.close()
