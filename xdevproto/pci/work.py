"""Work off the register path: long operations on worker threads.

A register write that starts disk or packet I/O submits the work here and
returns at once, so register accesses keep being answered while it runs
(DESIGN.md: "Register accesses must not wait for disk I/O"). The completion
callback runs with the device lock held, where it may update registers and
raise interrupts like any register hook.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("xdevproto.pci.work")

T = TypeVar("T")


class WorkQueue:
    """A worker pool whose completions run under ``lock``."""

    def __init__(self, lock: threading.RLock, workers: int = 4, name: str = "xdev-work") -> None:
        self.lock = lock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._busy = 0
        self._idle = threading.Condition()
        self.epoch = 0

    def submit(self, fn: Callable[[], T],
               done: Callable[[T | None, BaseException | None], None] | None = None,
               ) -> Future[T | None]:
        """Run ``fn()`` on a worker; then ``done(result, error)`` under the lock.

        Exactly one of ``result``/``error`` is meaningful: ``error`` is the
        exception ``fn`` raised (the device turns it into its error status).
        """
        with self._idle:
            self._busy += 1
        return self._pool.submit(self._run, fn, done, self.epoch)

    def _run(self, fn: Callable[[], T],
             done: Callable[[T | None, BaseException | None], None] | None,
             epoch: int) -> T | None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as exc:  # handed to the device, which owns the policy
            error = exc
        try:
            if done is not None:
                with self.lock:
                    if epoch == self.epoch:
                        done(result, error)
                    else:
                        log.info("completion of work from before a reset dropped")
            elif error is not None:
                log.error("work item failed: %s", error, exc_info=error)
        except Exception:
            log.exception("completion callback failed")
        finally:
            with self._idle:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.notify_all()
        return result

    @property
    def busy(self) -> int:
        return self._busy

    def drain(self, blocked: Callable[[], int] = lambda: 0, grace: float = 2.0) -> None:
        """Wait until no work is queued or running (STOP, reset, shutdown).

        Must be called without the device lock (completions need it).
        ``blocked()`` counts workers waiting for a DMA message answer: without
        a twin socket, that answer is read by the very thread that is draining,
        so once only such workers remain we wait at most ``grace`` seconds and
        go on rather than deadlock (their completions then run later, or are
        dropped after a reset).
        """
        with self._idle:
            while self._busy:
                if self._busy <= blocked():
                    self._idle.wait_for(lambda: self._busy == 0, timeout=grace)
                    if self._busy:
                        log.warning("%d work items wait for DMA messages; not waiting "
                                    "for them", self._busy)
                    return
                self._idle.wait(0.05)

    def cancel(self) -> None:
        """Reset: completions of work submitted so far will be dropped."""
        self.epoch += 1

    def shutdown(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)


def run_unlocked(lock: threading.RLock, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with every level of ``lock`` (held by us) released."""
    depth = 0
    while True:
        try:
            lock.release()
        except RuntimeError:
            break
        depth += 1
    try:
        return fn()
    finally:
        for _ in range(depth):
            lock.acquire()
