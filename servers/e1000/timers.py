"""One-shot timers for interrupt moderation (ITR, RDTR/RADV, TIDV/TADV).

:class:`ThreadTimers` runs callbacks on one background thread;
:class:`ManualTimers` is driven by the test (``advance``), so tests assert
delay behaviour without sleeping or timing anything.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Timers(Protocol):
    def now(self) -> float: ...

    def arm(self, key: str, delay: float, fn: Callable[[], None]) -> None:
        """(Re)arm timer ``key`` to call ``fn`` after ``delay`` seconds."""

    def cancel(self, key: str) -> None: ...

    def armed(self, key: str) -> bool: ...

    def close(self) -> None: ...


class _Heap:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, str]] = []
        self.live: dict[str, tuple[int, Callable[[], None]]] = {}
        self.seq = itertools.count()

    def arm(self, key: str, when: float, fn: Callable[[], None]) -> None:
        n = next(self.seq)
        self.live[key] = (n, fn)
        heapq.heappush(self.heap, (when, n, key))

    def cancel(self, key: str) -> None:
        self.live.pop(key, None)

    def due(self, now: float) -> list[Callable[[], None]]:
        out = []
        while self.heap and self.heap[0][0] <= now:
            _, n, key = heapq.heappop(self.heap)
            entry = self.live.get(key)
            if entry is not None and entry[0] == n:
                del self.live[key]
                out.append(entry[1])
        return out

    def next_deadline(self) -> float | None:
        while self.heap and self.live.get(self.heap[0][2], (None,))[0] != self.heap[0][1]:
            heapq.heappop(self.heap)  # cancelled or re-armed
        return self.heap[0][0] if self.heap else None


class ThreadTimers:
    def __init__(self) -> None:
        self._h = _Heap()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="xdev-e1000-timers", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic()

    def arm(self, key: str, delay: float, fn: Callable[[], None]) -> None:
        when = self.now() + delay
        with self._cv:
            first = self._h.next_deadline()
            self._h.arm(key, when, fn)
            # The thread sleeps until the earliest deadline and looks again
            # then: it needs waking only for an earlier one. (Drivers re-arm
            # the packet timers with every batch.)
            if first is None or when < first:
                self._cv.notify()

    def cancel(self, key: str) -> None:
        with self._cv:
            self._h.cancel(key)

    def armed(self, key: str) -> bool:
        with self._cv:
            return key in self._h.live

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._closed:
                    return
                deadline = self._h.next_deadline()
                wait = None if deadline is None else max(0.0, deadline - self.now())
                if wait is None or wait > 0:
                    self._cv.wait(wait)
                due = self._h.due(self.now())
            for fn in due:
                fn()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)


class ManualTimers:
    """Virtual time for tests: nothing fires until :meth:`advance`."""

    def __init__(self) -> None:
        self._h = _Heap()
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def arm(self, key: str, delay: float, fn: Callable[[], None]) -> None:
        self._h.arm(key, self.t + delay, fn)

    def cancel(self, key: str) -> None:
        self._h.cancel(key)

    def armed(self, key: str) -> bool:
        return key in self._h.live

    def advance(self, seconds: float) -> None:
        end = self.t + seconds
        while True:
            deadline = self._h.next_deadline()
            if deadline is None or deadline > end:
                break
            self.t = max(self.t, deadline)
            for fn in self._h.due(self.t):
                fn()
        self.t = end

    def close(self) -> None:
        pass
