"""HostSession's job protocol, timeouts and clean-up, against a fake QEMU.

The fake (fake_qemu.py) plays dom0's side of the run-share protocol on the
host, so these tests run in seconds and need neither QEMU nor an image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.emuhost import session as session_module
from bridge.emuhost.errors import BootError
from bridge.emuhost.image import Image
from bridge.emuhost.machine import BootConfig
from bridge.emuhost.session import HostSession, MachineLock

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


@pytest.fixture
def boot(tmp_path: Path) -> BootConfig:
    wrapper = tmp_path / "qemu"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} \"$@\"\n")
    wrapper.chmod(0o755)
    return BootConfig(qemu=str(wrapper), boot_timeout_s=20)


def _image(tmp_path: Path) -> Image:
    directory = tmp_path / "image"
    directory.mkdir(exist_ok=True)
    (directory / "busybox").write_bytes(b"")
    return Image(directory, "0" * 16, "6.1", 0.0, 0.0)


def _session(tmp_path: Path, boot: BootConfig) -> HostSession:
    return HostSession(_image(tmp_path), boot, tmp_path / "run", {}, log=lambda _m: None)


def test_jobs_run_in_order_and_report_status(tmp_path: Path, boot: BootConfig) -> None:
    with _session(tmp_path, boot) as session:
        first = session.run("echo one > out.txt; exit 3", timeout=20)
        second = session.run("echo two", timeout=20)
    assert first.exit_status == 3 and not first.timed_out
    assert first.file("out.txt") == "one\n"
    assert second.ok and second.output == "two\n"
    assert second.results_dir == tmp_path / "run/jobs/001"
    assert session._proc.poll() == 0  # powered off on request


def test_a_hung_dom0_is_killed_and_the_session_dies(
    tmp_path: Path, boot: BootConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOM0", "hang")
    monkeypatch.setattr(session_module, "JOB_GRACE_S", 0.5)
    session = _session(tmp_path, boot)
    try:
        result = session.run("true", timeout=0.5)
        assert result.timed_out and result.exit_status is None
        assert session._proc.poll() is not None  # QEMU's process group is gone
        with pytest.raises(BootError, match="gone"):
            session.run("true")
    finally:
        session.close()


def test_qemu_dying_gives_a_result_without_status(
    tmp_path: Path, boot: BootConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOM0", "die")
    with _session(tmp_path, boot) as session:
        result = session.run("true", timeout=5)
    assert result.exit_status is None and not result.timed_out
    assert "exit status None" in result.describe()


def test_close_kills_a_dom0_that_ignores_shutdown(
    tmp_path: Path, boot: BootConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOM0", "deaf")
    monkeypatch.setattr(session_module, "POWEROFF_GRACE_S", 0.5)
    session = _session(tmp_path, boot)
    assert session.run("true", timeout=5).ok
    session.close()
    assert session._proc.poll() is not None


def test_boot_that_never_comes_up_times_out(
    tmp_path: Path, boot: BootConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = tmp_path / "slow-qemu"
    wrapper.write_text("#!/bin/sh\nexec sleep 60\n")
    wrapper.chmod(0o755)
    slow = BootConfig(qemu=str(wrapper), boot_timeout_s=0.5)
    with _session(tmp_path, slow) as session:
        result = session.run("true", timeout=60)
        assert result.timed_out
        assert session._proc.poll() is not None


def test_machine_lock_queues_a_second_host(tmp_path: Path) -> None:
    path = tmp_path / "machine.lock"
    holder = subprocess.Popen(  # another process holds the machine
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(BootError, match="another emulated host"):
            MachineLock(path, wait_s=0.2, log=lambda _m: None)
    finally:
        holder.communicate("")
    MachineLock(path, wait_s=0.2).release()


def test_machine_lock_nests_within_one_process(tmp_path: Path) -> None:
    """A test booting its own host beside the session's must not wait for itself."""
    path = tmp_path / "machine.lock"
    outer = MachineLock(path, wait_s=0.2)
    inner = MachineLock(path, wait_s=0.2)
    outer.release()
    inner_again = MachineLock(path, wait_s=0.2)  # inner still holds it
    inner.release()
    inner_again.release()
    inner_again.release()  # a second release is a no-op
    checker = subprocess.run(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(path)], check=False)
    assert checker.returncode == 0  # the last release dropped the flock


def test_session_releases_the_machine_lock_on_close(tmp_path: Path, boot: BootConfig) -> None:
    lock = MachineLock(tmp_path / "machine.lock", wait_s=1)
    with HostSession(_image(tmp_path), boot, tmp_path / "run", {}, log=lambda _m: None,
                     lock=lock) as session:
        assert session.run("true", timeout=5).ok
    MachineLock(tmp_path / "machine.lock", wait_s=0.2).release()
