"""The ATA command set of a disk backed by a raw image (ACS-3, T13/2161-D).

The transport (AHCI) hands each command over as a :class:`TaskFile` (the
fields of a Register Host-to-Device FIS, SATA 3.x 10.5.5) plus a
:class:`DataPhase` (the guest buffers the command table's PRDT describes)
and gets an :class:`Outcome` back (the fields of the Register Device-to-Host
FIS). Nothing here knows about FIS bytes, ports or interrupts, so every rule
is tested with a plain buffer.

Guest input never raises out of :meth:`AtaDisk.execute`: a bad LBA range is
IDNF|ABRT, an unknown command or a bad field ABRT, an I/O failure UNC.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .disk import SECTOR, DiskError, DiskImage, ReadOnlyError

# Status (ACS-3 6.2) and error (6.3) bits.
ST_ERR, ST_DRQ, ST_DSC, ST_DF, ST_DRDY, ST_BSY = 0x01, 0x08, 0x10, 0x20, 0x40, 0x80
ER_ABRT, ER_IDNF, ER_UNC, ER_ICRC = 0x04, 0x10, 0x40, 0x80

LBA28_MAX = 0x0FFFFFFF
NCQ_DEPTH = 32
DSM_MAX_BLOCKS = 8  # IDENTIFY word 105: 512-byte blocks of TRIM ranges per command


class Cmd(enum.IntEnum):
    """ATA command codes used here (ACS-3 table B.2)."""

    RECALIBRATE = 0x10
    READ_SECTORS = 0x20
    READ_SECTORS_EXT = 0x24
    READ_DMA_EXT = 0x25
    READ_NATIVE_MAX_EXT = 0x27
    READ_LOG_EXT = 0x2F
    WRITE_SECTORS = 0x30
    WRITE_SECTORS_EXT = 0x34
    WRITE_DMA_EXT = 0x35
    READ_VERIFY = 0x40
    READ_VERIFY_EXT = 0x42
    READ_LOG_DMA_EXT = 0x47
    READ_FPDMA_QUEUED = 0x60
    WRITE_FPDMA_QUEUED = 0x61
    EXECUTE_DEVICE_DIAGNOSTIC = 0x90
    INITIALIZE_DEVICE_PARAMETERS = 0x91
    PACKET = 0xA0
    IDENTIFY_PACKET_DEVICE = 0xA1
    DATA_SET_MANAGEMENT = 0x06
    DEVICE_RESET = 0x08
    READ_DMA = 0xC8
    WRITE_DMA = 0xCA
    STANDBY_IMMEDIATE = 0xE0
    IDLE_IMMEDIATE = 0xE1
    STANDBY = 0xE2
    IDLE = 0xE3
    CHECK_POWER_MODE = 0xE5
    FLUSH_CACHE = 0xE7
    IDENTIFY_DEVICE = 0xEC
    FLUSH_CACHE_EXT = 0xEA
    SET_FEATURES = 0xEF
    READ_NATIVE_MAX = 0xF8


NCQ_COMMANDS = frozenset({Cmd.READ_FPDMA_QUEUED, Cmd.WRITE_FPDMA_QUEUED})


@dataclass(slots=True)
class TaskFile:
    """Command fields of a Register H2D FIS (48-bit layout; 28-bit commands use the low bits)."""

    command: int
    features: int = 0
    lba: int = 0
    count: int = 0
    device: int = 0
    control: int = 0
    aux: int = 0


@dataclass(slots=True)
class Outcome:
    """What the device reports back (Register D2H / Set Device Bits FIS fields)."""

    status: int = ST_DRDY | ST_DSC
    error: int = 0
    lba: int = 0
    count: int = 0
    device: int = 0
    transferred: int = 0  # bytes moved to or from the guest (PRDBC)
    pio: bool = False  # data-in by PIO protocol: the transport also sends a PIO Setup FIS

    @property
    def failed(self) -> bool:
        return bool(self.status & ST_ERR)


def fail(error: int = ER_ABRT, lba: int = 0, count: int = 0) -> Outcome:
    """A failed command: ERR set, ``error`` says why (ACS-3 6.3)."""
    return Outcome(status=ST_DRDY | ST_ERR, error=error, lba=lba, count=count)


class DataPhase(Protocol):
    """The guest buffers of one command (a PRDT, or a test buffer)."""

    @property
    def length(self) -> int:
        """Bytes the guest described."""

    def put(self, data: bytes | bytearray | memoryview) -> int:
        """Copy device-to-host data to the start of the buffers; bytes stored."""

    def get(self, nbytes: int) -> bytes:
        """The first ``nbytes`` host-to-device bytes (``nbytes`` <= length)."""

    def disk_to_guest(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        """Read ``nbytes`` from the image at ``lba`` into the buffers (raise DiskError)."""

    def guest_to_disk(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        """Write ``nbytes`` of the buffers to the image at ``lba`` (raise DiskError)."""


def ata_string(text: str, nbytes: int) -> bytes:
    """An IDENTIFY string: ASCII, space padded, each byte pair swapped (ACS-3 3.4.9)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    out = bytearray(nbytes)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def seal_identify(words: list[int]) -> bytes:
    """Pack 256 words and set word 255 (signature A5h + checksum, ACS-3 7.12.7.91)."""
    words[255] = 0x00A5
    data = bytearray(struct.pack("<256H", *(w & 0xFFFF for w in words)))
    data[511] = (-sum(data[:511])) & 0xFF
    return bytes(data)


