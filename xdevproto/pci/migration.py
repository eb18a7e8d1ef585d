"""Migration v2 for PCI devices: the state machine and the state stream.

State machine (vfio-user spec, DEVICE_FEATURE "MIG_DEVICE_STATE", which
follows VFIO's ``vfio_device_mig_state``). Theory of operation: the client
asks for a target state; the device walks the direct arcs below along the
shortest path whose *intermediate* states are not saving states (PRE_COPY,
STOP_COPY), entering each state in turn. STOP_COPY -> PRE_COPY is forbidden.
ERROR cannot be requested and is left only by DEVICE_RESET. A failed step
leaves the device in ERROR.

Stream format (ours, versioned; every field validated on load, since the
bytes may come from anyone -- compare CVE-2013-4526)::

    magic "XDEVPCI\\0"  u16 version  u16 section count
    per section: u16 name length, name (ASCII), u32 payload length, payload

Sections are produced and consumed by the PCI device (config space, each
register file, capabilities, interrupts, the device's own state).
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Callable

from ..errors import DeviceError
from ..wire import MigState

MAGIC = b"XDEVPCI\0"
VERSION = 1
MAX_STREAM = 64 << 20  # a device state beyond this is refused, not buffered
MAX_SECTIONS = 256

#: Direct arcs of the migration v2 state machine (vfio-user notes 4.13).
ARCS: frozenset[tuple[MigState, MigState]] = frozenset({
    (MigState.RUNNING, MigState.STOP), (MigState.STOP, MigState.RUNNING),
    (MigState.STOP_COPY, MigState.STOP), (MigState.RESUMING, MigState.STOP),
    (MigState.RUNNING, MigState.PRE_COPY), (MigState.PRE_COPY, MigState.RUNNING),
    (MigState.STOP, MigState.STOP_COPY), (MigState.PRE_COPY, MigState.STOP_COPY),
    (MigState.STOP, MigState.RESUMING),
})
SUPPORTED = frozenset({MigState.STOP, MigState.RUNNING, MigState.STOP_COPY,
                       MigState.RESUMING, MigState.PRE_COPY})
SAVING = frozenset({MigState.PRE_COPY, MigState.STOP_COPY})


def path(current: MigState, target: MigState) -> list[MigState]:
    """The states to enter, in order, to get from ``current`` to ``target``."""
    if target not in SUPPORTED:
        raise DeviceError(f"cannot request migration state {target.name}", errno.EINVAL)
    if current is MigState.ERROR:
        raise DeviceError("device is in ERROR; only a reset leaves it", errno.EINVAL)
    if current == target:
        return []
    if (current, target) == (MigState.STOP_COPY, MigState.PRE_COPY):
        raise DeviceError("STOP_COPY -> PRE_COPY is forbidden", errno.EINVAL)
    seen: dict[MigState, list[MigState]] = {current: [current]}
    queue: deque[MigState] = deque([current])
    while queue:
        state = queue.popleft()
        if state != current and state in SAVING:
            continue  # never pass through a saving state
        for a, b in sorted(ARCS):
            if a == state and b not in seen:
                seen[b] = seen[state] + [b]
                if b == target:
                    return seen[b][1:]
                queue.append(b)
    raise DeviceError(f"no path {current.name} -> {target.name}", errno.EINVAL)


class MigrationEngine:
    """The device side of migration v2: state, outgoing and incoming stream.

    ``save()`` returns the full device state; ``load(bytes)`` validates and
    applies it (raising DeviceError); ``quiesce(running)`` stops or resumes
    the device's own activity (workers, timers) on STOP/RUNNING edges.
    """

    def __init__(self, save: Callable[[], bytes], load: Callable[[bytes], None],
                 quiesce: Callable[[bool], None]) -> None:
        self._save = save
        self._load = load
        self._quiesce = quiesce
        self.state = MigState.RUNNING
        self._out = memoryview(b"")
        self._in = bytearray()

    def set_state(self, target: MigState) -> None:
        for state in path(self.state, target):
            try:
                self._enter(state)
            except DeviceError:
                self.state = MigState.ERROR
                raise

    def _enter(self, state: MigState) -> None:
        old = self.state
        if old is MigState.RUNNING and state is MigState.STOP:
            self._quiesce(False)
        if state is MigState.PRE_COPY:
            self._out = memoryview(b"")  # no iterative state: everything goes in STOP_COPY
        if state is MigState.STOP_COPY:
            self._out = memoryview(self._save())
        if state is MigState.RESUMING:
            self._in = bytearray()
        if old is MigState.RESUMING and state is MigState.STOP:
            data, self._in = bytes(self._in), bytearray()
            self._load(data)
        if old in SAVING and state not in SAVING:
            self._out = memoryview(b"")
        self.state = state
        if state is MigState.RUNNING and old is MigState.STOP:
            self._quiesce(True)

    def read(self, size: int) -> bytes:
        out, self._out = self._out[:size], self._out[size:]
        return bytes(out)

    def write(self, data: bytes) -> None:
        if len(self._in) + len(data) > MAX_STREAM:
            raise DeviceError("migration stream too long", errno.EFBIG)
        self._in += data

    def reset(self) -> None:
        self.state = MigState.RUNNING
        self._out = memoryview(b"")
        self._in = bytearray()


# -- the stream ----------------------------------------------------------------------------
def encode(sections: dict[str, bytes]) -> bytes:
    parts = [MAGIC, struct.pack("<HH", VERSION, len(sections))]
    for name, payload in sections.items():
        raw = name.encode("ascii")
        parts.append(struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode(blob: bytes) -> dict[str, bytes]:
    """Split a stream into sections; any malformation raises DeviceError."""
    r = Reader(blob)
    if r.take(len(MAGIC)) != MAGIC:
        raise DeviceError("not an xdev PCI device state", errno.EINVAL)
    version, count = r.u16(), r.u16()
    if version != VERSION:
        raise DeviceError(f"device state version {version}, expected {VERSION}", errno.EINVAL)
    if count > MAX_SECTIONS:
        raise DeviceError("too many sections in device state", errno.EINVAL)
    sections: dict[str, bytes] = {}
    for _ in range(count):
        try:
            name = r.take(r.u16()).decode("ascii")
        except UnicodeDecodeError:
            raise DeviceError("section name is not ASCII", errno.EINVAL) from None
        if name in sections:
            raise DeviceError(f"section {name!r} twice", errno.EINVAL)
        sections[name] = r.take(r.u32())
    r.end()
    return sections


class Reader:
    """Bounds-checked reads from untrusted bytes (DeviceError on any overrun)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DeviceError("device state truncated", errno.EINVAL)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DeviceError("trailing bytes in device state", errno.EINVAL)


def pack_u64s(values: list[int]) -> bytes:
    return struct.pack(f"<I{len(values)}Q", len(values), *values)


def unpack_u64s(data: bytes) -> list[int]:
    r = Reader(data)
    n = r.u32()
    if n * 8 != len(data) - 4:
        raise DeviceError("register section length mismatch", errno.EINVAL)
    return list(struct.unpack(f"<{n}Q", r.take(8 * n)))
