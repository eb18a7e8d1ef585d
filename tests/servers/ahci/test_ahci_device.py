"""The AHCI controller driven like a driver: region reads/writes, guest RAM in a memfd."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ahci_driver import (
    DATA_BASE,
    HBFS,
    IFS,
    TFES,
    AhciDriver,
    PxCI,
    PxCMD,
    PxIE,
    PxIS,
    PxSACT,
    PxSCTL,
    PxSERR,
    PxSIG,
    PxSSTS,
    PxTFD,
    h2d,
)
from ahci_phase import pattern

from servers.ahci.ata import AtaDisk, Identity
from servers.ahci.atapi import AtapiCdrom
from servers.ahci.disk import SECTOR, DiskImage, DiskSpec
from servers.ahci.port import INLINE_MAX, PrdtPhase
from xdevproto.errors import DeviceError
from xdevproto.pci.dma import WouldBlock
from xdevproto.wire import IrqIndex, SetIrqsFlags

SECTORS = 4096
DHRS, PSS, SDBS, DPS = 1, 2, 8, 32


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(0, SECTORS))
    return p


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ISO 9660 image when xorriso is installed, else a synthetic one (read-only)."""
    tmp_path = tmp_path_factory.mktemp("iso")
    p = tmp_path / "cd.iso"
    src = tmp_path / "src"
    src.mkdir()
    (src / "HELLO.TXT").write_bytes(b"hello from xdev\n" * 100)
    if shutil.which("xorriso"):
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(p), str(src)],
                       check=True, capture_output=True)
    else:
        p.write_bytes(bytes(16 * 2048) + b"\x01CD001".ljust(2048, b"\0") + bytes(32 * 2048))
    return p


@pytest.fixture
def drv(image: Path, iso: Path) -> Iterator[AhciDriver]:
    d = AhciDriver([AtaDisk(DiskImage(DiskSpec(str(image))), Identity(serial="S1")),
                    AtapiCdrom(DiskImage(DiskSpec(str(iso), readonly=True))), None])
    d.hba_reset()
    d.port_start(0)
    d.port_start(1)
    yield d
    d.close()


def slow_disk(d: AhciDriver, wait: Callable[[], object]) -> None:
    """Port 0's disk takes ``wait()`` for every command, as a disk without
    the data cached would: inside ``nowait`` (the register thread's inline
    reads) it refuses, as RWF_NOWAIT does, and the command goes to a worker."""
    drive = d.dev.ports[0].drive
    assert drive is not None
    real = drive.execute

    def execute(tf, data, cdb=b""):  # type: ignore[no-untyped-def]
        if not data.dma.may_wait:
            raise WouldBlock("sectors not cached")
        wait()
        return real(tf, data, cdb)

    drive.execute = execute  # type: ignore[method-assign]


def read(d: AhciDriver, lba: int, n: int, chunk: int = 0) -> tuple[int, bytes]:
    return d.run(0, h2d(0x25, lba=lba, count=n), n * SECTOR, chunk=chunk)


def recover(d: AhciDriver, port: int = 0) -> None:
    """libahci error handling: stop the engine, clear errors, start again."""
    d.port_stop(port)
    d.pwr(port, PxSERR, 0xFFFFFFFF)
    d.pwr(port, PxIS, 0xFFFFFFFF)
    d.port_start(port)


def check_serves(d: AhciDriver) -> None:
    """After any abuse the controller still reads correctly."""
    recover(d)
    pis, data = read(d, 7, 2)
    assert not pis & TFES and data == pattern(7, 2)


# -- identity and registers ------------------------------------------------------------
def test_pci_identity(drv: AhciDriver) -> None:
    assert drv.cfg(0x00) == 0x2922_8086
    assert drv.cfg(0x08) >> 8 == 0x010601
    assert drv.cfg(0x3D, 1) == 1  # INTA#
    caps, ptr = [], drv.cfg(0x34, 1)
    while ptr:
        caps.append(drv.cfg(ptr, 1))
        ptr = drv.cfg(ptr + 1, 1)
    assert 0x05 in caps  # MSI
    drv.dev.region_write(7, 0x24, b"\xff\xff\xff\xff")
    assert drv.cfg(0x24) == (~(0x1000 - 1)) & 0xFFFFFFFF  # ABAR in BAR5, 4 KiB