def put_strings(words: list[int], serial: str, firmware: str, model: str) -> None:
    for first, text, nbytes in ((10, serial, 20), (23, firmware, 8), (27, model, 40)):
        raw = ata_string(text, nbytes)
        for i in range(nbytes // 2):
            words[first + i] = raw[2 * i] | raw[2 * i + 1] << 8


@dataclass(frozen=True, slots=True)
class Identity:
    serial: str = "XDEV0000000000000001"
    model: str = "XDEV HARDDISK"
    firmware: str = "1.0"


DISK_IDENTITY = Identity()
CD_IDENTITY = Identity(serial="XDEV0000000000000002", model="XDEV DVD-ROM")


class AtaDisk:
    """An ATA device with a raw image behind it. Thread-safe: NCQ runs concurrently."""

    signature = 0x00000101  # PxSIG for an ATA device (SATA 3.x 11.3, count 1, LBA 1)
    atapi = False

    def __init__(self, disk: DiskImage, identity: Identity = DISK_IDENTITY) -> None:
        self.disk = disk
        self.identity = identity
        self.udma_mode = 5
        self.standby = False
        self._lock = threading.Lock()
        self._ncq_error: bytes | None = None  # NCQ Command Error log (page 10h) contents

    # -- IDENTIFY (ACS-3 7.12.7) ---------------------------------------------
    def identify(self) -> bytes:
        n = self.disk.sectors
        w = [0] * 256
        w[0] = 0x0040  # fixed device
        cyls = max(1, min(16383, n // (16 * 63)))
        w[1], w[3], w[6] = cyls, 16, 63
        put_strings(w, self.identity.serial, self.identity.firmware, self.identity.model)
        w[47] = 0x8001  # READ/WRITE MULTIPLE: one sector per DRQ block
        w[49] = 0x0B00  # IORDY, LBA, DMA supported
        w[50] = 0x4000
        w[53] = 0x0007  # words 54-58, 64-70 and 88 valid
        w[54], w[55], w[56] = cyls, 16, 63
        chs = cyls * 16 * 63
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        lba28 = min(n, LBA28_MAX)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[63] = 0x0007  # MWDMA 0-2 supported (none selected: UDMA is)
        w[64] = 0x0003  # PIO 3-4
        w[65] = w[66] = w[67] = w[68] = 120
        w[69] = 0x4020  # DRAT + RZAT: trimmed sectors read as zeros
        w[75] = NCQ_DEPTH - 1
        w[76] = 0x010E  # NCQ; SATA Gen1, Gen2, Gen3 speeds
        w[80] = 0x07F0  # ATA/ATAPI-4 .. ACS-3
        w[82] = 0x0028 | 0x4000  # power management, volatile write cache, NOP
        w[83] = 0x7400  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
        w[84] = 0x4020  # general purpose logging (READ LOG EXT)
        w[85] = 0x0008 | (0x0020 if self.disk.write_cache else 0) | 0x4000
        w[86] = 0x3400
        w[87] = 0x4020
        w[88] = 0x007F | (1 << (8 + self.udma_mode))
        w[100], w[101], w[102], w[103] = n & 0xFFFF, n >> 16 & 0xFFFF, n >> 32 & 0xFFFF, 0
        w[105] = DSM_MAX_BLOCKS
        w[106] = 0x4000  # one logical sector per physical sector, 512 bytes
        w[169] = 0x0001  # DATA SET MANAGEMENT / TRIM
        w[217] = 0x0001  # non-rotating medium
        w[222] = 0x103F  # serial transport, SATA 1.0a .. 3.1
        return seal_identify(w)

    # -- dispatch ---------------------------------------------------------------
    def execute(self, tf: TaskFile, data: DataPhase, cdb: bytes = b"") -> Outcome:
        """Run one command to completion (on a worker thread); ``cdb`` is for ATAPI only."""
        try:
            cmd = Cmd(tf.command)
        except ValueError:
            return fail()
        handler = _HANDLERS.get(cmd)
        if handler is None:
            return fail()
        try:
            out = handler(self, tf, data)
        except ReadOnlyError:
            out = fail(ER_ABRT)
        except DiskError:
            out = fail(ER_UNC | ER_ABRT)
        if cmd in NCQ_COMMANDS and out.failed:
            self._record_ncq_error(tf, out)
        return out

    # -- data transfer --------------------------------------------------------------
    def _range(self, tf: TaskFile, ext: bool) -> tuple[int, int]:
        """(lba, count) with the ATA 'count 0 means the maximum' rule."""
        if tf.command in NCQ_COMMANDS:
            count = tf.features & 0xFFFF or 0x10000
            return tf.lba & 0xFFFF_FFFF_FFFF, count
        if ext:
            return tf.lba & 0xFFFF_FFFF_FFFF, tf.count & 0xFFFF or 0x10000
        return tf.lba & LBA28_MAX, tf.count & 0xFF or 0x100

    def _rw(self, tf: TaskFile, data: DataPhase, ext: bool, write: bool, pio: bool) -> Outcome:
        lba, count = self._range(tf, ext)
        if not self.disk.in_range(lba, count):
            return fail(ER_IDNF | ER_ABRT, lba=lba)
        nbytes = count * SECTOR
        if data.length < nbytes:  # the PRDT cannot hold the transfer
            return fail(ER_ABRT)
        if write:
            data.guest_to_disk(self.disk, lba, nbytes)
            if tf.command == Cmd.WRITE_FPDMA_QUEUED and tf.device & 0x80:
                self.disk.flush()  # FUA: this write reaches the medium before completion
        else:
            data.disk_to_guest(self.disk, lba, nbytes)
        return Outcome(transferred=nbytes, pio=pio and not write)

    def _verify(self, tf: TaskFile, ext: bool) -> Outcome:
        lba, count = self._range(tf, ext)
        if not self.disk.in_range(lba, count):
            return fail(ER_IDNF | ER_ABRT, lba=lba)
        return Outcome()

    # -- ACS-3 7.10 DATA SET MANAGEMENT -------------------------------------------------
    def _trim(self, tf: TaskFile, data: DataPhase) -> Outcome:
        blocks = tf.count & 0xFFFF
        if not tf.features & 1 or blocks == 0 or blocks > DSM_MAX_BLOCKS:
            return fail()
        nbytes = blocks * SECTOR
        if data.length < nbytes:
            return fail()
        ranges = []
        for (entry,) in struct.iter_unpack("<Q", data.get(nbytes)):
            lba, length = entry & 0xFFFF_FFFF_FFFF, entry >> 48
            if length == 0:
                continue
            if not self.disk.in_range(lba, length):
                return fail(ER_IDNF | ER_ABRT)
            ranges.append((lba, length))
        for lba, length in ranges:  # all validated before anything is deallocated
            self.disk.trim(lba, length)
        return Outcome(transferred=nbytes)

    # -- ACS-3 7.24 READ LOG EXT ---------------------------------------------------------
    def _read_log(self, tf: TaskFile, data: DataPhase) -> Outcome:
        log, page, pages = tf.lba & 0xFF, tf.lba >> 8 & 0xFFFF, tf.count & 0xFFFF
        if pages == 0 or data.length < pages * SECTOR:
            return fail()
        if log == 0x00:  # log directory (A.2): version 1, log 10h is one page
            content = bytearray(SECTOR)
            struct.pack_into("<H", content, 0, 1)
            struct.pack_into("<H", content, 0x10 * 2, 1)
        elif log == 0x10 and page == 0 and pages == 1:
            with self._lock:
                content = bytearray(self._ncq_error or bytes(SECTOR))
                self._ncq_error = None  # reading the log clears the error (SATA 13.7.4)
        else:
            return fail()
        if page != 0 or pages != 1:
            return fail()
        data.put(content)
        return Outcome(transferred=SECTOR, pio=tf.command == Cmd.READ_LOG_EXT)

    def _record_ncq_error(self, tf: TaskFile, out: Outcome) -> None:
        """Fill the NCQ Command Error log (SATA 3.x 13.7.4) for the failed tag."""
        page = bytearray(SECTOR)
        page[0] = tf.count >> 3 & 0x1F
        page[2], page[3] = out.status, out.error
        lba = tf.lba
        page[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
        page[7] = tf.device
        page[8:11] = (lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
        page[12:14] = (tf.count & 0xFFFF).to_bytes(2, "little")
        page[511] = (-sum(page[:511])) & 0xFF
        with self._lock:
            self._ncq_error = bytes(page)

    def ncq_error_log(self) -> bytes:
        with self._lock:
            return self._ncq_error or b""

    def restore_ncq_error_log(self, page: bytes) -> None:
        with self._lock:
            self._ncq_error = page or None

    @property
    def ncq_error_pending(self) -> bool:
        with self._lock:
            return self._ncq_error is not None

    # -- housekeeping commands --------------------------------------------------------------
    def _identify(self, tf: TaskFile, data: DataPhase) -> Outcome:
        n = data.put(self.identify())
        return Outcome(transferred=n, pio=True)

    def _set_features(self, tf: TaskFile, data: DataPhase) -> Outcome:
        sub = tf.features & 0xFF
        if sub == 0x02:
            self.disk.write_cache = True
        elif sub == 0x82:
            self.disk.flush()  # what the cache held becomes durable before write-through starts
            self.disk.write_cache = False
        elif sub == 0x03:
            mode = tf.count & 0xFF
            kind, n = mode >> 3, mode & 7
            if kind == 0x40 >> 3 and n <= 6:
                self.udma_mode = n
            elif not (mode in (0, 1) or (kind == 1 and n <= 4) or (kind == 4 and n <= 2)):
                return fail()
        elif sub not in (0x55, 0xAA, 0x66, 0xCC):  # look-ahead, revert-to-defaults: no effect
            return fail()
        return Outcome()

    def _flush(self, tf: TaskFile, data: DataPhase) -> Outcome:
        self.disk.flush()
        return Outcome()

    def _native_max(self, tf: TaskFile, data: DataPhase) -> Outcome:
        top = max(self.disk.sectors - 1, 0)
        if tf.command == Cmd.READ_NATIVE_MAX:
            return Outcome(lba=min(top, LBA28_MAX), device=0x40)
        return Outcome(lba=top, device=0x40)

    def _diagnostic(self, tf: TaskFile, data: DataPhase) -> Outcome:
        return Outcome(error=0x01, count=1, lba=1)  # "device 0 passed" plus the ATA signature

    def _power(self, tf: TaskFile, data: DataPhase) -> Outcome:
        cmd = tf.command
        if cmd == Cmd.CHECK_POWER_MODE:
            return Outcome(count=0x00 if self.standby else 0xFF)
        self.standby = cmd in (Cmd.STANDBY, Cmd.STANDBY_IMMEDIATE)
        return Outcome()

    def _ok(self, tf: TaskFile, data: DataPhase) -> Outcome:
        return Outcome()


Handler = Callable[[AtaDisk, TaskFile, DataPhase], Outcome]


def _rw(ext: bool, write: bool, pio: bool = False) -> Handler:
    def run(dev: AtaDisk, tf: TaskFile, data: DataPhase) -> Outcome:
        return dev._rw(tf, data, ext, write, pio)
    return run


def _verify(ext: bool) -> Handler:
    def run(dev: AtaDisk, tf: TaskFile, data: DataPhase) -> Outcome:
        return dev._verify(tf, ext)
    return run


_HANDLERS: dict[Cmd, Handler] = {
    Cmd.READ_DMA: _rw(False, False),
    Cmd.READ_DMA_EXT: _rw(True, False),
    Cmd.READ_SECTORS: _rw(False, False, True),
    Cmd.READ_SECTORS_EXT: _rw(True, False, True),
    Cmd.READ_FPDMA_QUEUED: _rw(True, False),
    Cmd.WRITE_DMA: _rw(False, True),
    Cmd.WRITE_DMA_EXT: _rw(True, True),
    Cmd.WRITE_SECTORS: _rw(False, True, True),
    Cmd.WRITE_SECTORS_EXT: _rw(True, True, True),
    Cmd.WRITE_FPDMA_QUEUED: _rw(True, True),
    Cmd.READ_VERIFY: _verify(False),
    Cmd.READ_VERIFY_EXT: _verify(True),
    Cmd.DATA_SET_MANAGEMENT: AtaDisk._trim,
    Cmd.READ_LOG_EXT: AtaDisk._read_log,
    Cmd.READ_LOG_DMA_EXT: AtaDisk._read_log,
    Cmd.IDENTIFY_DEVICE: AtaDisk._identify,
    Cmd.SET_FEATURES: AtaDisk._set_features,
    Cmd.FLUSH_CACHE: AtaDisk._flush,
    Cmd.FLUSH_CACHE_EXT: AtaDisk._flush,
    Cmd.READ_NATIVE_MAX: AtaDisk._native_max,
    Cmd.READ_NATIVE_MAX_EXT: AtaDisk._native_max,
    Cmd.EXECUTE_DEVICE_DIAGNOSTIC: AtaDisk._diagnostic,
    Cmd.CHECK_POWER_MODE: AtaDisk._power,
    Cmd.IDLE: AtaDisk._power,
    Cmd.IDLE_IMMEDIATE: AtaDisk._power,
    Cmd.STANDBY: AtaDisk._power,
    Cmd.STANDBY_IMMEDIATE: AtaDisk._power,
    Cmd.RECALIBRATE: AtaDisk._ok,
    Cmd.INITIALIZE_DEVICE_PARAMETERS: AtaDisk._ok,
}
