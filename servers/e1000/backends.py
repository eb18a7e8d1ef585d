"""Network back ends: where the NIC's frames go and come from.

* :class:`TapBackend`: a Linux tap device, opened by name through
  ``/dev/net/tun`` (TUNSETIFF, IFF_TAP | IFF_NO_PI) or taken as an inherited
  fd so the server needs no privilege.
* :class:`DgramBackend`: one frame per UDP datagram, the wire format of
  QEMU's ``-netdev dgram`` and ``-netdev socket,udp=``.
* :class:`StreamBackend`: each frame preceded by its length as a 4-byte
  big-endian integer, the format of QEMU's ``-netdev stream`` and
  ``-netdev socket,connect=/listen=``; connects or listens (one peer).
* :class:`PcapWriter`: an optional capture of every frame in both
  directions (classic pcap, LINKTYPE_ETHERNET).

Every back end delivers received frames from its own thread to one
callback, in batches of what it found already waiting (at most
:data:`RX_BATCH`), so the NIC stores many frames for each wake-up and lock
acquisition. Nothing queues without bound: the callback (the NIC) drops a
frame it has no room for, and a send that would block is dropped and
counted. Peers are untrusted: a stream length beyond :data:`MAX_FRAME`
closes the connection.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from . import mmsg

log = logging.getLogger(__name__)

MAX_FRAME = 65536 + 4  # QEMU's NET_BUFSIZE-sized frames; anything larger is an error
SEND_QUEUE = 256  # frames waiting for a slow stream peer before we drop
RX_BATCH = 64  # frames handed to the NIC at once, at most

FrameSink = Callable[[list[bytes]], object]  # frames received, oldest first
LinkSink = Callable[[bool], None]


class BackendError(OSError):
    """A back end could not be opened or configured."""


class Backend:
    """Common machinery: a receive thread, counters, link notification.

    Subclasses implement :meth:`_receive` (return the frames waiting, at
    most RX_BATCH, none on timeout; raise EOFError when the peer is gone)
    and :meth:`_send`.
    """

    name = "backend"

    def __init__(self) -> None:
        self.on_frames: FrameSink = lambda frames: None
        self.on_link: LinkSink = lambda up: None
        self.link_up = True
        self.tx_dropped = 0
        self.rx_frames = 0
        self.tx_frames = 0
        self.pcap: PcapWriter | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_frames: FrameSink, on_link: LinkSink | None = None) -> None:
        self.on_frames = on_frames
        if on_link is not None:
            self.on_link = on_link
        self._thread = threading.Thread(target=self._run, name=f"xdev-e1000-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frames = self._receive(0.2)
            except EOFError:
                self._set_link(False)
                if not self._reconnect():
                    return
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("%s: receive failed: %s", self.name, exc)
                time.sleep(0.1)
                continue
            if not frames:
                continue
            self.rx_frames += len(frames)
            if self.pcap is not None:
                for frame in frames:
                    self.pcap.write(frame)
            self.on_frames(frames)

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            log.info("%s: link %s", self.name, "up" if up else "down")
            self.on_link(up)

    def _reconnect(self) -> bool:
        """Called when the peer went away; True to keep receiving."""
        return False

    def send(self, frame: bytes) -> None:
        """Hand one frame to the wire; never blocks, drops when it would."""
        self.send_frames((frame,))

    def send_frames(self, frames: Iterable[bytes]) -> None:
        """Hand frames to the wire in order (a transmit batch); never
        blocks, drops each that would."""
        pcap, send = self.pcap, self._send
        for frame in frames:
            if pcap is not None:
                pcap.write(frame)
            try:
                if send(frame):
                    self.tx_frames += 1
                    continue
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED,
                                     errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                    log.warning("%s: send failed: %s", self.name, exc)
            self.tx_dropped += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self._close()
        log.info("%s: %d frames sent, %d received, %d dropped on send", self.name,
                 self.tx_frames, self.rx_frames, self.tx_dropped)
        if self.pcap is not None:
            self.pcap.close()

    # -- per back end --------------------------------------------------------------
    def _receive(self, timeout: float) -> list[bytes]:
        raise NotImplementedError

    def _send(self, frame: bytes) -> bool:
        raise NotImplementedError

    def _close(self) -> None:
        pass


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _drain(readinto: Callable[[memoryview], int], fd: int, timeout: float,
           buf: memoryview) -> list[bytes]:
    """Frames from ``readinto(buf)``, a non-blocking read of one frame into
    ``buf`` (MAX_FRAME bytes, the back end's own): up to RX_BATCH of those
    already waiting, or, when none is, the first to come within
    ``timeout``. Trying before waiting saves a select per batch.

    Each frame is copied out of the one buffer. Reading into a fresh
    MAX_FRAME-sized bytes object instead (``recv(MAX_FRAME)``) costs twice
    as much per frame: the allocator hands such blocks back to the system
    when they are shrunk and freed, and asks for them again (brk, page
    faults)."""
    frames: list[bytes] = []
    while len(frames) < RX_BATCH:
        try:
            n = readinto(buf)
        except BlockingIOError:
            if frames or not _readable(fd, timeout):
                break
            timeout = 0  # readable yet nothing to read: look once more, do not wait again
            continue
        frames.append(buf[:n].tobytes())
    return frames


class NullBackend(Backend):
    """No wire: frames sent are counted and discarded; the link is up."""

    name = "null"

    def _receive(self, timeout: float) -> list[bytes]:
        self._stop.wait(timeout)
        return []

    def _send(self, frame: bytes) -> bool:
        return True


# -- tap ------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


class TapBackend(Backend):
    """A tap device: each read() is one frame, each write() sends one."""

    name = "tap"

    def __init__(self, *, ifname: str | None = None, fd: int | None = None) -> None:
        super().__init__()
        if fd is None:
            if not ifname:
                raise BackendError(errno.EINVAL, "tap needs ifname= or fd=")
            fd = open_tap(ifname)
        self.fd = fd
        self._rbuf = memoryview(bytearray(MAX_FRAME))
        os.set_blocking(fd, False)
        self.ifname = ifname

    def _receive(self, timeout: float) -> list[bytes]:
        return _drain(self._readinto, self.fd, timeout, self._rbuf)

    def _readinto(self, buf: memoryview) -> int:
        return os.readv(self.fd, (buf,))

    def _send(self, frame: bytes) -> bool:
        return os.write(self.fd, frame) == len(frame)

    def _close(self) -> None:
        os.close(self.fd)


def open_tap(ifname: str) -> int:
    """Attach to (or create, with CAP_NET_ADMIN) the tap interface ``ifname``."""
    if len(ifname.encode()) >= 16:
        raise BackendError(errno.EINVAL, f"interface name too long: {ifname}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise BackendError(exc.errno, f"TUNSETIFF {ifname}: {exc.strerror}") from None
    return fd


# -- datagram -------------------------------------------------------------------------


def _resolve(hostport: str) -> tuple[int, tuple[str, int]]:
    """'HOST:PORT' or '[V6]:PORT' to (family, address)."""
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BackendError(errno.EINVAL, f"expected HOST:PORT, got {hostport!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise BackendError(errno.EINVAL, f"cannot resolve {hostport}: {exc}") from None
    family, _, _, _, addr = info[0]
    return family, (str(addr[0]), int(addr[1]))


class DgramBackend(Backend):
    """One Ethernet frame per UDP datagram (QEMU ``-netdev dgram``)."""

    name = "dgram"

    def __init__(self, *, local: str, remote: str | None = None,
                 sock: socket.socket | None = None) -> None:
        super().__init__()
        if sock is None:
            family, laddr = _resolve(local)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(laddr)
            except OSError as exc:
                sock.close()
                raise BackendError(exc.errno, f"bind {local}: {exc.strerror}") from None
        self.sock = sock
        self._rbuf = memoryview(bytearray(MAX_FRAME))
        self.sock.setblocking(False)
        self.remote = _resolve(remote)[1] if remote else None
        self._batch = mmsg.batch_reader(self.sock)

    def _receive(self, timeout: float) -> list[bytes]:
        fd = self.sock.fileno()
        if self.remote is None:
            return _drain(self._recv_learning, fd, timeout, self._rbuf)
        if self._batch is None:
            # recv: it builds no address, unlike recvfrom.
            return _drain(self.sock.recv_into, fd, timeout, self._rbuf)
        # Once the peer is known, a batch per system call (recvmmsg).
        frames = self._batch.read(RX_BATCH)
        if frames or not _readable(fd, timeout):
            return frames
        return self._batch.read(RX_BATCH)

    def _recv_learning(self, buf: memoryview) -> int:
        n, peer = self.sock.recvfrom_into(buf)
        if self.remote is None:
            self.remote = peer[:2]  # answer whoever speaks first
        return int(n)

    def _send(self, frame: bytes) -> bool:
        if self.remote is None:
            return False
        return self.sock.sendto(frame, self.remote) == len(frame)

    def _close(self) -> None:
        self.sock.close()


# -- stream ---------------------------------------------------------------------------

_LEN = struct.Struct(">I")


class StreamBackend(Backend):
    """Length-prefixed frames over TCP or a UNIX stream (QEMU ``-netdev stream``).

    ``connect=`` retries until the peer listens (link down meanwhile);
    ``listen=`` accepts one peer at a time. A sender thread drains a bounded
    queue so a slow peer never stalls the device.
    """

    name = "stream"

    def __init__(self, *, connect: str | None = None, listen: str | None = None,
                 sock: socket.socket | None = None) -> None:
        super().__init__()
        self.connect_to = connect
        self.listener: socket.socket | None = None
        self.peer: socket.socket | None = sock
        if listen is not None:
            family, addr = _resolve(listen)
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.listener.bind(addr)
            except OSError as exc:
                self.listener.close()
                raise BackendError(exc.errno, f"bind {listen}: {exc.strerror}") from None
            self.listener.listen(1)
        elif connect is None and sock is None:
            raise BackendError(errno.EINVAL, "stream needs connect=, listen= or a socket")
        self.link_up = self.peer is not None
        self._buf = bytearray()
        self._rbuf = memoryview(bytearray(MAX_FRAME + 4))
        self._out: queue.Queue[bytes] = queue.Queue(SEND_QUEUE)
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name="xdev-e1000-stream-tx")
        self._sender.start()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where ``listen=`` listens (useful with port 0)."""
        return self.listener.getsockname()[:2] if self.listener is not None else None

    def _establish(self, timeout: float) -> bool:
        if self.listener is not None:
            if not _readable(self.listener.fileno(), timeout):
                return False
            self.peer, _ = self.listener.accept()
        else:
            assert self.connect_to is not None  # checked in __init__
            family, addr = _resolve(self.connect_to)
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.settimeout(timeout)
                s.connect(addr)
            except OSError:
                s.close()
                self._stop.wait(timeout)
                return False
            self.peer = s
        if self.peer.family in (socket.AF_INET, socket.AF_INET6):
            self.peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf.clear()
        self._set_link(True)
        return True

    def _receive(self, timeout: float) -> list[bytes]:
        if self.peer is None:
            self._establish(timeout)
            return []
        frames = self._take()
        if frames:
            return frames
        if not _readable(self.peer.fileno(), timeout):
            return []
        n = self.peer.recv_into(self._rbuf)  # not recv(): see _drain
        if not n:
            raise EOFError
        self._buf += self._rbuf[:n]
        return self._take()

    def _take(self) -> list[bytes]:
        """The whole frames at the front of the buffer, at most RX_BATCH.
        A length beyond MAX_FRAME disconnects once the frames before it
        are delivered."""
        buf = self._buf
        frames: list[bytes] = []
        pos = 0
        while len(frames) < RX_BATCH and len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME:
                if frames:
                    break
                log.warning("stream peer sent a %d-byte frame: disconnecting", n)
                raise EOFError
            if len(buf) - pos < 4 + n:
                break
            frames.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]  # once per batch: each deletion moves the rest of the buffer
        return frames

    def _reconnect(self) -> bool:
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        return not self._stop.is_set()

    def _send(self, frame: bytes) -> bool:
        if self.peer is None:
            return False
        try:
            self._out.put_nowait(_LEN.pack(len(frame)) + frame)
        except queue.Full:
            return False
        return True

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._out.get(timeout=0.2)
            except queue.Empty:
                continue
            peer = self.peer
            if peer is None:
                continue
            try:
                peer.sendall(data)
            except OSError:
                self.tx_dropped += 1

    def _close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.listener is not None:
            self.listener.close()


