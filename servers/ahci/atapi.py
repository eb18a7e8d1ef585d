"""An ATAPI CD/DVD-ROM drive backed by an ISO image (MMC-6, SPC-4, ACS-3 PACKET).

Only the commands Linux (sr, libata) and SeaBIOS use to find, size and read
media are implemented; anything else is CHECK CONDITION with ILLEGAL
REQUEST / INVALID COMMAND OPERATION CODE. Every reply is built at its real
size and then cut to the CDB's allocation length and to the guest's buffers,
so no CDB field can make the device read or write past a buffer
(CVE-2015-5154, CVE-2020-29443 patterns); every LBA is checked against the
medium (LOGICAL BLOCK ADDRESS OUT OF RANGE).

Errors are reported the ATAPI way (ACS-3 7.18 PACKET): status ERR, the
error register's high nibble holds the sense key, and REQUEST SENSE returns
fixed-format sense data (SPC-4 4.5.3).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from .ata import (
    CD_IDENTITY,
    ER_ABRT,
    ST_DRDY,
    ST_DSC,
    ST_ERR,
    Cmd,
    DataPhase,
    Identity,
    Outcome,
    TaskFile,
    fail,
    put_strings,
    seal_identify,
)
from .disk import DiskError, DiskImage

CD_BLOCK = 2048
_SECTORS_PER_BLOCK = CD_BLOCK // 512
CD_MAX_BLOCKS = 405_000  # beyond about 800 MB the medium is reported as a DVD
ATAPI_SIGNATURE = 0xEB140101

# interrupt reason (count register) at command completion: I/O=1, C/D=1
_IREASON_DONE = 0x03


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int = 0


NO_SENSE = Sense(0, 0)
NOT_READY_NO_MEDIUM = Sense(0x02, 0x3A)
MEDIUM_ERROR = Sense(0x03, 0x11)  # unrecovered read error
INVALID_OPCODE = Sense(0x05, 0x20)
LBA_OUT_OF_RANGE = Sense(0x05, 0x21)
INVALID_FIELD = Sense(0x05, 0x24)
SAVING_NOT_SUPPORTED = Sense(0x05, 0x39)
WRITE_PROTECTED = Sense(0x07, 0x27)


class CheckCondition(Exception):
    def __init__(self, sense: Sense) -> None:
        super().__init__(f"sense {sense.key:x}/{sense.asc:02x}/{sense.ascq:02x}")
        self.sense = sense


def _be16(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 2], "big")


def _be32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 4], "big")


def lba_to_msf(lba: int) -> bytes:
    """MMC-6 4.2.3.3: M:S:F of a block address (150 frames of pregap)."""
    frames = lba + 150
    return bytes((0, frames // 4500 & 0xFF, frames // 75 % 60, frames % 75))


class AtapiCdrom:
    """A read-only ATAPI drive; ``disk`` None is an empty drive."""

    signature = ATAPI_SIGNATURE
    atapi = True

    def __init__(self, disk: DiskImage | None,
                 identity: Identity = CD_IDENTITY) -> None:
        self.disk = disk
        self.identity = identity
        self.sense = NO_SENSE
        self._lock = threading.Lock()

    @property
    def blocks(self) -> int:
        return 0 if self.disk is None else self.disk.sectors // _SECTORS_PER_BLOCK

    @property
    def is_dvd(self) -> bool:
        return self.blocks > CD_MAX_BLOCKS

    # -- ATA side (ACS-3 7.13 IDENTIFY PACKET DEVICE) ---------------------------------
    def identify(self) -> bytes:
        w = [0] * 256
        w[0] = 0x85C0  # ATAPI, CD/DVD device, removable, DRQ within 50 us, 12-byte packets
        put_strings(w, self.identity.serial, self.identity.firmware, self.identity.model)
        w[49] = 0x0B00  # IORDY, LBA, DMA
        w[53] = 0x0006
        w[63] = 0x0007
        w[64] = 0x0003
        w[65], w[66], w[67], w[68] = 0xB4, 0xB4, 0x12C, 0xB4
        w[71] = w[72] = 30
        w[80] = 0x01F0  # ATA/ATAPI-4 .. ATA8-ACS
        w[82] = 0x0210  # PACKET feature set, DEVICE RESET
        w[83] = w[84] = w[87] = 0x4000
        w[85] = 0x0210
        w[88] = 0x203F  # UDMA 0-5, mode 5 selected
        return seal_identify(w)

    def _signature_outcome(self, status: int, error: int) -> Outcome:
        """The PACKET signature in the registers (ACS-3 9.12): count 1, LBA EB1401h."""
        return Outcome(status=status, error=error, count=1, lba=0xEB1401)

    def execute(self, tf: TaskFile, data: DataPhase, cdb: bytes = b"") -> Outcome:
        cmd = tf.command
        if cmd == Cmd.PACKET:
            return self._packet(cdb.ljust(16, b"\0"), data)
        if cmd == Cmd.IDENTIFY_PACKET_DEVICE:
            return Outcome(transferred=data.put(self.identify()), pio=True)
        if cmd in (Cmd.DEVICE_RESET, Cmd.EXECUTE_DEVICE_DIAGNOSTIC):
            return self._signature_outcome(status=0, error=0x01)
        if cmd == Cmd.SET_FEATURES or cmd == Cmd.IDLE_IMMEDIATE:
            return Outcome()
        if cmd == Cmd.CHECK_POWER_MODE:
            return Outcome(count=0xFF)
        # IDENTIFY DEVICE and every other ATA command (READ NATIVE MAX included,
        # CVE-2015-6855) abort with the packet signature in the registers.
        return self._signature_outcome(status=ST_DRDY | ST_ERR, error=ER_ABRT)

    # -- PACKET -------------------------------------------------------------------------
    def _packet(self, cdb: bytes, data: DataPhase) -> Outcome:
        handler = _MMC.get(cdb[0])
        try:
            if handler is None:
                raise CheckCondition(INVALID_OPCODE)
            out = handler(self, cdb, data)
        except CheckCondition as cc:
            with self._lock:
                self.sense = cc.sense
            return fail(cc.sense.key << 4 | ER_ABRT, count=_IREASON_DONE)
        except DiskError:
            with self._lock:
                self.sense = MEDIUM_ERROR
            return fail(MEDIUM_ERROR.key << 4 | ER_ABRT, count=_IREASON_DONE)
        if cdb[0] != 0x03:
            with self._lock:
                self.sense = NO_SENSE
        out.count = _IREASON_DONE
        return out

    def _reply(self, data: DataPhase, payload: bytes | bytearray, alloc: int) -> Outcome:
        n = data.put(memoryview(payload)[:alloc])
        return Outcome(status=ST_DRDY | ST_DSC, transferred=n)

    def _need_medium(self) -> DiskImage:
        if self.disk is None:
            raise CheckCondition(NOT_READY_NO_MEDIUM)
        return self.disk

    def test_unit_ready(self, cdb: bytes, data: DataPhase) -> Outcome:
        self._need_medium()
        return Outcome()

    def request_sense(self, cdb: bytes, data: DataPhase) -> Outcome:
        with self._lock:
            s, self.sense = self.sense, NO_SENSE
        if s == NO_SENSE and self.disk is None:
            s = NOT_READY_NO_MEDIUM
        reply = bytearray(18)
        reply[0], reply[2], reply[7], reply[12], reply[13] = 0x70, s.key, 10, s.asc, s.ascq
        return self._reply(data, reply, cdb[4])

    def inquiry(self, cdb: bytes, data: DataPhase) -> Outcome:
        if cdb[1] & 1 or cdb[2]:  # no vital product data pages
            raise CheckCondition(INVALID_FIELD)
        reply = bytearray(36)
        reply[0], reply[1], reply[2], reply[3], reply[4] = 0x05, 0x80, 0x05, 0x32, 31
        reply[8:16] = b"XDEV    "
        reply[16:32] = self.identity.model.encode("ascii", "replace")[:16].ljust(16)
        reply[32:36] = self.identity.firmware.encode("ascii", "replace")[:4].ljust(4)
        return self._reply(data, reply, _be16(cdb, 3))

    def read_capacity(self, cdb: bytes, data: DataPhase) -> Outcome:
        self._need_medium()
        return self._reply(data, struct.pack(">II", max(self.blocks - 1, 0), CD_BLOCK), 8)

    def read(self, cdb: bytes, data: DataPhase) -> Outcome:
        disk = self._need_medium()
        lba = _be32(cdb, 2)
        count = _be16(cdb, 7) if cdb[0] == 0x28 else _be32(cdb, 6)
        if lba + count > self.blocks:
            raise CheckCondition(LBA_OUT_OF_RANGE)
        nbytes = count * CD_BLOCK
        if data.length < nbytes:  # never past the guest's buffers
            raise CheckCondition(INVALID_FIELD)
        if nbytes:
            data.disk_to_guest(disk, lba * _SECTORS_PER_BLOCK, nbytes)
        return Outcome(transferred=nbytes)

    def write(self, cdb: bytes, data: DataPhase) -> Outcome:
        raise CheckCondition(WRITE_PROTECTED)

    def mode_sense(self, cdb: bytes, data: DataPhase) -> Outcome:
        pc, page = cdb[2] >> 6, cdb[2] & 0x3F
        if pc == 3:
            raise CheckCondition(SAVING_NOT_SUPPORTED)
        pages = {
            0x01: bytes((0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0)),
            0x2A: bytes((0x2A, 0x14, 0x3B, 0x00, 0x71, 0x60, 0x29, 0x00))
            + struct.pack(">HHHH", 706, 256, 512, 706) + bytes(6),
        }
        if page == 0x3F:
            body = b"".join(pages[k] for k in sorted(pages))
        elif page in pages:
            body = pages[page]
        else:
            raise CheckCondition(INVALID_FIELD)
        medium = 0x70 if self.disk is None else 0x01  # "door closed, no disc" / 120 mm data disc
        header = struct.pack(">HBB4x", 6 + len(body), medium, 0)
        return self._reply(data, header + body, _be16(cdb, 7))

    def read_toc(self, cdb: bytes, data: DataPhase) -> Outcome:
        self._need_medium()
        msf = bool(cdb[1] & 2)
        fmt = cdb[2] & 0x0F or cdb[9] >> 6
        start = cdb[6]

        def addr(lba: int) -> bytes:
            return lba_to_msf(lba) if msf else struct.pack(">I", lba)

        if fmt == 0:
            if start > 1 and start != 0xAA:
                raise CheckCondition(INVALID_FIELD)
            body = b""
            if start <= 1:
                body += bytes((0, 0x14, 1, 0)) + addr(0)
            body += bytes((0, 0x14, 0xAA, 0)) + addr(self.blocks)
            reply = struct.pack(">HBB", 2 + len(body), 1, 1) + body
        elif fmt == 1:  # session information: one session starting at track 1
            reply = struct.pack(">HBB", 10, 1, 1) + bytes((0, 0x14, 1, 0)) + addr(0)
        else:
            raise CheckCondition(INVALID_FIELD)
        return self._reply(data, reply, _be16(cdb, 7))

    def get_configuration(self, cdb: bytes, data: DataPhase) -> Outcome:
        rt, start = cdb[1] & 3, _be16(cdb, 2)
        if rt == 3:
            raise CheckCondition(INVALID_FIELD)
        current = 0 if self.disk is None else (0x0010 if self.is_dvd else 0x0008)
        profiles = b"".join(struct.pack(">HBx", p, 1 if p == current else 0) for p in (0x10, 0x08))
        features = [
            (0x0000, 0x03, profiles),  # profile list (current, persistent)
            (0x0001, 0x0B, struct.pack(">IB3x", 2, 1)),  # core: ATAPI, DBE
            (0x0003, 0x03, bytes((0x29, 0, 0, 0))),  # removable medium: tray, eject, lock
            (0x0010, 0x01 if current else 0, struct.pack(">IHBx", CD_BLOCK, 1, 0)),  # random read
        ]
        body = b""
        for code, flags, payload in features:
            if (rt == 2 and code != start) or code < start:
                continue
            if rt == 1 and not flags & 1:
                continue
            body += struct.pack(">HBB", code, flags, len(payload)) + payload
        reply = struct.pack(">I2xH", 4 + len(body), current) + body
        return self._reply(data, reply, _be16(cdb, 7))

    def get_event_status(self, cdb: bytes, data: DataPhase) -> Outcome:
        if not cdb[1] & 1:  # only polled operation (MMC-6 6.7)
            raise CheckCondition(INVALID_FIELD)
        if cdb[4] & 0x10:
            media = bytes((0, 0x02 if self.disk is not None else 0, 0, 0))
            reply = struct.pack(">HBB", 6, 0x04, 0x10) + media
        else:
            reply = struct.pack(">HBB", 2, 0x80, 0x10)
        return self._reply(data, reply, _be16(cdb, 7))

    def read_disc_information(self, cdb: bytes, data: DataPhase) -> Outcome:
        """MMC-6 6.22: a complete, finalised single-session disc (data type 0 only)."""
        self._need_medium()
        if cdb[1] & 7:
            raise CheckCondition(INVALID_FIELD)
        reply = bytearray(34)
        reply[0:2] = (32).to_bytes(2, "big")
        reply[2] = 0x0E  # last session complete, disc complete
        reply[3] = reply[4] = reply[5] = reply[6] = 1
        reply[7] = 0x20  # unrestricted use
        reply[16:24] = b"\xff" * 8  # no lead-in / lead-out to record
        return self._reply(data, reply, _be16(cdb, 7))

    def no_data_ok(self, cdb: bytes, data: DataPhase) -> Outcome:
        return Outcome()


_MMC = {
    0x00: AtapiCdrom.test_unit_ready,
    0x03: AtapiCdrom.request_sense,
    0x12: AtapiCdrom.inquiry,
    0x1B: AtapiCdrom.no_data_ok,  # START STOP UNIT: the tray never opens
    0x1E: AtapiCdrom.no_data_ok,  # PREVENT ALLOW MEDIUM REMOVAL
    0x25: AtapiCdrom.read_capacity,
    0x28: AtapiCdrom.read,
    0xA8: AtapiCdrom.read,
    0x2A: AtapiCdrom.write,
    0xAA: AtapiCdrom.write,
    0x43: AtapiCdrom.read_toc,
    0x46: AtapiCdrom.get_configuration,
    0x4A: AtapiCdrom.get_event_status,
    0x51: AtapiCdrom.read_disc_information,
    0x5A: AtapiCdrom.mode_sense,
    0xBB: AtapiCdrom.no_data_ok,  # SET CD SPEED
}