def test_hba_registers_after_reset(drv: AhciDriver) -> None:
    cap = drv.rd(0x00)
    assert cap & 0x1F == 2 and cap >> 8 & 0x1F == 31 and cap & 1 << 30 and cap & 1 << 31
    assert drv.rd(0x0C) == 0b111 and drv.rd(0x10) == 0x10301 and drv.rd(0x04) & 1 << 31
    assert drv.prd(0, PxSIG) == 0x101 and drv.prd(1, PxSIG) == 0xEB140101
    assert drv.prd(0, PxSSTS) & 0xF == 3 and drv.prd(2, PxSSTS) == 0
    assert drv.prd(2, PxSIG) == 0xFFFFFFFF and drv.prd(2, PxTFD) == 0x7F
    drv.wr(0x00, 0)  # CAP is read-only
    assert drv.rd(0x00) == cap
    drv.wr(0x04, 1 << 31 | 1)  # GHC.HR: CAP and PI describe the same HBA after it
    assert drv.rd(0x00) == cap and drv.rd(0x0C) == 0b111 and drv.rd(0x04) & 1 == 0


def test_register_access_semantics(drv: AhciDriver) -> None:
    drv.pwr(2, PxIS, 0)
    drv.pwr(0, PxCI, 0)  # RW1S: writing 0 clears nothing
    drv.pwr(0, 0x40, 0xFFFFFFFF)  # PxFBS read-only
    assert drv.prd(0, 0x40) == 0
    drv.pwr(0, 0x00, 0x12345FFF)  # PxCLB is 1 KiB aligned
    assert drv.prd(0, 0x00) == 0x12345C00
    drv.pwr(0, PxSERR, 0x0400)  # RW1C on a clear register stays clear
    assert drv.prd(0, PxSERR) == 0


def test_ci_is_ignored_while_stopped(drv: AhciDriver) -> None:
    drv.port_stop(0)
    drv.build(0, 0, h2d(0xEC), [(DATA_BASE, 512, False)])
    drv.issue(0, 1, ncq=True)
    assert drv.prd(0, PxCI) == 0 and drv.prd(0, PxSACT) == 0
    drv.port_start(0)
    pis, data = drv.run(0, h2d(0xEC), 512)
    assert pis & DHRS


# -- IDENTIFY, reads and writes --------------------------------------------------------
def test_identify_through_the_hba(drv: AhciDriver) -> None:
    drv.irq_count()
    pis, data = drv.run(0, h2d(0xEC), 512)
    assert pis & DHRS and pis & PSS and not pis & TFES
    assert data == drv.dev.ports[0].drive.identify()  # type: ignore[union-attr]
    assert drv.prd(0, PxCI) == 0 and drv.prd(0, PxTFD) & 0xFF == 0x50
    assert drv.prdbc(0, 0) == 512
    assert drv.rd(0x08) & 1 and drv.irq_count() >= 1
    d2h, psfis = drv.rfis(0, 0x40), drv.rfis(0, 0x20)
    assert d2h[0] == 0x34 and d2h[2] == 0x50 and psfis[0] == 0x5F and psfis[15] == 0x50


def test_identify_packet_first_like_seabios(drv: AhciDriver) -> None:
    pis, _ = drv.run(0, h2d(0xA1), 512)
    assert pis & TFES and drv.prd(0, PxCI) == 1  # failed slot stays issued (AHCI 6.1.2)
    recover(drv)
    pis, data = drv.run(1, h2d(0xA1), 512)
    assert not pis & TFES and struct.unpack_from("<H", data)[0] == 0x85C0


def test_read_first_and_last_lba(drv: AhciDriver) -> None:
    for lba in (0, SECTORS - 16):
        pis, data = read(drv, lba, 16)
        assert pis & DHRS and not pis & TFES
        assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(lba, 16)).digest()


def test_write_first_and_last_lba(drv: AhciDriver, image: Path) -> None:
    for lba in (0, SECTORS - 8):
        data = os.urandom(8 * SECTOR)
        pis, _ = drv.run(0, h2d(0x35, lba=lba, count=8), data=data)
        assert not pis & TFES and drv.prdbc(0, 0) == len(data)
        assert image.read_bytes()[lba * SECTOR:(lba + 8) * SECTOR] == data
        assert read(drv, lba, 8)[1] == data


