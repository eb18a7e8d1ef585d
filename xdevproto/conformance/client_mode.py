"""Client conformance: a checking server that a client under test talks to.

The checking server speaks over the raw layer (it must be able to send
server commands at awkward moments) and plays a small PCI device:

* it advertises ``max_msg_fds = 1`` and ``max_data_xfer_size = 4096`` and
  declines twin-socket mode, so server commands share the main socket;
* BAR2 is mmap-able with a sparse capability, so its region info does not
  fit in 32 bytes: a client asking with the bare struct gets the needed
  argsz and must ask again ("Message sizes");
* right after a DMA_MAP, before replying to the client's next command, it
  sends a DMA_WRITE and then a DMA_READ of the same bytes ("Command
  Concurrency": server messages may appear between a request and its reply);
* it answers region info for index 8 (VGA) and a REGION_READ of BAR0 offset
  0x20 with error replies.

Everything the client sends is recorded; the client checks then judge the
record. A check the client gave no occasion for is "not applicable".
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shlex
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import wire
from ..wire import Command, HeaderFlags, RegionFlags
from .model import Transcript
from .rawpeer import Msg, PeerClosed, PeerTimeout, RawPeer

XFER = 4096
MAX_FDS = 1
BAR0_SIZE = 0x2000
BAR2_SIZE = 0x10000
ERROR_OFFSET = 0x20
DMA_PATTERN = bytes(range(0xA0, 0xB0))
SPARSE = wire.SparseMmapCap((wire.SparseArea(0, BAR2_SIZE // 2),))
IRQ_COUNTS = {0: 1, 1: 1, 2: 4, 3: 1, 4: 1}
FIXED_REPLY = {Command.DEVICE_GET_INFO: 16, Command.DEVICE_GET_IRQ_INFO: 16,
               Command.DEVICE_GET_REGION_INFO: 32}


@dataclass
class DmaProbe:
    """Our DMA_WRITE then DMA_READ of one mapped address, and the answers."""

    address: int
    write_reply: Msg | None = None
    read_reply: Msg | None = None
    problem: str = ""


@dataclass
class Observation:
    """What the client did, for the client checks to judge."""

    commands: list[Msg] = field(default_factory=list)
    version: wire.Version | None = None
    version_error: str = ""
    region_info_asks: list[tuple[int, int]] = field(default_factory=list)  # (index, argsz)
    dma_probes: list[DmaProbe] = field(default_factory=list)
    errors_sent: list[int] = field(default_factory=list)  # index into commands
    exit_status: int | None = None
    connected: bool = False
    ended: str = ""
    transcript: Transcript = field(default_factory=Transcript)

    def of(self, *commands: int) -> list[Msg]:
        return [m for m in self.commands if m.command in commands]


class CheckingServer:
    """Serves one client connection and records it."""

    def __init__(self, peer: RawPeer, obs: Observation) -> None:
        self.peer = peer
        self.obs = obs
        self.bar0 = bytearray(BAR0_SIZE)
        struct.pack_into("<I", self.bar0, 0, 0x78646576)
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, 0x1B36, 0x0005)
        self.bar2_fd = os.memfd_create("xdev-conformance-bar2", os.MFD_CLOEXEC)
        os.ftruncate(self.bar2_fd, BAR2_SIZE)
        self.maps: list[tuple[int, int, mmap.mmap | None]] = []
        self.probe_next = False

    def close(self) -> None:
        os.close(self.bar2_fd)
        for _, _, mem in self.maps:
            if mem is not None:
                mem.close()

    def run(self) -> None:
        while True:
            try:
                msg = self.peer.recv()
            except PeerClosed:
                self.obs.ended = "client closed the connection"
                return
            except PeerTimeout:
                self.obs.ended = "client went quiet"
                return
            self.obs.commands.append(msg)
            if msg.is_reply:
                continue  # a stray reply: recorded, judged by the checks
            if self.probe_next and self.maps:
                self.probe_next = False
                self._dma_probe()
            self._answer(msg)

    # -- replies -------------------------------------------------------------------
    def _reply(self, msg: Msg, payload: bytes = b"", fds: list[int] | None = None) -> None:
        if not msg.flags & HeaderFlags.NO_REPLY:
            self.peer.send(msg.command, payload, fds=fds or [], msg_id=msg.msg_id,
                           flags=HeaderFlags.REPLY)

    def _error(self, msg: Msg, err: int) -> None:
        self.obs.errors_sent.append(len(self.obs.commands) - 1)
        if not msg.flags & HeaderFlags.NO_REPLY:
            self.peer.send(msg.command, msg_id=msg.msg_id,
                           flags=HeaderFlags.REPLY | HeaderFlags.ERROR, error=err)

    def _answer(self, msg: Msg) -> None:
        fds, msg.fds = msg.fds, []
        cmd = msg.command
        try:
            if cmd == Command.VERSION:
                self._version(msg)
            elif cmd == Command.DEVICE_GET_INFO:
                self._reply(msg, wire.DeviceInfo(16, 3, 9, 5).encode())
            elif cmd == Command.DEVICE_GET_REGION_INFO:
                self._region_info(msg)
            elif cmd == Command.DEVICE_GET_IRQ_INFO:
                idx = _u32(msg.payload, 8)
                if idx not in IRQ_COUNTS:
                    self._error(msg, errno.EINVAL)
                else:
                    flags = wire.IrqInfoFlags.EVENTFD | (wire.IrqInfoFlags.MASKABLE if idx == 0
                                                         else 0)
                    self._reply(msg, wire.IrqInfo(16, flags, idx, IRQ_COUNTS[idx]).encode())
            elif cmd in (Command.REGION_READ, Command.REGION_WRITE):
                self._access(msg)
            elif cmd == Command.DMA_MAP:
                self._dma_map(msg, fds)
                fds = []
            elif cmd == Command.DMA_UNMAP:
                self._reply(msg, msg.payload[:24])
            elif cmd in (Command.DEVICE_SET_IRQS, Command.DEVICE_RESET):
                self._reply(msg)
            elif cmd == Command.DEVICE_FEATURE:
                self._error(msg, errno.ENOTSUP)
            else:
                self._error(msg, errno.ENOSYS)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _version(self, msg: Msg) -> None:
        try:
            self.obs.version = wire.Version.decode(msg.payload)
        except Exception as exc:  # recorded, judged by client.version-format
            self.obs.version_error = str(exc)
        caps = wire.Capabilities(max_msg_fds=MAX_FDS, max_data_xfer_size=XFER)
        self._reply(msg, wire.Version(0, min(self.obs.version.minor, 2)
                                      if self.obs.version else 0, caps).encode())

    def _region_info(self, msg: Msg) -> None:
        argsz, idx = _u32(msg.payload, 0), _u32(msg.payload, 8)
        self.obs.region_info_asks.append((idx, argsz))
        if idx == 8:
            self._error(msg, errno.ENOENT)
            return
        if idx >= 9:
            self._error(msg, errno.EINVAL)
            return
        rw = RegionFlags.READ | RegionFlags.WRITE
        if idx == 2:
            full = wire.RegionInfo(0, rw | RegionFlags.MMAP | RegionFlags.CAPS, 2, 32,
                                   BAR2_SIZE, 0, (SPARSE,))
            need = full.encoded_size
            if argsz < need:
                self._reply(msg, wire.RegionInfo(need, rw | RegionFlags.MMAP, 2, 0, BAR2_SIZE,
                                                 0).encode())
            else:
                out = wire.RegionInfo(need, full.flags, 2, 32, BAR2_SIZE, 0, (SPARSE,))
                self._reply(msg, out.encode(), [self.bar2_fd])
            return
        size = {0: BAR0_SIZE, 7: len(self.config)}.get(idx, 0)
        self._reply(msg, wire.RegionInfo(32, rw if size else 0, idx, 0, size, 0).encode())

    def _access(self, msg: Msg) -> None:
        if len(msg.payload) < 16:
            self._error(msg, errno.EINVAL)
            return
        offset, region, count = wire.REGION_ACCESS.unpack_from(msg.payload)
        backing = {0: self.bar0, 7: self.config}.get(region)
        if backing is None and region == 2:
            backing = bytearray(BAR2_SIZE)
        if backing is None or offset + count > len(backing) or count > XFER:
            self._error(msg, errno.EINVAL)
            return
        head = wire.REGION_ACCESS.pack(offset, region, count)
        if msg.command == Command.REGION_READ:
            if region == 0 and offset == ERROR_OFFSET:
                self._error(msg, errno.EIO)
                return
            self._reply(msg, head + bytes(backing[offset:offset + count]))
        else:
            backing[offset:offset + count] = msg.payload[16:16 + count]
            self._reply(msg, head)

    def _dma_map(self, msg: Msg, fds: list[int]) -> None:
        if len(msg.payload) < 32:
            self._error(msg, errno.EINVAL)
            return
        _, _, offset, address, size = struct.unpack_from("<IIQQQ", msg.payload)
        mem = None
        if fds:
            try:
                mem = mmap.mmap(fds[0], size + offset) if size else None
            except (OSError, ValueError, OverflowError):
                mem = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if size:
            self.maps.append((address, size, mem))
            self.probe_next = True
        self._reply(msg)

    # -- server commands in the middle of a request ----------------------------------------
    def _dma_probe(self) -> None:
        address, size, mem = self.maps[-1]
        n = min(len(DMA_PATTERN), size)
        probe = DmaProbe(address)
        self.obs.dma_probes.append(probe)
        self.obs.transcript.note(f"sending DMA_WRITE and DMA_READ of {address:#x}+{n}")
        wid = self.peer.send(Command.DMA_WRITE,
                             wire.DmaAccess(address, n, DMA_PATTERN[:n]).encode())
        probe.write_reply = self._await_reply(wid, Command.DMA_WRITE, probe)
        if probe.write_reply is None:
            return
        rid = self.peer.send(Command.DMA_READ, wire.DmaAccess(address, n).encode())
        probe.read_reply = self._await_reply(rid, Command.DMA_READ, probe)
        if mem is not None and bytes(mem[:n]) != DMA_PATTERN[:n]:
            probe.problem = "the DMA_WRITE data did not reach the fd-mapped memory"

    def _await_reply(self, msg_id: int, command: int, probe: DmaProbe) -> Msg | None:
        try:
            msg = self.peer.recv()
        except (PeerClosed, PeerTimeout) as exc:
            probe.problem = f"no reply to our {Command(command).name}: {exc}"
            return None
        if not msg.is_reply or msg.msg_id != msg_id or msg.command != command:
            probe.problem = (f"expected the reply to {Command(command).name} id {msg_id}, got "
                             f"{msg.describe()}")
            self.obs.commands.append(msg)
            if not msg.is_reply:
                self._answer(msg)
            return None
        return msg


def _u32(data: bytes, offset: int) -> int:
    if len(data) < offset + 4:
        return 0xFFFFFFFF
    return int(struct.unpack_from("<I", data, offset)[0])


# -- running a client against it ----------------------------------------------------------

Launcher = Callable[[str], "Launched"]


class Launched:
    """A running client: a subprocess, or a thread (for in-process tests)."""

    def __init__(self, wait: Callable[[float], int | None], kill: Callable[[], None]) -> None:
        self.wait = wait
        self.kill = kill


def exec_launcher(command: list[str]) -> Launcher:
    def launch(path: str) -> Launched:
        argv = [a.replace("{socket}", path) for a in command]
        if not any("{socket}" in a for a in command):
            argv.append(path)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

        def wait(timeout: float) -> int | None:
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return Launched(wait, kill)
    return launch


def thread_launcher(func: Callable[[str], object]) -> Launcher:
    def launch(path: str) -> Launched:
        status: list[int] = []

        def body() -> None:
            try:
                func(path)
                status.append(0)
            except BaseException:
                status.append(1)
        t = threading.Thread(target=body, daemon=True, name="client-under-test")
        t.start()

        def wait(timeout: float) -> int | None:
            t.join(timeout)
            return status[0] if status else None
        return Launched(wait, lambda: None)
    return launch


def observe(launch: Launcher, *, timeout: float = 10.0) -> Observation:
    """Start the client, serve its connection, and return what it did."""
    obs = Observation()
    tmp = tempfile.mkdtemp(prefix="xdev-conformance-client-")
    path = str(Path(tmp) / "checking.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(timeout)
    client = launch(path)
    try:
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            obs.ended = f"the client did not connect within {timeout}s"
            return obs
        obs.connected = True
        peer = RawPeer(sock, obs.transcript, timeout)
        server = CheckingServer(peer, obs)
        try:
            server.run()
        finally:
            server.close()
            peer.close()
        obs.exit_status = client.wait(timeout)
    finally:
        client.kill()
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
    return obs


def command_argv(command: list[str] | str) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)
