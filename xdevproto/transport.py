"""Byte transports for vfio-user.

* AF_UNIX stream with SCM_RIGHTS, the standard transport ("Transport" in the
  spec). A message's fds travel in the same ``sendmsg()`` as its header, and
  each message is sent with one call, because libvfio-user reads a body
  with a single ``recv()``.
* TCP stream, without fd passing. Guest memory then goes over DMA_READ/
  DMA_WRITE messages and no region can be mmap'ed; VERSION advertises
  ``max_msg_fds = 0``.
* Listening on a path, or on a socket inherited from systemd
  (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, sd_listen_fds(3)).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConnectionClosed, LocalProtocolError, PeerProtocolError

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 20
SD_LISTEN_FDS_START = 3


class Transport:
    """A connected stream socket that may or may not pass fds."""

    def __init__(self, sock: socket.socket, *, max_recv_fds: int = 8) -> None:
        self.sock = sock
        self.passes_fds = sock.family == socket.AF_UNIX
        self._anc = socket.CMSG_SPACE(max(1, max_recv_fds) * array.array("i").itemsize)
        self._max_recv_fds = max_recv_fds
        # One receive buffer for the connection's life: recvmsg(n) would
        # allocate (and fault in) n fresh bytes on every call.
        self.rbuf = bytearray(RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        self._send = sock.send
        self._recvmsg_into = sock.recvmsg_into if self.passes_fds else None
        self._rbufs = [self.rbuf]

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one message with one system call (more only if the kernel
        takes it in parts); fds ride on the first call."""
        if not fds and len(data) <= 4096:
            # Small messages: a blocking stream socket takes them whole.
            try:
                sent = self._send(data)
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
                return
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"peer went away: {exc}") from None
        try:
            if fds:
                if not self.passes_fds:
                    raise LocalProtocolError("this transport cannot pass file descriptors")
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], anc)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosed(f"peer went away: {exc}") from None

    def recv(self) -> tuple[memoryview, list[int]]:
        """Whatever the socket has (empty at EOF), with any fds that came.

        The view points into the transport's buffer: consume it before the
        next recv().
        """
        try:
            if self._recvmsg_into is None:
                n = self.sock.recv_into(self.rbuf)
                return self.rview[:n], []
            n, anc, flags, _ = self._recvmsg_into(self._rbufs, self._anc)
        except ConnectionResetError:
            return self.rview[:0], []
        data = self.rview[:n]
        if not anc and not flags:
            return data, []
        fds = fds_from_ancillary(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise PeerProtocolError("peer sent more file descriptors than we accept",
                                    errno.EINVAL, fatal=True)
        return data, fds

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


# -- peers and credentials ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    """SO_PEERCRED of a connected AF_UNIX socket (None for other families)."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCred(*struct.unpack("3i", raw))


# -- addresses ------------------------------------------------------------------


def parse_address(addr: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:/path``, a bare path, or ``tcp:HOST:PORT`` -> (kind, address)."""
    if addr.startswith("tcp:"):
        host, _, port = addr[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad TCP address {addr!r}, want tcp:HOST:PORT")
        return "tcp", (host.strip("[]"), int(port))
    if addr.startswith("unix:"):
        addr = addr[5:]
    if not addr:
        raise ValueError("empty socket path")
    return "unix", addr


def connect(addr: str, timeout: float | None = None) -> socket.socket:
    kind, where = parse_address(addr)
    if kind == "tcp":
        assert isinstance(where, tuple)
        sock = socket.create_connection(where, timeout=timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def listen(addr: str, *, mode: int = 0o600, backlog: int = 4) -> socket.socket:
    """Listen on a UNIX path (replacing a stale socket, never another file)
    or a TCP address."""
    kind, where = parse_address(addr)
    if kind == "tcp":
        assert isinstance(where, tuple)
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(backlog)
        return sock
    assert isinstance(where, str)
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", where)
        os.unlink(where)
    # Bind under a temporary name and rename once listening: whoever sees
    # the path can connect (no window between bind() and listen()).
    tmp = f"{where}{_bind_suffix()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(backlog)
        os.rename(tmp, where)
    except BaseException:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.umask(old)
    return sock


def _bind_suffix() -> str:
    return f".{os.getpid()}.tmp"


def listening_path(sock: socket.socket) -> str | None:
    """The path a UNIX listener from :func:`listen` serves on (the kernel
    still reports the temporary name it was bound to); None if unnamed."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if not isinstance(name, str) or not name:
        return None
    return name.removesuffix(_bind_suffix())


def listen_fds(unset_environment: bool = True) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by name (sd_listen_fds(3)).

    Unnamed sockets are keyed ``"fd3"``, ``"fd4"``, ... Returns {} when the
    environment does not name this process.
    """
    env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    if pid != os.getpid() or count <= 0:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[name] = socket.socket(fileno=fd)
    return out


def socket_from_fd(fd: int) -> socket.socket:
    """A socket object for an inherited descriptor (``--fd N``)."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock
