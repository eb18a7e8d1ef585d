"""The worker pool: completions under the device lock, errors handed over,
register accesses answered while work runs, reset drops stale completions."""

from __future__ import annotations

import threading

from pci_sample_device import SampleDevice

from xdevproto.pci.work import WorkQueue, run_unlocked


def test_completion_runs_under_the_lock_with_the_result() -> None:
    lock = threading.RLock()
    q = WorkQueue(lock, 2)
    seen: list[tuple[object, object, bool]] = []

    def done(result: int | None, error: BaseException | None) -> None:
        seen.append((result, error, lock._is_owned()))  # type: ignore[attr-defined]

    q.submit(lambda: 42, done)
    q.drain()
    assert seen == [(42, None, True)]
    q.shutdown()


def test_errors_reach_the_completion() -> None:
    q = WorkQueue(threading.RLock(), 1)
    errors: list[BaseException | None] = []

    def boom() -> int:
        raise OSError(5, "disk on fire")

    q.submit(boom, lambda r, e: errors.append(e))
    q.drain()
    assert isinstance(errors[0], OSError)
    q.shutdown()


def test_registers_answer_while_work_runs() -> None:
    dev = SampleDevice()
    gate = threading.Event()
    finished = threading.Event()
    dev.work.submit(lambda: gate.wait(10), lambda r, e: finished.set())
    # the worker is blocked; the register path is not
    assert dev.region_read(0, 0, 4) == (0x5A4D0001).to_bytes(4, "little")
    dev.region_write(0, 0x24, b"\x01\0\0\0")
    assert not finished.is_set()
    gate.set()
    dev.work.drain()
    assert finished.is_set()


def test_reset_waits_for_work_and_drops_its_completion() -> None:
    dev = SampleDevice()
    gate = threading.Event()
    completions: list[int] = []

    def slow() -> int:
        gate.wait(10)
        return 1

    dev.work.submit(slow, lambda r, e: completions.append(1))
    dev.work.cancel()  # what a reset does first
    gate.set()
    dev.reset()
    assert completions == []
    dev.work.submit(lambda: 2, lambda r, e: completions.append(2))
    dev.work.drain()
    assert completions == [2]


def test_drain_does_not_wait_forever_for_workers_blocked_on_messages() -> None:
    q = WorkQueue(threading.RLock(), 1)
    gate = threading.Event()
    q.submit(lambda: gate.wait(10))
    q.drain(blocked=lambda: 1, grace=0.01)  # returns although the worker is busy
    assert q.busy == 1
    gate.set()
    q.drain()
    assert q.busy == 0
    q.shutdown()


def test_run_unlocked_releases_every_level() -> None:
    lock = threading.RLock()
    with lock, lock:
        def probe() -> bool:
            got = lock.acquire(blocking=False)
            if got:
                lock.release()
            return not lock._is_owned()  # type: ignore[attr-defined]

        assert run_unlocked(lock, probe) is True
        assert lock._is_owned()  # type: ignore[attr-defined]
