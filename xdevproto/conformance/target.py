"""The server under test: an existing socket, or a command the suite runs.

With ``--exec`` the suite starts the command with ``{socket}`` replaced by
a temporary path, waits for the socket, and restarts the server whenever it
has exited: libvfio-user's samples exit when their client disconnects, which
the spec allows ("Client Disconnection": the server can automatically exit).
A server killed by a signal has crashed; the check running at the time fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class TargetError(Exception):
    """The server under test cannot be started or reached."""


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Target:
    """A server reachable on a UNIX socket path."""

    #: True when the suite can tell a crash from an orderly exit
    observes_process = False
    #: how many times the suite started the server
    starts = 0
    #: a fresh server process for every check (exec targets only)
    fresh = False

    def __init__(self, path: str) -> None:
        self.path = path

    def ensure_up(self) -> None:
        """Make sure a server is listening (restart it if it exited)."""
        if not os.path.exists(self.path):
            raise TargetError(f"no socket at {self.path}")

    def begin_check(self) -> None:
        """Called before each check."""

    def restart(self) -> None:
        """Start a new server process (exec targets only)."""

    def exited(self) -> bool:
        """True if the server process is gone (only known for exec targets)."""
        return False

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the server process to exit."""
        return False

    def settle(self, hung_up: bool = False) -> str | None:
        """After a check: a message if the server crashed during it.
        ``hung_up``: the server closed a connection during the check."""
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"socket {self.path}"


class ExecTarget(Target):
    observes_process = True

    def __init__(self, command: str, *, start_timeout: float = 10.0, fresh: bool = False) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="xdev-conformance-")
        super().__init__(str(Path(self.tmpdir) / "server.sock"))
        if "{socket}" not in command:
            raise TargetError("the --exec command needs a {socket} placeholder")
        self.argv = [a.replace("{socket}", self.path) for a in shlex.split(command)]
        self.command = command
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(self.tmpdir) / "server.log"
        self.starts = 0
        self.fresh = fresh
        #: seen to exit on its own (after a client left): wait for that after checks
        self.exits_on_disconnect = False

    def describe(self) -> str:
        return f"exec {self.command}"

    def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with open(self.log, "ab") as log:
            try:
                # stdin is a pipe we never write: some servers (libvfio-user's
                # null sample) stop at end of input.
                self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log,
                                             stdin=subprocess.PIPE)
            except OSError as exc:
                raise TargetError(f"cannot start {self.argv[0]}: {exc}") from None
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetError(f"server exited with status {self.proc.returncode} before "
                                  f"listening; log: {self.log_tail()}")
            # Only test for the path: a test connection would be a client
            # to servers that accept exactly one.
            if os.path.exists(self.path):
                # Some servers bind, then fail setting up (libvfio-user's
                # server sample at efd091b): on the first start, give them a
                # moment to show it, so a broken server ends the run early.
                if self.starts == 1 and self.wait_exit(0.1):
                    raise TargetError(f"server exited with status {self.proc.returncode} "
                                      f"right after listening; log: {self.log_tail()}")
                return
            time.sleep(0.01)
        raise TargetError(f"server did not create {self.path} within {self.start_timeout}s")

    def log_tail(self, n: int = 600) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def ensure_up(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            crash = self._crash_message()
            self.proc = None
            if crash:
                # Died after the last check had ended: blame is uncertain, say so.
                raise TargetError(f"{crash} (found at the start of this check)")
            self.exits_on_disconnect = True
        if self.proc is None:
            self._start()

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def begin_check(self) -> None:
        if self.fresh:
            self.restart()

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        if timeout <= 0:
            return self.proc.poll() is not None
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def settle(self, hung_up: bool = False) -> str | None:
        if self.proc is None:
            return None
        # A server that hung up on us may be dying (crashing, or exiting as
        # it does after each client): give it a moment so that its end is
        # seen here, not at the next check. Servers that stay up cost nothing.
        self.wait_exit(0.05 if hung_up or self.exits_on_disconnect else 0.0)
        crash = self._crash_message()
        if crash:
            self.proc = None
        return crash

    def _crash_message(self) -> str | None:
        rc = self.proc.poll() if self.proc is not None else None
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            return f"server crashed (killed by {name}); log: {self.log_tail()}"
        return None

    def restart(self) -> None:
        self.stop()
        self._start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            if not self.wait_exit(3):
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.log.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(self.tmpdir)


def wait_for_socket(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _connectable(path):
            return True
        time.sleep(0.02)
    return False