def test_prdt_with_many_small_entries(drv: AhciDriver) -> None:
    # 248 entries of 66 bytes (an even count; entries straddle sector boundaries)
    n = 248 * 66 // SECTOR
    pis, data = read(drv, 100, n, chunk=66)
    assert not pis & TFES and data[:n * SECTOR] == pattern(100, n)


def test_prdt_interrupt_bit_sets_dps(drv: AhciDriver) -> None:
    drv.build(0, 3, h2d(0x25, lba=0, count=1), [(DATA_BASE, 512, True)])
    drv.pwr(0, PxIS, 0xFFFFFFFF)
    drv.issue(0, 1 << 3)
    assert drv.wait_done(0, 1 << 3) & DPS


def test_lba28_read_dma(drv: AhciDriver) -> None:
    pis, data = drv.run(0, h2d(0xC8, lba=SECTORS - 1, count=1, device=0x40), SECTOR)
    assert not pis & TFES and data == pattern(SECTORS - 1, 1)


# -- NCQ ------------------------------------------------------------------------------
def ncq_read(drv: AhciDriver, slot: int, lba: int, n: int) -> None:
    drv.build(0, slot, h2d(0x60, lba=lba, count=slot << 3, features=n),
              [(DATA_BASE + slot * 0x10000, n * SECTOR, False)])


