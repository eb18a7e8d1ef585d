"""ATA and ATAPI command sets against a plain buffer (no controller)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from ahci_phase import BufferPhase, pattern

from servers.ahci.ata import (
    ER_ABRT,
    ER_IDNF,
    ST_ERR,
    AtaDisk,
    Cmd,
    Identity,
    Outcome,
    TaskFile,
    ata_string,
)
from servers.ahci.atapi import AtapiCdrom, lba_to_msf
from servers.ahci.disk import SECTOR, DiskImage, DiskSpec, punch_hole

SECTORS = 2048


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.write(pattern(0, SECTORS))
    return p


def make(image: Path, **kw: bool) -> AtaDisk:
    return AtaDisk(DiskImage(DiskSpec(str(image), **kw)),
                   Identity(serial="SN123", model="XDEV TEST DISK", firmware="0.9"))


def words(raw: bytes) -> list[int]:
    return list(struct.unpack("<256H", raw))


# -- IDENTIFY -----------------------------------------------------------------------
def test_ata_string_swaps_byte_pairs() -> None:
    assert ata_string("ABCD", 6) == b"BADC  "


def test_identify_words_are_truthful(image: Path) -> None:
    dev = make(image)
    raw = dev.identify()
    w = words(raw)
    assert sum(raw) % 256 == 0 and raw[510] == 0xA5
    assert w[60] | w[61] << 16 == SECTORS
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == SECTORS
    assert w[83] & (1 << 10) and w[83] & (1 << 13)  # LBA48, FLUSH CACHE EXT
    assert w[75] == 31 and w[76] & (1 << 8)  # NCQ depth 32
    assert w[169] & 1 and w[69] & (1 << 14) and w[69] & (1 << 5)  # TRIM, DRAT, RZAT
    assert w[82] & (1 << 5) and w[85] & (1 << 5)  # write cache supported, enabled
    assert ata_string("XDEV TEST DISK", 40) == raw[54:94]
    assert ata_string("SN123", 20) == raw[20:40]


def test_identify_command_and_write_cache_bit(image: Path) -> None:
    dev = make(image)
    buf = BufferPhase(512)
    out = dev.execute(TaskFile(Cmd.IDENTIFY_DEVICE), buf)
    assert not out.failed and out.pio and out.transferred == 512
    assert words(bytes(buf.buf))[85] & 0x20
    assert not dev.execute(TaskFile(Cmd.SET_FEATURES, features=0x82), BufferPhase(0)).failed
    dev.execute(TaskFile(Cmd.IDENTIFY_DEVICE), buf)
    assert not words(bytes(buf.buf))[85] & 0x20
    assert not dev.disk.write_cache


def test_lba28_capacity_is_capped(tmp_path: Path) -> None:
    p = tmp_path / "big.img"
    with open(p, "wb") as f:
        f.truncate((LBA28 := 0x0FFFFFFF + 10) * SECTOR)
    w = words(make(p).identify())
    assert w[60] | w[61] << 16 == 0x0FFFFFFF
    assert w[100] | w[101] << 16 == LBA28


# -- reads and writes ---------------------------------------------------------------
@pytest.mark.parametrize("cmd,ext", [(Cmd.READ_DMA, False), (Cmd.READ_DMA_EXT, True),
                                     (Cmd.READ_FPDMA_QUEUED, True), (Cmd.READ_SECTORS, False)])
def test_read_first_and_last_lba(image: Path, cmd: Cmd, ext: bool) -> None:
    dev = make(image)
    for lba in (0, SECTORS - 4):
        buf = BufferPhase(4 * SECTOR)
        tf = TaskFile(cmd, lba=lba, count=4) if cmd != Cmd.READ_FPDMA_QUEUED else \
            TaskFile(cmd, lba=lba, features=4, count=5 << 3)
        out = dev.execute(tf, buf)
        assert not out.failed and out.transferred == 4 * SECTOR
        assert bytes(buf.buf) == pattern(lba, 4)


@pytest.mark.parametrize("cmd", [Cmd.READ_DMA_EXT, Cmd.WRITE_DMA_EXT, Cmd.READ_VERIFY_EXT,
                                 Cmd.READ_FPDMA_QUEUED, Cmd.WRITE_FPDMA_QUEUED])
def test_past_the_end_is_idnf(image: Path, cmd: Cmd) -> None:
    dev = make(image)
    count_field = {"features": 2} if cmd in (Cmd.READ_FPDMA_QUEUED, Cmd.WRITE_FPDMA_QUEUED) \
        else {"count": 2}
    out = dev.execute(TaskFile(cmd, lba=SECTORS - 1, **count_field), BufferPhase(1 << 20))
    assert out.failed and out.error & ER_IDNF and out.error & ER_ABRT
    assert hashlib.sha256(image.read_bytes()).digest() == \
        hashlib.sha256(pattern(0, SECTORS)).digest()


def test_count_zero_means_256_for_lba28(image: Path) -> None:
    dev = make(image)
    buf = BufferPhase(256 * SECTOR)
    assert dev.execute(TaskFile(Cmd.READ_DMA, lba=5, count=0), buf).transferred == 256 * SECTOR
    assert bytes(buf.buf) == pattern(5, 256)
    # count 0 for READ DMA EXT is 65536 sectors: past a 2048-sector disk
    assert dev.execute(TaskFile(Cmd.READ_DMA_EXT, lba=0, count=0), buf).failed


def test_short_buffer_aborts_without_transfer(image: Path) -> None:
    dev = make(image)
    buf = BufferPhase(SECTOR)
    out = dev.execute(TaskFile(Cmd.READ_DMA_EXT, lba=0, count=2), buf)
    assert out.failed and out.error == ER_ABRT and bytes(buf.buf) == bytes(SECTOR)


def test_write_then_read_back(image: Path) -> None:
    dev = make(image)
    data = os.urandom(3 * SECTOR)
    assert not dev.execute(TaskFile(Cmd.WRITE_DMA_EXT, lba=SECTORS - 3, count=3),
                           BufferPhase(3 * SECTOR, data)).failed
    buf = BufferPhase(3 * SECTOR)
    dev.execute(TaskFile(Cmd.READ_DMA_EXT, lba=SECTORS - 3, count=3), buf)
    assert bytes(buf.buf) == data
    assert image.read_bytes()[-3 * SECTOR:] == data


def test_readonly_image_refuses_writes(image: Path) -> None:
    dev = make(image, readonly=True)
    for tf in (TaskFile(Cmd.WRITE_DMA, lba=0, count=1),
               TaskFile(Cmd.WRITE_FPDMA_QUEUED, lba=0, features=1),
               TaskFile(Cmd.DATA_SET_MANAGEMENT, features=1, count=1)):
        out = dev.execute(tf, BufferPhase(SECTOR, struct.pack("<Q", 1 << 48)))
        assert out.failed and out.error & ER_ABRT
    assert image.read_bytes() == pattern(0, SECTORS)


def test_write_through_calls_fdatasync(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    dev = make(image, writeback=False)
    dev.execute(TaskFile(Cmd.WRITE_DMA, lba=0, count=1), BufferPhase(SECTOR))
    assert synced == [dev.disk.fd]
    dev.execute(TaskFile(Cmd.SET_FEATURES, features=0x02), BufferPhase(0))
    dev.execute(TaskFile(Cmd.WRITE_DMA, lba=0, count=1), BufferPhase(SECTOR))
    assert len(synced) == 1  # write-back: no sync until FLUSH
    dev.execute(TaskFile(Cmd.FLUSH_CACHE_EXT), BufferPhase(0))
    assert len(synced) == 2
    dev.execute(TaskFile(Cmd.WRITE_FPDMA_QUEUED, lba=0, features=1, device=0x80),
                BufferPhase(SECTOR))
    assert len(synced) == 3  # FUA


# -- TRIM ------------------------------------------------------------------------------
def dsm(*ranges: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<Q", lba | n << 48) for lba, n in ranges).ljust(SECTOR, b"\0")


def test_trim_zeroes_and_punches(image: Path) -> None:
    dev = make(image)
    out = dev.execute(TaskFile(Cmd.DATA_SET_MANAGEMENT, features=1, count=1),
                      BufferPhase(SECTOR, dsm((16, 8), (SECTORS - 8, 8))))
    assert not out.failed
    content = image.read_bytes()
    assert content[16 * SECTOR:24 * SECTOR] == bytes(8 * SECTOR)
    assert content[-8 * SECTOR:] == bytes(8 * SECTOR)
    assert content[:16 * SECTOR] == pattern(0, 16)
    assert content[24 * SECTOR:25 * SECTOR] == pattern(24, 1)


def test_trim_range_past_end_changes_nothing(image: Path) -> None:
    dev = make(image)
    out = dev.execute(TaskFile(Cmd.DATA_SET_MANAGEMENT, features=1, count=1),
                      BufferPhase(SECTOR, dsm((0, 8), (SECTORS - 1, 2))))
    assert out.failed
    assert image.read_bytes() == pattern(0, SECTORS)


@pytest.mark.parametrize("features,count", [(0, 1), (1, 0), (1, 9)])
def test_trim_bad_fields_abort(image: Path, features: int, count: int) -> None:
    out = make(image).execute(TaskFile(Cmd.DATA_SET_MANAGEMENT, features=features, count=count),
                              BufferPhase(16 * SECTOR, dsm((0, 1))))
    assert out.failed and out.error & ER_ABRT


def test_punch_hole_makes_file_sparse(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    p.write_bytes(b"x" * (1 << 20))
    fd = os.open(p, os.O_RDWR)
    try:
        if not punch_hole(fd, 0, 1 << 20):
            pytest.skip("file system cannot punch holes")
        assert os.fstat(fd).st_blocks == 0 and os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)


# -- housekeeping ---------------------------------------------------------------------
def test_native_max(image: Path) -> None:
    dev = make(image)
    assert dev.execute(TaskFile(Cmd.READ_NATIVE_MAX_EXT), BufferPhase(0)).lba == SECTORS - 1
    assert dev.execute(TaskFile(Cmd.READ_NATIVE_MAX), BufferPhase(0)).lba == SECTORS - 1


def test_power_modes(image: Path) -> None:
    dev = make(image)
    assert dev.execute(TaskFile(Cmd.CHECK_POWER_MODE), BufferPhase(0)).count == 0xFF
    dev.execute(TaskFile(Cmd.STANDBY_IMMEDIATE), BufferPhase(0))
    assert dev.execute(TaskFile(Cmd.CHECK_POWER_MODE), BufferPhase(0)).count == 0x00
    dev.execute(TaskFile(Cmd.IDLE_IMMEDIATE), BufferPhase(0))
    assert dev.execute(TaskFile(Cmd.CHECK_POWER_MODE), BufferPhase(0)).count == 0xFF


def test_diagnostic_reports_signature(image: Path) -> None:
    out = make(image).execute(TaskFile(Cmd.EXECUTE_DEVICE_DIAGNOSTIC), BufferPhase(0))
    assert (out.error, out.count, out.lba) == (1, 1, 1)


@pytest.mark.parametrize("cmd", [0x00, 0xB0, 0xC6, 0x92, 0xFF, Cmd.PACKET])
def test_unsupported_commands_abort(image: Path, cmd: int) -> None:
    out = make(image).execute(TaskFile(cmd), BufferPhase(SECTOR))
    assert out.status & ST_ERR and out.error == ER_ABRT


def test_set_features_transfer_mode(image: Path) -> None:
    dev = make(image)
    udma2 = TaskFile(Cmd.SET_FEATURES, features=3, count=0x42)
    assert not dev.execute(udma2, BufferPhase(0)).failed
    assert words(dev.identify())[88] >> 8 == 1 << 2
    assert dev.execute(TaskFile(Cmd.SET_FEATURES, features=3, count=0x47), BufferPhase(0)).failed
    assert dev.execute(TaskFile(Cmd.SET_FEATURES, features=0x10, count=2), BufferPhase(0)).failed


def test_ncq_error_log(image: Path) -> None:
    dev = make(image)
    out = dev.execute(TaskFile(Cmd.READ_FPDMA_QUEUED, lba=SECTORS, features=1, count=7 << 3),
                      BufferPhase(SECTOR))
    assert out.failed and dev.ncq_error_pending
    buf = BufferPhase(SECTOR)
    assert not dev.execute(TaskFile(Cmd.READ_LOG_EXT, lba=0x10, count=1), buf).failed
    page = bytes(buf.buf)
    assert page[0] == 7 and page[2] & ST_ERR and sum(page) % 256 == 0
    assert int.from_bytes(page[4:7], "little") == SECTORS & 0xFFFFFF
    assert not dev.ncq_error_pending
    dev.execute(TaskFile(Cmd.READ_LOG_EXT, lba=0x10, count=1), buf)
    assert bytes(buf.buf) == bytes(SECTOR)
    dev.execute(TaskFile(Cmd.READ_LOG_EXT, lba=0x00, count=1), buf)
    assert struct.unpack_from("<H", buf.buf, 0x20)[0] == 1
    assert dev.execute(TaskFile(Cmd.READ_LOG_EXT, lba=0x11, count=1), buf).failed
    assert dev.execute(TaskFile(Cmd.READ_LOG_EXT, lba=0x10, count=0), buf).failed


# -- ATAPI ---------------------------------------------------------------------------
CD_BLOCKS = 64


@pytest.fixture
def cdrom(tmp_path: Path) -> AtapiCdrom:
    p = tmp_path / "cd.iso"
    p.write_bytes(pattern(0, CD_BLOCKS * 4))
    return AtapiCdrom(DiskImage(DiskSpec(str(p), readonly=True)))


def packet(dev: AtapiCdrom, cdb: bytes, size: int = 4096) -> tuple[Outcome, bytes]:
    buf = BufferPhase(size)
    out = dev.execute(TaskFile(Cmd.PACKET), buf, cdb)
    return out, bytes(buf.buf)


def sense(dev: AtapiCdrom) -> tuple[int, int]:
    _, data = packet(dev, bytes([0x03, 0, 0, 0, 18, 0]).ljust(12, b"\0"))
    return data[2], data[12]


def test_identify_packet_device(cdrom: AtapiCdrom) -> None:
    buf = BufferPhase(512)
    out = cdrom.execute(TaskFile(Cmd.IDENTIFY_PACKET_DEVICE), buf)
    assert not out.failed and words(bytes(buf.buf))[0] == 0x85C0 and sum(buf.buf) % 256 == 0


@pytest.mark.parametrize("cmd", [Cmd.IDENTIFY_DEVICE, Cmd.READ_NATIVE_MAX,
                                 Cmd.READ_NATIVE_MAX_EXT, Cmd.READ_DMA_EXT])
def test_ata_commands_on_atapi_abort_with_signature(cdrom: AtapiCdrom, cmd: int) -> None:
    # CVE-2015-6855: READ NATIVE MAX on an ATAPI drive must not compute anything
    out = cdrom.execute(TaskFile(cmd), BufferPhase(512))
    assert out.failed and out.lba == 0xEB1401


def test_atapi_read10_and_read12(cdrom: AtapiCdrom) -> None:
    out, data = packet(cdrom, bytes([0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0]))
    assert not out.failed and data == pattern(12, 8)
    out, data = packet(cdrom, bytes([0xA8, 0, 0, 0, 0, CD_BLOCKS - 1, 0, 0, 0, 1, 0, 0]), 2048)
    assert data == pattern((CD_BLOCKS - 1) * 4, 4)


@pytest.mark.parametrize("cdb", [
    bytes([0x28, 0, 0, 0, 0, CD_BLOCKS, 0, 0, 1, 0, 0, 0]),
    bytes([0x28, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0, 0, 0]),  # CVE-2020-29443
    bytes([0xA8, 0, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
])
def test_atapi_read_out_of_range(cdrom: AtapiCdrom, cdb: bytes) -> None:
    out, data = packet(cdrom, cdb)
    assert out.failed and out.error >> 4 == 5
    assert data == bytes(4096)
    assert sense(cdrom) == (5, 0x21)
    assert sense(cdrom) == (0, 0)  # REQUEST SENSE clears it


def test_atapi_read_larger_than_buffers_is_refused(cdrom: AtapiCdrom) -> None:
    out, data = packet(cdrom, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0]), 2048)
    assert out.failed and data == bytes(2048)


def test_atapi_allocation_lengths_bound_replies(cdrom: AtapiCdrom) -> None:
    # CVE-2015-5154 pattern: replies never exceed the allocation length nor the buffers
    for cdb in (bytes([0x12, 0, 0, 0, 5, 0]), bytes([0x03, 0, 0, 0, 5, 0]),
                bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 5, 0]),
                bytes([0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 5, 0]),
                bytes([0x46, 0, 0, 0, 0, 0, 0, 0, 5, 0]),
                bytes([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 5, 0])):
        out, data = packet(cdrom, cdb.ljust(12, b"\0"))
        assert not out.failed and out.transferred == 5, hex(cdb[0])
        assert data[5:] == bytes(4091)
    out, data = packet(cdrom, bytes([0x12, 0, 0, 0xFF, 0xFF, 0]).ljust(12, b"\0"), 3)
    assert out.transferred == 3


def test_atapi_inquiry_capacity_toc(cdrom: AtapiCdrom) -> None:
    _, data = packet(cdrom, bytes([0x12, 0, 0, 0, 36, 0]).ljust(12, b"\0"))
    assert data[0] == 5 and data[1] & 0x80
    _, data = packet(cdrom, bytes([0x25]).ljust(12, b"\0"))
    assert struct.unpack(">II", data[:8]) == (CD_BLOCKS - 1, 2048)
    _, data = packet(cdrom, bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert struct.unpack(">H", data[:2])[0] == 18 and data[6] == 1 and data[14] == 0xAA
    assert struct.unpack(">I", data[16:20])[0] == CD_BLOCKS
    _, data = packet(cdrom, bytes([0x43, 2, 0, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert data[16:20] == lba_to_msf(CD_BLOCKS) and lba_to_msf(0) == bytes((0, 0, 2, 0))
    _, data = packet(cdrom, bytes([0x43, 0, 1, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert data[:4] == bytes((0, 10, 1, 1))
    out, _ = packet(cdrom, bytes([0x43, 0, 5, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert out.failed and sense(cdrom) == (5, 0x24)


def test_atapi_config_events_mode_sense(cdrom: AtapiCdrom) -> None:
    _, data = packet(cdrom, bytes([0x46, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]).ljust(12, b"\0"))
    assert struct.unpack(">H", data[6:8])[0] == 0x0008
    _, data = packet(cdrom, bytes([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]).ljust(12, b"\0"))
    assert data[2] == 4 and data[5] == 2  # media class, media present
    out, _ = packet(cdrom, bytes([0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]).ljust(12, b"\0"))
    assert out.failed
    _, data = packet(cdrom, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert data[8] == 0x2A and struct.unpack(">H", data[:2])[0] == 6 + 22
    out, _ = packet(cdrom, bytes([0x5A, 0, 0x05, 0, 0, 0, 0, 0, 0xFF, 0]).ljust(12, b"\0"))
    assert out.failed


def test_atapi_write_and_unknown_opcodes(cdrom: AtapiCdrom) -> None:
    out, _ = packet(cdrom, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    assert out.failed and sense(cdrom) == (7, 0x27)
    out, _ = packet(cdrom, bytes([0xFF]).ljust(12, b"\0"))
    assert out.failed and sense(cdrom) == (5, 0x20)
    out, _ = packet(cdrom, b"")  # empty CDB is TEST UNIT READY, not an exception
    assert not out.failed


def test_empty_drive_is_not_ready() -> None:
    dev = AtapiCdrom(None)
    out, _ = packet(dev, bytes(12))
    assert out.failed and sense(dev) == (2, 0x3A)
    out, _ = packet(dev, bytes([0x28]).ljust(12, b"\0"))
    assert out.failed


def test_atapi_read_disc_information(cdrom: AtapiCdrom) -> None:
    out, data = packet(cdrom, bytes([0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]).ljust(12, b"\0"))
    assert not out.failed and out.transferred == 34 and data[2] == 0x0E and data[3] == 1
    out, _ = packet(cdrom, bytes([0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0]).ljust(12, b"\0"))
    assert out.failed and sense(cdrom) == (5, 0x24)


def test_empty_image_has_no_sectors_and_no_arithmetic_traps(tmp_path: Path) -> None:
    # CVE-2015-6855 pattern: nothing divides by or underflows on a zero-sized medium
    p = tmp_path / "empty.img"
    p.write_bytes(b"")
    dev = make(p)
    assert words(dev.identify())[60] == 0
    assert dev.execute(TaskFile(Cmd.READ_NATIVE_MAX_EXT), BufferPhase(0)).lba == 0
    assert dev.execute(TaskFile(Cmd.READ_DMA_EXT, lba=0, count=1), BufferPhase(SECTOR)).failed
    cd = AtapiCdrom(DiskImage(DiskSpec(str(p), readonly=True)))
    out, data = packet(cd, bytes([0x25]).ljust(12, b"\0"))
    assert not out.failed
    out, _ = packet(cd, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    assert out.failed and sense(cd) == (5, 0x21)
