"""One boot of the emulated Xen host, serving any number of jobs.

The host side and dom0's ``boot.sh`` talk only through files in the run
share (``xdevrun``, mounted at /xdev/run), never through the console, whose
Xen serial line drops characters under load:

* the host writes ``jobs/NNN/`` (``run.sh``, ``env``, guest files) and then
  ``jobs/NNN/ready``; dom0 runs the jobs in order, each in a fresh subshell,
  destroys any guests a job left, and writes ``jobs/NNN/exit_status`` last;
* the host writes ``shutdown``; dom0 powers off.

Jobs share one dom0: files, loaded modules and started services persist from
one job to the next (guests do not). A test that needs a pristine dom0 boots
its own (``EmuHost.run``).

QEMU is always ended: on a job timeout, when it dies, on Ctrl-C, and when dom0
does not power off within a grace period after ``shutdown``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO

from bridge.emuhost.errors import BootError
from bridge.emuhost.guest import DOM0_RUN_DIR, GUESTS_SUBDIR, HvmGuest
from bridge.emuhost.image import Image, Log
from bridge.emuhost.machine import BootConfig, Share, qemu_command, repo_root

#: How long dom0 gets to power off after ``shutdown``.
POWEROFF_GRACE_S = 20.0
#: Extra host-side patience over a job's own (dom0-enforced) timeout.
JOB_GRACE_S = 30.0
_POLL_S = 0.25


@dataclass(frozen=True)
class RunResult:
    """What one job produced. ``exit_status`` is None when run.sh never finished."""

    exit_status: int | None
    results_dir: Path
    console_log: Path
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def output(self) -> str:
        """run.sh's stdout and stderr."""
        return _read(self.results_dir / "output.log")

    def file(self, name: str) -> str:
        """A file the job wrote into its directory (its cwd in dom0); "" if absent."""
        return _read(self.results_dir / name)

    def guest_serial(self, guest: str) -> str:
        return _read(self.results_dir / GUESTS_SUBDIR / f"{guest}.serial")

    def describe(self) -> str:
        """A failure message with the tails of the logs worth reading first."""
        parts = [
            f"exit status {self.exit_status}, timed out: {self.timed_out}, "
            f"{self.seconds:.0f} s, results in {self.results_dir}"
        ]
        session = self.console_log.parent
        for path in (self.results_dir / "output.log", session / "boot.log",
                     session / "qemu-stderr.log", self.console_log):
            text = _read(path)
            if text:
                parts.append(f"--- {path.name} (tail) ---\n" + "\n".join(text.splitlines()[-30:]))
        return "\n".join(parts)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if the harness itself dies.

    Linux prctl(2) PR_SET_PDEATHSIG (1); without it a killed test run would
    leave a 3 GiB QEMU spinning.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _dom0_file(name: str) -> bytes:
    return resources.files("bridge.emuhost").joinpath("dom0", name).read_bytes()


def _write_env(path: Path, variables: Mapping[str, str]) -> None:
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items()))


class MachineLock:
    """One emulated host at a time per cache directory (so per machine, normally).

    Two emulated hosts on a two-core machine do not each run at half speed:
    measured here, an HVM guest that reached user space in ~50 s alone
    printed nothing for over six minutes beside a second host. Queueing the
    boots gives every run its real speed and keeps timeouts meaningful.
    """

    #: Locks this process holds: path -> (open lock file, holders). flock(2)
    #: locks belong to one open file, so a second host booted by the same
    #: process (a test booting its own host while the session fixture's is
    #: up) would otherwise wait for itself until exclusive_wait_s ran out.
    _held: dict[Path, tuple[IO[str], int]] = {}

    def __init__(self, path: Path, *, wait_s: float, log: Log = print) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path: Path | None = path.resolve()
        if self._path in self._held:
            held, count = self._held[self._path]
            self._held[self._path] = (held, count + 1)
            return
        lock_file = open(path, "a")  # noqa: SIM115 -- held until the last release()
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held[self._path] = (lock_file, 1)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock_file.close()
                    self._path = None
                    raise BootError(
                        f"another emulated host held {path} for over {wait_s:.0f} s"
                    ) from None
                if not told:
                    log("waiting for another emulated Xen host on this machine to finish")
                    told = True
                time.sleep(1)

    def release(self) -> None:
        if self._path is None or self._path not in self._held:
            return
        lock_file, count = self._held[self._path]
        if count > 1:
            self._held[self._path] = (lock_file, count - 1)
        else:
            del self._held[self._path]
            lock_file.close()  # closing drops the flock
        self._path = None