# -- pcap -----------------------------------------------------------------------------

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1


class PcapWriter:
    """Classic pcap (microsecond timestamps), safe to call from any thread."""

    def __init__(self, out: BinaryIO, snaplen: int = MAX_FRAME) -> None:
        self.out = out
        self.snaplen = snaplen
        self.lock = threading.Lock()
        out.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        out.flush()

    @classmethod
    def open(cls, path: str) -> PcapWriter:
        return cls(open(path, "wb"))

    def write(self, frame: bytes, when: float | None = None) -> None:
        t = time.time() if when is None else when
        sec = int(t)
        data = frame[:self.snaplen]
        with self.lock:
            if self.out.closed:
                return
            self.out.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(data), len(frame)))
            self.out.write(data)
            self.out.flush()

    def close(self) -> None:
        with self.lock:
            self.out.close()


# -- option parsing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetdevSpec:
    """A parsed ``--netdev`` value: kind plus key=value options."""

    kind: str
    options: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return dict(self.options).get(key)


_KEYS = {
    "tap": {"ifname", "fd"},
    "dgram": {"local", "remote"},
    "stream": {"connect", "listen"},
    "null": set(),
}


def parse_netdev(text: str) -> NetdevSpec:
    """``tap,ifname=NAME`` / ``tap,fd=N`` / ``dgram,local=H:P[,remote=H:P]`` /
    ``stream,connect=H:P`` / ``stream,listen=H:P`` / ``null``."""
    kind, *rest = text.split(",")
    if kind not in _KEYS:
        raise ValueError(f"unknown netdev kind {kind!r} (tap, dgram, stream, null)")
    opts = []
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS[kind]:
            raise ValueError(f"{kind}: unknown option {item!r}")
        opts.append((key, value))
    d = dict(opts)
    if kind == "tap" and ("ifname" in d) == ("fd" in d):
        raise ValueError("tap needs exactly one of ifname= and fd=")
    if kind == "tap" and "fd" in d and not d["fd"].isdigit():
        raise ValueError("tap fd= must be a number")
    if kind == "dgram" and "local" not in d:
        raise ValueError("dgram needs local=HOST:PORT")
    if kind == "stream" and ("connect" in d) == ("listen" in d):
        raise ValueError("stream needs exactly one of connect= and listen=")
    return NetdevSpec(kind, tuple(opts))


def open_backend(spec: NetdevSpec) -> Backend:
    if spec.kind == "tap":
        fd = spec.get("fd")
        return TapBackend(ifname=spec.get("ifname"), fd=int(fd) if fd is not None else None)
    if spec.kind == "dgram":
        local = spec.get("local")
        assert local is not None  # parse_netdev requires it
        return DgramBackend(local=local, remote=spec.get("remote"))
    if spec.kind == "stream":
        return StreamBackend(connect=spec.get("connect"), listen=spec.get("listen"))
    return NullBackend()