def ncq_write(drv: AhciDriver, slot: int, lba: int, data: bytes) -> None:
    """WRITE FPDMA QUEUED of ``data`` (whole sectors) from DATA_BASE, issued."""
    drv.ram.write(DATA_BASE, data)
    drv.build(0, slot, h2d(0x61, lba=lba, count=slot << 3, features=len(data) // SECTOR),
              [(DATA_BASE, len(data), False)], write=True)
    drv.issue(0, 1 << slot, ncq=True)


def test_ncq_32_tags(drv: AhciDriver) -> None:
    for tag in range(32):
        ncq_read(drv, tag, tag * 100, 8)
    drv.pwr(0, PxIS, 0xFFFFFFFF)
    drv.issue(0, 0xFFFFFFFF, ncq=True)
    pis = drv.wait_done(0, 0xFFFFFFFF)
    assert pis & SDBS and not pis & TFES
    assert drv.prd(0, PxSACT) == 0 and drv.prd(0, PxCI) == 0
    for tag in range(32):
        got = drv.ram.read(DATA_BASE + tag * 0x10000, 8 * SECTOR)
        assert got == pattern(tag * 100, 8), tag
    assert drv.rfis(0, 0x58, 8)[0] == 0xA1


def test_ncq_commands_really_run_concurrently(drv: AhciDriver) -> None:
    barrier = threading.Barrier(32, timeout=10)
    # The barrier breaks (and the command fails) unless all 32 are in flight at once.
    slow_disk(drv, barrier.wait)
    for tag in range(32):
        ncq_read(drv, tag, tag, 1)
    drv.issue(0, 0xFFFFFFFF, ncq=True)
    pis = drv.wait_done(0, 0xFFFFFFFF)
    assert not pis & (TFES | HBFS | IFS) and not barrier.broken


def _count_worker_jobs(drv: AhciDriver) -> list[object]:
    jobs: list[object] = []
    work = drv.dev.work
    real = work.submit

    def submit(fn, done=None):  # type: ignore[no-untyped-def]
        jobs.append(fn)
        return real(fn, done)

    work.submit = submit  # type: ignore[method-assign]
    return jobs


def test_cached_short_reads_complete_without_a_worker(drv: AhciDriver, image: Path) -> None:
    """The page cache holds the image (it was just written): 32 NCQ reads of
    4 KiB and a READ DMA EXT finish on the register thread, data intact.
    (Where the file system refuses RWF_NOWAIT, as tmpfs does, they all take
    workers instead.)"""
    with open(image, "rb") as f:
        try:
            os.preadv(f.fileno(), [bytearray(1)], 0, os.RWF_NOWAIT)
            inline = True
        except OSError:
            inline = False
    jobs = _count_worker_jobs(drv)
    for tag in range(32):
        ncq_read(drv, tag, tag * 100, 8)
    drv.issue(0, 0xFFFFFFFF, ncq=True)
    assert not drv.wait_done(0, 0xFFFFFFFF) & (TFES | HBFS | IFS)
    for tag in range(32):
        assert drv.ram.read(DATA_BASE + tag * 0x10000, 8 * SECTOR) == pattern(tag * 100, 8)
    pis, data = read(drv, 7, 16)
    assert not pis & TFES and data == pattern(7, 16)
    assert len(jobs) == (0 if inline else 33)


def test_reads_that_would_wait_go_to_workers(drv: AhciDriver,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncached data (RWF_NOWAIT says EAGAIN), a long read and a write each
    take a worker, and every one completes with the right data."""
    jobs = _count_worker_jobs(drv)
    real = os.preadv
    refused = []

    def preadv(fd, bufs, offset, flags=0):  # type: ignore[no-untyped-def]
        if flags & os.RWF_NOWAIT:
            refused.append(offset)
            raise BlockingIOError(11, "not cached")
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    ncq_read(drv, 3, 300, 8)
    drv.issue(0, 1 << 3, ncq=True)
    assert not drv.wait_done(0, 1 << 3) & (TFES | HBFS | IFS)
    assert drv.ram.read(DATA_BASE + 3 * 0x10000, 8 * SECTOR) == pattern(300, 8)
    assert refused == [300 * SECTOR] and len(jobs) == 1
    monkeypatch.setattr(os, "preadv", real)
    n = INLINE_MAX // SECTOR + 8
    pis, got = read(drv, 0, n)
    assert not pis & TFES and got == pattern(0, n)
    assert len(jobs) == 2
    ncq_write(drv, 5, 40, os.urandom(8 * SECTOR))
    assert not drv.wait_done(0, 1 << 5) & TFES
    assert len(jobs) == 3


def test_ncq_write_and_error_log(drv: AhciDriver, image: Path) -> None:
    data = os.urandom(4 * SECTOR)
    ncq_write(drv, 5, 40, data)
    assert not drv.wait_done(0, 1 << 5) & TFES
    assert image.read_bytes()[40 * SECTOR:44 * SECTOR] == data
    # a tag past the end: TFES, SDB with ERR, the error log names the tag
    ncq_read(drv, 9, SECTORS - 1, 2)
    drv.issue(0, 1 << 9, ncq=True)
    pis = drv.wait_done(0, 1 << 9)
    assert pis & TFES and drv.prd(0, PxTFD) & 1 and drv.prd(0, PxSACT) == 1 << 9
    recover(drv)
    pis, page = drv.run(0, h2d(0x2F, lba=0x10, count=1), SECTOR)
    assert not pis & TFES and page[0] == 9 and sum(page) % 256 == 0


# -- TRIM and FLUSH ---------------------------------------------------------------------
def test_trim_and_flush(drv: AhciDriver, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = struct.pack("<QQ", 64 | 16 << 48, 1000 | 8 << 48).ljust(SECTOR, b"\0")
    pis, _ = drv.run(0, h2d(0x06, count=1, features=1), data=ranges)
    assert not pis & TFES
    content = image.read_bytes()
    assert content[64 * SECTOR:80 * SECTOR] == bytes(16 * SECTOR)
    assert content[1000 * SECTOR:1008 * SECTOR] == bytes(8 * SECTOR)
    assert content[80 * SECTOR:81 * SECTOR] == pattern(80, 1)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    pis, _ = drv.run(0, h2d(0xEA))
    assert not pis & TFES and synced


# -- ATAPI --------------------------------------------------------------------------------
def test_atapi_reads_the_iso(drv: AhciDriver, iso: Path) -> None:
    cdb = bytes([0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0, 0, 0])
    pis, data = drv.run(1, h2d(0xA0, features=1), 2048, cdb=cdb)
    assert not pis & TFES and data[1:6] == b"CD001"
    assert data == iso.read_bytes()[16 * 2048:17 * 2048]
    pis, cap = drv.run(1, h2d(0xA0), 8, cdb=bytes([0x25]).ljust(12, b"\0"))
    assert struct.unpack(">II", cap) == (iso.stat().st_size // 2048 - 1, 2048)


def test_atapi_error_then_request_sense(drv: AhciDriver) -> None:
    cdb = bytes([0x28, 0, 0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 1, 0, 0, 0])  # CVE-2020-29443
    pis, data = drv.run(1, h2d(0xA0, features=1), 2048, cdb=cdb)
    assert pis & TFES and drv.prd(1, PxTFD) >> 12 == 5 and data == bytes(2048)
    recover(drv, 1)
    pis, sense = drv.run(1, h2d(0xA0), 18, cdb=bytes([3, 0, 0, 0, 18, 0]).ljust(12, b"\0"))
    assert sense[2] == 5 and sense[12] == 0x21


def test_atapi_huge_allocation_small_prdt(drv: AhciDriver) -> None:
    # CVE-2015-5154 pattern: the reply stops at the PRDT, not at the allocation length
    drv.ram.write(DATA_BASE + 8, b"\xAA" * 64)
    pis, data = drv.run(1, h2d(0xA0), 8, cdb=bytes([0x12, 0, 0, 0xFF, 0xFF, 0]).ljust(12, b"\0"))
    assert not pis & TFES and drv.ram.read(DATA_BASE + 8, 64) == b"\xAA" * 64


def test_read_native_max_on_atapi(drv: AhciDriver) -> None:
    # CVE-2015-6855: no computation on a packet device, a clean abort
    pis, _ = drv.run(1, h2d(0xF8))
    assert pis & TFES and drv.prd(1, PxTFD) >> 8 & 0x04
    check_serves(drv)


# -- error paths and the CVE patterns of device-notes.md ----------------------------------
def test_read_past_end_is_task_file_error(drv: AhciDriver) -> None:
    pis, data = read(drv, SECTORS - 1, 2)
    assert pis & TFES and drv.prd(0, PxTFD) & 1 and drv.prd(0, PxTFD) >> 8 & 0x10
    assert drv.prd(0, PxCI) == 1 and drv.prd(0, PxCMD) >> 8 & 0x1F == 0
    assert data == bytes(2 * SECTOR)
    drv.pwr(0, PxCI, 2)  # a halted port takes no new commands
    assert drv.prd(0, PxCI) == 1
    check_serves(drv)


def test_zero_prdt_entries_cve_2014_9718(drv: AhciDriver) -> None:
    drv.build(0, 0, h2d(0x25, lba=0, count=1), [])
    drv.issue(0, 1)
    assert drv.wait_done(0, 1) & TFES
    check_serves(drv)


def test_prdt_smaller_than_transfer_gitlab_2777(drv: AhciDriver) -> None:
    drv.build(0, 0, h2d(0x25, lba=0, count=4), [(DATA_BASE, 3, False), (DATA_BASE + 8, 1, False)])
    drv.issue(0, 1)
    assert drv.wait_done(0, 1) & TFES
    check_serves(drv)


@pytest.mark.parametrize("where", ["prd", "ctba", "clb", "prdtl"])
def test_unmapped_dma_is_host_bus_fatal(drv: AhciDriver, where: str) -> None:
    far = 1 << 40
    if where == "prd":
        drv.build(0, 0, h2d(0x25, lba=0, count=1), [(far, 512, False)])
    elif where == "ctba":
        drv.build(0, 0, h2d(0x25), ctba=far)
    elif where == "prdtl":  # 65535 entries running past the end of guest RAM
        drv.ram.write((48 << 20) - 0x100, h2d(0x25, count=1))
        drv.build(0, 0, h2d(0x25), ctba=(48 << 20) - 0x100, prdtl=0xFFFF)
    else:  # CVE-2016-2197 pattern: a command list that was never mapped
        drv.port_stop(0)
        drv.pwr(0, 0x00, 0xFFFFFC00)
        drv.pwr(0, 0x04, 0xFF)
        drv.pwr(0, PxCMD, drv.prd(0, PxCMD) | 0x11)
    drv.issue(0, 1)
    assert drv.wait_done(0, 1) & HBFS
    check_serves(drv)


@pytest.mark.parametrize("fis,cfl", [(b"\x34" + bytes(19), 5), (h2d(0x25), 0), (h2d(0x25), 17)])
def test_malformed_command_is_interface_error(drv: AhciDriver, fis: bytes, cfl: int) -> None:
    drv.build(0, 0, fis, [(DATA_BASE, 512, False)], cfl=cfl)
    drv.issue(0, 1)
    assert drv.wait_done(0, 1) & IFS and drv.prd(0, PxSERR) & 1 << 10
    check_serves(drv)


def test_srst_control_fis_cve_2021_3735(drv: AhciDriver) -> None:
    drv.build(0, 0, h2d(0, c=False, control=0x04))
    drv.issue(0, 1)
    drv.wait(lambda: drv.prd(0, PxCI) == 0, "SRST assert never completed")
    assert drv.prd(0, PxTFD) & 0x80
    drv.build(0, 1, h2d(0, c=False, control=0))
    drv.issue(0, 2)
    drv.wait(lambda: drv.prd(0, PxCI) == 0, "SRST release never completed")
    assert drv.prd(0, PxTFD) & 0xFF == 0x50 and drv.prd(0, PxSIG) == 0x101
    assert drv.rfis(0, 0x40)[12] == 1  # signature FIS
    check_serves(drv)


def test_smart_offline_cve_2014_2894(drv: AhciDriver) -> None:
    pis, _ = drv.run(0, h2d(0xB0, features=0xD4, lba=0xC24F00), SECTOR)
    assert pis & TFES and drv.prd(0, PxTFD) >> 8 == 0x04
    check_serves(drv)


def test_bad_ncq_during_others_then_stop_cve_2016_1568(drv: AhciDriver) -> None:
    for tag in range(8):
        ncq_read(drv, tag, SECTORS + tag if tag == 3 else tag, 4)
    drv.issue(0, 0xFF, ncq=True)
    drv.port_stop(0)  # stop while tags may still be in flight
    assert drv.prd(0, PxCI) == 0 and drv.prd(0, PxSACT) == 0
    drv.dev.work.drain()
    assert drv.prd(0, PxSACT) == 0  # stale completions touched nothing
    check_serves(drv)


def test_no_fis_receive_still_completes_cve_2019_12067(drv: AhciDriver) -> None:
    drv.port_stop(0)
    drv.pwr(0, PxCMD, drv.prd(0, PxCMD) & ~0x10)
    drv.pwr(0, PxCMD, drv.prd(0, PxCMD) | 0x01)
    pis, data = read(drv, 3, 1)
    assert not pis & TFES and data == pattern(3, 1)


def test_registers_answer_while_io_is_blocked(drv: AhciDriver) -> None:
    gate = threading.Event()
    slow_disk(drv, lambda: gate.wait(10))
    drv.build(0, 0, h2d(0x25, lba=0, count=1), [(DATA_BASE, 512, False)])
    drv.issue(0, 1)
    for _ in range(100):
        assert drv.prd(0, PxCI) == 1 and drv.rd(0x00)
    gate.set()
    assert not drv.wait_done(0, 1) & TFES


def test_comreset_aborts_and_brings_link_back(drv: AhciDriver) -> None:
    drv.port_stop(0)
    drv.pwr(0, PxSCTL, 1)
    assert drv.prd(0, PxSSTS) & 0xF == 1 and drv.prd(0, PxTFD) & 0x80
    drv.pwr(0, PxSCTL, 0)
    assert drv.prd(0, PxSSTS) & 0xF == 3 and drv.prd(0, PxSIG) == 0x101
    assert drv.prd(0, PxSERR) & 1 << 26 and drv.prd(0, PxIS) & 1 << 6  # DIAG.X, PCS
    drv.pwr(0, PxSERR, 0xFFFFFFFF)
    assert not drv.prd(0, PxIS) & 1 << 6
    check_serves(drv)


def test_hba_reset_with_commands_in_flight(drv: AhciDriver) -> None:
    for tag in range(16):
        ncq_read(drv, tag, tag, 64)
    drv.issue(0, 0xFFFF, ncq=True)
    drv.hba_reset()
    assert drv.prd(0, PxCI) == 0 and drv.prd(0, PxCMD) & 1 == 0 and drv.rd(0x08) == 0
    drv.dev.work.drain()
    assert drv.prd(0, PxSACT) == 0 and drv.prd(0, PxIS) & (SDBS | TFES) == 0
    drv.port_start(0)
    check_serves(drv)


def test_readonly_disk_refuses_writes(image: Path) -> None:
    d = AhciDriver([AtaDisk(DiskImage(DiskSpec(str(image), readonly=True)))])
    try:
        d.hba_reset()
        d.port_start(0)
        pis, _ = d.run(0, h2d(0x35, lba=0, count=1), data=bytes(SECTOR))
        assert pis & TFES and d.prd(0, PxTFD) >> 8 & 0x04
        assert image.read_bytes()[:SECTOR] == pattern(0, 1)
    finally:
        d.close()


# -- interrupts -------------------------------------------------------------------------
def test_intx_level_follows_is(drv: AhciDriver) -> None:
    drv.irq_count()
    drv.run(0, h2d(0xEC), 512)
    assert drv.irq_count() == 1 and drv.dev.intr.levels
    drv.pwr(0, PxIS, 0xFFFFFFFF)
    drv.wr(0x08, 1)
    assert drv.rd(0x08) == 0 and not drv.dev.intr.levels
    drv.pwr(0, PxIE, 0)
    drv.run(0, h2d(0xEC), 512)
    assert drv.rd(0x08) == 0 and not drv.dev.intr.levels  # masked by PxIE


def test_is_stays_while_port_cause_pending(drv: AhciDriver) -> None:
    drv.run(0, h2d(0xEC), 512)
    drv.wr(0x08, 1)  # IS cleared before PxIS: the port's enabled cause keeps it set
    assert drv.rd(0x08) & 1


def test_msi_delivery(drv: AhciDriver) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        drv.dev.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 0, 1, [os.dup(efd)], None)
        ptr = drv.cfg(0x34, 1)
        while drv.cfg(ptr, 1) != 0x05:
            ptr = drv.cfg(ptr + 1, 1)
        drv.dev.region_write(7, ptr + 2, struct.pack("<H", drv.cfg(ptr + 2, 2) | 1))
        drv.run(0, h2d(0xEC), 512)
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


def test_prdt_phase_cut() -> None:
    from xdevproto.pci.dma import GuestMemory, SgEntry
    phase = PrdtPhase(GuestMemory(), [SgEntry(0, 10), SgEntry(100, 10)])
    assert phase.length == 20
    assert phase._cut(15) == [SgEntry(0, 10), SgEntry(100, 5)]


# -- unimplemented ports and migration ----------------------------------------------------
def test_registers_past_the_ports_are_reserved(image: Path) -> None:
    d = AhciDriver([AtaDisk(DiskImage(DiskSpec(str(image))))])
    try:
        d.pwr(3, 0x00, 0x12345000)
        d.pwr(3, PxCMD, 0x11)
        assert d.prd(3, 0x00) == 0 and d.prd(3, PxCMD) == 0 and d.prd(1, PxSSTS) == 0
        # The same as numbers, as bridge.direct accesses them.
        port3 = 0x100 + 3 * 0x80
        d.dev.region_write_int(5, port3 + PxCMD, 4, 0x11)
        assert d.dev.region_read_int(5, port3 + PxCMD, 4) == 0
        assert d.dev.region_read_int(5, 0x100 + PxCMD, 4) == d.prd(0, PxCMD) != 0
    finally:
        d.close()


def test_packet_command_without_a_bit_still_reads_acmd(drv: AhciDriver) -> None:
    cdb = bytes([0x25]).ljust(16, b"\0")
    drv.build(1, 0, h2d(0xA0), [(DATA_BASE, 8, False)])
    drv.ram.write(drv.table(1, 0) + 0x40, cdb)
    drv.issue(1, 1)
    assert not drv.wait_done(1, 1) & TFES
    assert struct.unpack(">I", drv.ram.read(DATA_BASE + 4, 4))[0] == 2048


def test_migration_state_round_trip(drv: AhciDriver, image: Path, iso: Path) -> None:
    drv.run(0, h2d(0xEF, features=0x82))  # write cache off
    read(drv, SECTORS, 1)  # error: the port halts
    drv.run(1, h2d(0xA0), 8, cdb=bytes([0x28, 0, 0xFF, 0, 0, 0, 0, 0, 1]).ljust(12, b"\0"))
    blob = drv.dev._save()
    other = AhciDriver([AtaDisk(DiskImage(DiskSpec(str(image)))),
                        AtapiCdrom(DiskImage(DiskSpec(str(iso), readonly=True))), None])
    try:
        other.dev._load(blob)
        disk = other.dev.ports[0].drive
        cd = other.dev.ports[1].drive
        assert isinstance(disk, AtaDisk) and not disk.disk.write_cache
        assert other.dev.ports[0].halted and other.prd(0, PxCI) == 1
        assert isinstance(cd, AtapiCdrom) and cd.sense.asc == 0x21
    finally:
        other.close()


@pytest.mark.parametrize("mutate", [
    lambda s: s[:-1], lambda s: s + b"\0", lambda s: bytes([9]) + s[1:],
    lambda s: s[:1] + bytes([5]) + s[2:], lambda s: s[:2] + bytes([0xFF]) + s[3:],
    lambda s: s[:3] + bytes([2]) + s[4:], lambda s: s[:5] + bytes([7]) + s[6:],
    lambda s: s[:7] + b"\xff\xff" + s[9:],
])
def test_hostile_migration_state_cve_2013_4526(drv: AhciDriver, mutate: object) -> None:
    state = drv.dev.save_state()
    before = [(p.halted, p.srst) for p in drv.dev.ports]
    with pytest.raises(DeviceError):
        drv.dev.load_state(mutate(state))  # type: ignore[operator]
    assert [(p.halted, p.srst) for p in drv.dev.ports] == before
    drv.dev.load_state(state)
    check_serves(drv)


def test_several_plain_commands_issued_at_once_run_one_by_one(drv: AhciDriver) -> None:
    running = []
    drive = drv.dev.ports[0].drive
    assert drive is not None
    real = drive.execute
    lock = threading.Lock()
    overlap: list[bool] = []

    def watched(tf, data, cdb=b""):
        with lock:
            running.append(1)
            overlap.append(len(running) > 1)
        try:
            return real(tf, data, cdb)
        finally:
            with lock:
                running.pop()

    drive.execute = watched  # type: ignore[method-assign]
    for slot in range(8):
        drv.build(0, slot, h2d(0x25, lba=slot * 10, count=4),
                  [(DATA_BASE + slot * 0x10000, 4 * SECTOR, False)])
    drv.issue(0, 0xFF)
    assert not drv.wait_done(0, 0xFF) & TFES
    assert len(overlap) == 8 and not any(overlap)
    for slot in range(8):
        assert drv.ram.read(DATA_BASE + slot * 0x10000, 4 * SECTOR) == pattern(slot * 10, 4)


def test_coalesce_merges_only_contiguous_entries() -> None:
    from servers.ahci.port import coalesce
    from xdevproto.pci.dma import SgEntry
    sg = [SgEntry(0, 10), SgEntry(10, 6), SgEntry(100, 4), SgEntry(104, 4), SgEntry(0, 2)]
    assert coalesce(sg) == [SgEntry(0, 16), SgEntry(100, 8), SgEntry(0, 2)]


def test_start_stop_storm_keeps_work_bounded(drv: AhciDriver) -> None:
    """Toggling ST with commands stuck in I/O never queues more than MAX_INFLIGHT jobs."""
    from servers.ahci.port import MAX_INFLIGHT
    gate = threading.Event()
    slow_disk(drv, lambda: gate.wait(10))
    for tag in range(32):
        ncq_read(drv, tag, tag, 1)
    peak = 0
    for _ in range(20):
        drv.issue(0, 0xFFFFFFFF, ncq=True)
        peak = max(peak, drv.dev.ports[0].inflight)
        drv.pwr(0, PxCMD, drv.prd(0, PxCMD) & ~1)
        drv.pwr(0, PxCMD, drv.prd(0, PxCMD) | 1)
    assert peak <= MAX_INFLIGHT
    drv.issue(0, 0xFFFFFFFF, ncq=True)
    gate.set()
    assert not drv.wait_done(0, 0xFFFFFFFF) & TFES
    assert drv.dev.ports[0].deferred == 0
    check_serves(drv)