def prepare_session_dir(directory: Path, shares: Mapping[str, Share]) -> dict[str, Share]:
    """Write what dom0's boot reads (boot.sh, helpers, share list); return all shares."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jobs").mkdir(exist_ok=True)
    (directory / "boot.sh").write_bytes(_dom0_file("boot.sh"))
    (directory / "lib").mkdir(exist_ok=True)
    (directory / "lib/emuhost.sh").write_bytes(_dom0_file("emuhost.sh"))
    (directory / "shares").write_text(
        "xdevrepo /xdev/repo ro\n"
        + "".join(f"{tag} /xdev/{tag} {'ro' if s.readonly else 'rw'}\n"
                  for tag, s in shares.items())
    )
    return {
        "xdevrun": Share(directory, readonly=False),
        "xdevrepo": Share(repo_root(), readonly=True),
        **shares,
    }


def prepare_job(
    directory: Path,
    number: int,
    image: Image,
    script: str,
    *,
    guests: Sequence[HvmGuest] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> Path:
    """Write job NNN's files (everything except ``ready``); return its directory.

    Files go to ``NNN.tmp`` first: a job that fails to build (a bad guest)
    never appears under its number, so dom0 does not wait for it forever.
    """
    final = directory / "jobs" / f"{number:03d}"
    job = final.with_name(final.name + ".tmp")
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir()
    try:
        _write_job(job, f"{DOM0_RUN_DIR}/jobs/{final.name}", image, script, guests, env, timeout)
    except BaseException:
        shutil.rmtree(job, ignore_errors=True)
        raise
    job.rename(final)
    return final


def _write_job(
    job: Path,
    dom0_dir: str,
    image: Image,
    script: str,
    guests: Sequence[HvmGuest],
    env: Mapping[str, str] | None,
    timeout: float,
) -> None:
    (job / "run.sh").write_text(script)
    _write_env(job / "env", {
        "XDEV_RUN": dom0_dir,
        "XDEV_REPO": "/xdev/repo",
        "XDEV_LIB": f"{DOM0_RUN_DIR}/lib/emuhost.sh",
        "XDEV_GUEST_KERNEL": image.dom0_kernel_path,
        "XDEV_SCRIPT_TIMEOUT": str(max(1, int(timeout))),
        "PYTHONPATH": "/xdev/repo",
        **(env or {}),
    })
    guest_dir = job / GUESTS_SUBDIR
    guest_dir.mkdir()
    busybox = image.busybox.read_bytes() if guests else b""
    for guest in guests:
        config = guest.xl_config(image.dom0_kernel_path, dom0_dir)
        (guest_dir / f"{guest.name}.cfg").write_text(config)
        (guest_dir / f"{guest.name}.initrd").write_bytes(
            guest.initramfs(busybox, image.modules_dir)
        )


class HostSession:
    """A booted (or booting) emulated host; use as a context manager.

    >>> with EmuHost().session() as session:
    ...     first = session.run("xl info > info.txt")
    ...     second = session.run(". $XDEV_LIB; xdev_guest_run g DONE", guests=[guest])
    """

    def __init__(
        self,
        image: Image,
        boot: BootConfig,
        directory: Path,
        shares: Mapping[str, Share],
        *,
        log: Log = print,
        lock: MachineLock | None = None,
    ) -> None:
        self._lock = lock
        try:
            self.image = image
            self.directory = directory
            self.console_log = directory / "console.log"
            self._log = log
            self._next_job = 0
            self._dead: str | None = None
            self._started = time.monotonic()
            self._boot_timeout = boot.boot_timeout_s
            attach = prepare_session_dir(directory, shares)
            argv = qemu_command(image, boot, attach, console=f"file:{self.console_log}")
            (directory / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")
            log(f"booting the emulated Xen host; results in {directory}")
            with open(directory / "qemu-stderr.log", "wb") as stderr:
                try:
                    self._proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                        start_new_session=True,  # its own process group, killed as one
                        preexec_fn=_die_with_parent,
                    )
                except OSError as exc:
                    raise BootError(f"cannot start {argv[0]}: {exc}") from exc
        except BaseException:
            if lock:
                lock.release()
            raise

    # -- jobs -------------------------------------------------------------

    def run(
        self,
        script: str,
        *,
        guests: Sequence[HvmGuest] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> RunResult:
        """Run ``script`` (sh, as root) in dom0 and wait for it.

        ``timeout`` bounds the script (dom0 kills it, status 124); the clock
        starts when dom0 is up, so the first job does not pay for the boot.
        If dom0 stops answering, QEMU is killed and the session is dead.
        """
        if self._dead:
            raise BootError(f"the emulated host is gone: {self._dead}")
        job = prepare_job(self.directory, self._next_job, self.image, script,
                          guests=guests, env=env, timeout=timeout)
        self._next_job += 1
        (job / "ready").write_text("")
        started = time.monotonic()
        timed_out = self._wait_for(job / "exit_status", timeout + JOB_GRACE_S)
        status = _read(job / "exit_status").strip()
        exit_status = int(status) if status.lstrip("-").isdigit() else None
        return RunResult(
            exit_status=exit_status,
            results_dir=job,
            console_log=self.console_log,
            timed_out=timed_out or exit_status == 124,
            seconds=time.monotonic() - started,
        )

    def _wait_for(self, path: Path, timeout: float) -> bool:
        """Wait for dom0 to write ``path``; True if it timed out (QEMU then killed)."""
        ready = self.directory / "dom0-ready-uptime"
        boot_deadline = self._started + self._boot_timeout
        deadline: float | None = None
        while not path.exists():
            now = time.monotonic()
            if deadline is None and ready.exists():
                deadline = now + timeout
            if self._proc.poll() is not None:
                self._dead = f"QEMU exited with status {self._proc.returncode}"
                return False
            if (deadline is None and now > boot_deadline) or (deadline and now > deadline):
                self._dead = "timed out" + ("" if deadline else " before dom0 was up")
                self.kill()
                return True
            time.sleep(_POLL_S)
        return False

    # -- life cycle -------------------------------------------------------

    def close(self) -> None:
        """Ask dom0 to power off; kill QEMU if it has not within the grace period."""
        try:
            if self._proc.poll() is None and not self._dead:
                (self.directory / "shutdown").write_text("")
                try:
                    self._proc.wait(timeout=POWEROFF_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._log("dom0 did not power off in time; killing QEMU")
        finally:
            self.kill()
            self._dead = self._dead or "closed"
            if self._lock:
                self._lock.release()

    def kill(self) -> None:
        """End QEMU's process group now."""
        proc = self._proc
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> HostSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
