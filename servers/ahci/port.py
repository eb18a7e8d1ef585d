"""One AHCI port: command list processing, data transfer, FIS delivery, errors.

Theory of operation (AHCI 1.3.1 chapter 5, "Data transfer operation"):

* The guest builds a command header and table, sets the slot's PxCI bit
  (and PxSACT for NCQ). :meth:`Port.issue` hands each new slot to a worker
  that *fetches* it (header, command FIS, ATAPI command, PRDT) from guest
  memory; register accesses never touch guest memory or the disk.
* Short reads whose command list and data lie in fd-mapped guest memory
  and whose sectors are in the page cache run at once instead, on the
  thread that took the PxCI write (:meth:`Port._run_inline`): fetch, copy,
  completion. The copy is bounded (``INLINE_MAX``) and never waits: under
  :meth:`GuestMemory.nowait` anything that would (a DMA message, data not
  cached) raises before the command counts as started, and the slot goes
  to a worker as below. This saves two thread hand-overs per command, which
  is most of a 4 KiB read's cost.
* Fetched commands queue in slot-issue order. :meth:`Port._pump` starts them
  on workers: NCQ commands (READ/WRITE FPDMA QUEUED) run together, up to 32;
  any other command runs alone, as ATA requires.
* A worker executes the command (:mod:`.ata` / :mod:`.atapi`), writes PRDBC
  and the FISes (PIO Setup, D2H Register or Set Device Bits) into the
  received-FIS area, and then, under the device lock, the completion updates
  PxTFD, clears PxCI/PxSACT *before* PxIS and the interrupt are raised
  (QEMU "ahci: fix PxCI register race").
* Errors (6.1): a command that ends with ERR sets PxIS.TFES, an unreachable
  DMA address PxIS.HBFS, a malformed command PxIS.IFS; the port then halts
  (the failed slot stays in PxCI) until the guest clears PxCMD.ST.
* Clearing ST, a COMRESET (PxSCTL.DET) or an HBA reset bump the port's
  generation: completions of older work are dropped, so nothing a guest
  does can make a stale completion touch a newer command's state.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from xdevproto.pci.dma import DmaError, GuestMemory, SgEntry, WouldBlock

from . import fis as F
from . import regs as R
from .ata import NCQ_COMMANDS, AtaDisk, Cmd, Outcome, TaskFile
from .atapi import AtapiCdrom
from .disk import SECTOR, DiskError, DiskImage

if TYPE_CHECKING:
    from .device import AhciDevice

log = logging.getLogger(__name__)

Drive = AtaDisk | AtapiCdrom
MAX_INFLIGHT = 2 * R.NUM_SLOTS  # jobs per port, current and aborted generations together
#: reads up to this size may run on the thread that took the PxCI write
INLINE_MAX = 128 << 10
INLINE_COMMANDS = frozenset({Cmd.READ_FPDMA_QUEUED, Cmd.READ_DMA, Cmd.READ_DMA_EXT})


def coalesce(sg: list[SgEntry]) -> list[SgEntry]:
    """Merge entries that continue each other in guest memory (fewer, larger copies)."""
    out: list[SgEntry] = []
    for e in sg:
        if out and out[-1].addr + out[-1].length == e.addr:
            out[-1] = SgEntry(out[-1].addr, out[-1].length + e.length)
        else:
            out.append(e)
    return out


class PrdtPhase:
    """A command's data phase over its PRDT in guest memory (AHCI 4.2.3)."""

    def __init__(self, dma: GuestMemory, sg: list[SgEntry]) -> None:
        self.dma = dma
        self.sg = coalesce(sg)
        self._length = sum(e.length for e in sg)

    @property
    def length(self) -> int:
        return self._length

    def _cut(self, nbytes: int) -> list[SgEntry]:
        out: list[SgEntry] = []
        for e in self.sg:
            if nbytes <= 0:
                break
            out.append(e if e.length <= nbytes else SgEntry(e.addr, nbytes))
            nbytes -= e.length
        return out

    def put(self, data: bytes | bytearray | memoryview) -> int:
        return self.dma.write_sg(self._cut(len(data)), memoryview(data))

    def get(self, nbytes: int) -> bytes:
        return self.dma.read_sg(self._cut(nbytes))

    def disk_to_guest(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        if self.dma.preadv(disk.fd, self._cut(nbytes), lba * SECTOR) != nbytes:
            raise DiskError(f"short read at sector {lba}")

    def guest_to_disk(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        disk.check_writable()
        sg = self._cut(nbytes)
        if self.dma.pwritev(disk.fd, sg, lba * SECTOR) != nbytes:
            raise DiskError(f"short write at sector {lba}")
        disk.written()
        if log.isEnabledFor(logging.DEBUG):
            # What landed on the disk: each 4 KiB's first 8 bytes, to tell a
            # write of the wrong guest data from a wrong write afterwards.
            heads = [os.pread(disk.fd, 8, lba * SECTOR + at).hex()
                     for at in range(0, nbytes, 4096)]
            log.debug("wrote sectors %d+%d from %s: %s", lba, nbytes // SECTOR,
                      " ".join(f"{e.addr:#x}+{e.length:#x}" for e in sg), " ".join(heads))


@dataclass(frozen=True, slots=True)
class Command:
    slot: int
    header: F.CommandHeader
    h2d: F.H2D
    cdb: bytes
    sg: list[SgEntry]
    irq_on_done: bool

    @property
    def ncq(self) -> bool:
        return self.h2d.tf.command in NCQ_COMMANDS


@dataclass(frozen=True, slots=True)
class Done:
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetched command, and its result when the fetching worker also ran it."""

    cmd: Command
    started: bool
    done: Done | None = None
    error: BaseException | None = None


class Port:
    """State of one port beyond its registers; every method runs under the device lock
    except the ``_fetch_and_run``/``_execute`` workers."""

    def __init__(self, hba: AhciDevice, index: int, drive: Drive | None) -> None:
        self.hba = hba
        self.i = index
        self.drive = drive
        self.gen = 0
        self.inflight = 0  # fetch and execute jobs of any generation
        self.running_ncq = 0
        self.running_plain = False
        self.queue: deque[Command] = deque()
        self.halted = False
        self.srst = False
        self.deferred = 0  # issued slots waiting for old work to drain (see issue)
        abar = hba.abar
        self._values = abar.values  # the register file's storage, updated in place
        self._slots = {reg.name: abar.layout.slot(reg.name, index) for reg in abar.layout.regs
                       if reg.name.startswith("Px")}

    # -- register helpers --------------------------------------------------------------
    # By this port's slot numbers, looked up once: a command reads and sets
    # some twenty registers on its way.
    def get(self, name: str) -> int:
        return self._values[self._slots[name]]

    def set(self, name: str, value: int) -> None:
        self._values[self._slots[name]] = value & 0xFFFFFFFF

    def event(self, bits: int) -> None:
        """Set PxIS bits and let the HBA aggregate them into IS and the interrupt."""
        self.set("PxIS", self.get("PxIS") | bits)
        self.hba.port_interrupt(self.i)

    def _addr(self, lo: str, hi: str) -> int:
        return self.get(hi) << 32 | self.get(lo)

    # -- reset and link (AHCI 10.4) -----------------------------------------------------
    def abort_all(self) -> None:
        """Forget every issued command: work still running completes into nothing."""
        self.gen += 1
        self.queue.clear()
        self.halted = False
        self.deferred = 0
        self.set("PxCI", 0)
        self.set("PxSACT", 0)
        cmd = self.get("PxCMD") & ~(0x1F << R.CMD_CCS_SHIFT)
        self.set("PxCMD", cmd)

    def link_down(self) -> None:
        """COMRESET asserted (PxSCTL.DET = 1)."""
        self.abort_all()
        self.set("PxSSTS", R.SSTS_DEVICE_NO_PHY if self.drive else 0)
        self.set("PxTFD", 0x80 if self.drive else 0x7F)

    def link_up(self) -> None:
        """COMRESET released or HBA reset: the device sends its signature FIS."""
        if self.drive is None:
            self.set("PxSSTS", 0)
            return
        self.set("PxSSTS", R.SSTS_UP)
        self.set("PxSERR", self.get("PxSERR") | R.SERR_DIAG_X | R.SERR_DIAG_N)
        self.sync_serr_bits()
        self.signature()

    def signature(self) -> None:
        assert self.drive is not None  # callers check; not guest input
        status = 0x00 if self.drive.atapi else 0x50
        self.set("PxSIG", self.drive.signature)
        self.set("PxTFD", status | 0x01 << 8)
        self._deliver_async(F.d2h_fis(F.signature_outcome(self.drive.signature, status)),
                            F.RFIS_RFIS)

    def sync_serr_bits(self) -> None:
        """PxIS.PCS mirrors PxSERR.DIAG.X and PxIS.PRCS DIAG.N (AHCI 3.3.5)."""
        serr = self.get("PxSERR")
        pis = self.get("PxIS") & ~(R.IS_PCS | R.IS_PRCS)
        if serr & R.SERR_DIAG_X:
            pis |= R.IS_PCS
        if serr & R.SERR_DIAG_N:
            pis |= R.IS_PRCS
        self.set("PxIS", pis)
        if pis & self.get("PxIE"):
            self.hba.port_interrupt(self.i)

    # -- PxCMD (3.3.7) ------------------------------------------------------------------
    def command_written(self, value: int, old: int) -> None:
        cmd = self.get("PxCMD")
        if cmd & R.CMD_CLO:  # command list override: BSY and DRQ drop, CLO self-clears
            self.set("PxTFD", self.get("PxTFD") & ~(R.TFD_BSY | R.TFD_DRQ))
            cmd &= ~R.CMD_CLO
        cmd &= ~(0xF << R.CMD_ICC_SHIFT)  # interface changes complete at once
        cmd = cmd | R.CMD_FR if cmd & R.CMD_FRE else cmd & ~R.CMD_FR
        if cmd & R.CMD_FRE and not old & R.CMD_FRE and self.drive is not None \
                and self.get("PxSSTS") & 0xF == 3:
            self.set("PxCMD", cmd | R.CMD_FR)
            self._deliver_async(F.d2h_fis(F.signature_outcome(
                self.drive.signature, self.get("PxTFD") & 0xFF)), F.RFIS_RFIS)
        if cmd & R.CMD_ST and not old & R.CMD_ST:
            cmd |= R.CMD_CR
        elif not cmd & R.CMD_ST and old & R.CMD_ST:
            self.set("PxCMD", cmd)
            self.abort_all()
            cmd = self.get("PxCMD")
            if self.inflight == 0:
                cmd &= ~R.CMD_CR
        self.set("PxCMD", cmd)

    def _maybe_idle(self) -> None:
        cmd = self.get("PxCMD")
        if not cmd & R.CMD_ST and self.inflight == 0 and cmd & R.CMD_CR:
            self.set("PxCMD", cmd & ~R.CMD_CR)
        if self.deferred and self.inflight < MAX_INFLIGHT and not self.halted \
                and cmd & R.CMD_ST:
            slots, self.deferred = self.deferred, 0
            self.issue(slots)

    # -- issue ------------------------------------------------------------------------
    def issue(self, slots: int) -> None:
        """New PxCI bits (ST is set): fetch each command on a worker.

        Work of aborted generations may still run; beyond MAX_INFLIGHT jobs new
        slots wait in ``deferred``, so toggling ST in a loop cannot pile up
        unbounded work.
        """
        if self.drive is None:
            return  # no device answers: the slots stay issued until ST is cleared
        clb = self._addr("PxCLB", "PxCLBU")
        for slot in range(R.NUM_SLOTS):
            if slots >> slot & 1:
                if self.inflight >= MAX_INFLIGHT:
                    self.deferred |= 1 << slot
                    continue
                self.inflight += 1
                if self._run_inline(clb, slot):
                    continue
                self.hba.work.submit(partial(self._fetch_and_run, clb, slot, self.gen),
                                     partial(self._fetched, self.gen, slot))

    def _run_inline(self, clb: int, slot: int) -> bool:
        """Run a short cached read of ``slot`` right here (lock held); False
        when a worker must take the slot from the start. Every path a worker
        would take afterwards is the same: a command that may not start yet
        queues, a failure ends as the worker's would."""
        dma = self.hba.dma
        gen = self.gen
        try:
            with dma.nowait():
                cmd = self._fetch(clb, slot)
        except Exception:  # WouldBlock, or an error the worker reports as it always does
            return False
        if not cmd.h2d.c or cmd.h2d.tf.command not in INLINE_COMMANDS \
                or not isinstance(self.drive, AtaDisk) \
                or sum(e.length for e in cmd.sg) > INLINE_MAX \
                or self.queue or self.halted or not self._may_start(cmd):
            self._fetched(gen, slot, Fetched(cmd, False), None)  # queued for a worker
            return True
        fb = self._claim(cmd, new_job=False)
        try:
            with dma.nowait():
                done = self._execute(cmd, clb, fb)
        except WouldBlock:
            self.hba.work.submit(partial(self._execute, cmd, clb, fb),
                                 partial(self._executed, gen, cmd))
            return True
        except Exception as exc:  # the completion turns it into the port's error status
            self._executed(gen, cmd, None, exc)
            return True
        self._executed(gen, cmd, done, None)
        return True

    def _fetch_and_run(self, clb: int, slot: int, gen: int) -> Fetched:
        """Worker: fetch the command; if it may start at once, run it right here
        (saves a hand-over to a second worker: the common case of an idle port
        or NCQ traffic)."""
        cmd = self._fetch(clb, slot)
        with self.hba.lock:
            if gen != self.gen or not cmd.h2d.c or self.queue or self.halted \
                    or not self._may_start(cmd):
                return Fetched(cmd, False)
            # This fetch job becomes the command's execution: still one job.
            fb = self._claim(cmd, new_job=False)
        try:
            return Fetched(cmd, True, self._execute(cmd, clb, fb))
        except Exception as exc:  # the completion turns it into the port's error status
            return Fetched(cmd, True, None, exc)

    def _fetch(self, clb: int, slot: int) -> Command:
        """Read the command header and table (AHCI 4.2.2, 4.2.3)."""
        dma = self.hba.dma
        header = F.CommandHeader.parse(dma.read(clb + slot * F.CMD_HEADER_SIZE, 16))
        if not 5 <= header.cfl <= 16:
            raise F.BadCommand(f"command FIS length {header.cfl} dwords")
        # The whole table in one read: FIS, ATAPI command, PRDT.
        table = dma.read(header.ctba, F.CMD_TABLE_PRDT + header.prdtl * F.PRD_SIZE)
        h2d = F.H2D.parse(table[:header.cfl * 4])
        packet = header.atapi or h2d.tf.command == Cmd.PACKET
        cdb = table[F.CMD_TABLE_ACMD:F.CMD_TABLE_ACMD + 16] if packet else b""
        sg, irq = F.parse_prdt(table[F.CMD_TABLE_PRDT:])
        return Command(slot, header, h2d, cdb, sg, irq)

    def _fetched(self, gen: int, slot: int, fetched: Fetched | None,
                 error: BaseException | None) -> None:
        if fetched is not None and fetched.started:
            self._executed(gen, fetched.cmd, fetched.done, fetched.error)  # counts the job off
            return
        self.inflight -= 1
        if gen != self.gen:
            self._maybe_idle()
            return
        if error is not None or fetched is None:
            self._interface_error(slot, error)
            return
        cmd = fetched.cmd
        if not cmd.h2d.c:
            self._device_control(cmd)
            return
        self.queue.append(cmd)
        self._pump()

    def _device_control(self, cmd: Command) -> None:
        """A control FIS (C = 0): SRST set, then cleared, is a software reset (10.4.1)."""
        self.set("PxCI", self.get("PxCI") & ~(1 << cmd.slot))
        if cmd.h2d.tf.control & 0x04:
            self.srst = True
            self.set("PxTFD", R.TFD_BSY)
        elif self.srst and self.drive is not None:
            self.srst = False
            if isinstance(self.drive, AtaDisk):
                self.drive.standby = False
            self.signature()
            self.event(R.IS_DHRS)

    # -- execution ---------------------------------------------------------------------
    def _pump(self) -> None:
        while self.queue and not self.halted:
            cmd = self.queue[0]
            if not self._may_start(cmd):
                return
            self.queue.popleft()
            fb = self._claim(cmd)
            clb = self._addr("PxCLB", "PxCLBU")
            self.hba.work.submit(partial(self._execute, cmd, clb, fb),
                                 partial(self._executed, self.gen, cmd))

    def _may_start(self, cmd: Command) -> bool:
        """NCQ commands run together; any other command runs alone (ATA8-ACS)."""
        if cmd.ncq:
            return not self.running_plain
        return not (self.running_plain or self.running_ncq)

    def _claim(self, cmd: Command, new_job: bool = True) -> int | None:
        """Count ``cmd`` as running; the received-FIS address it reports to (None: FRE off)."""
        if cmd.ncq:
            self.running_ncq += 1
        else:
            self.running_plain = True
        if new_job:
            self.inflight += 1
        return self._addr("PxFB", "PxFBU") if self.get("PxCMD") & R.CMD_FRE else None

    def _execute(self, cmd: Command, clb: int, fb: int | None) -> Done:
        """Worker: run the command, store PRDBC and the FISes (never under the lock)."""
        drive = self.drive
        assert drive is not None  # issue() refuses ports without a drive
        tf: TaskFile = cmd.h2d.tf
        out = drive.execute(tf, PrdtPhase(self.hba.dma, cmd.sg), cmd.cdb)
        dma = self.hba.dma
        if not cmd.ncq:
            dma.write(clb + cmd.slot * F.CMD_HEADER_SIZE + 4, out.transferred.to_bytes(4, "little"))
        if fb is not None:
            if cmd.ncq:
                tags = 0 if out.failed else 1 << cmd.slot
                dma.write(fb + F.RFIS_SDBFIS, F.sdb_fis(out.status, out.error, tags))
            else:
                if out.pio:
                    dma.write(fb + F.RFIS_PSFIS, F.pio_setup_fis(out, True))
                dma.write(fb + F.RFIS_RFIS, F.d2h_fis(out))
        return Done(out)

    def _executed(self, gen: int, cmd: Command, done: Done | None,
                  error: BaseException | None) -> None:
        self.inflight -= 1
        if cmd.ncq:
            self.running_ncq -= 1
        else:
            self.running_plain = False
        if gen != self.gen:
            self._maybe_idle()
            self._pump()
            return
        if error is not None or done is None:
            self._interface_error(cmd.slot, error)
            return
        out = done.outcome
        self.set("PxTFD", out.status | out.error << 8)
        bit = 1 << cmd.slot
        if out.failed:
            self._task_file_error(cmd, out)
            return
        self.set("PxCI", self.get("PxCI") & ~bit)  # before PxIS and the interrupt
        if cmd.ncq:
            self.set("PxSACT", self.get("PxSACT") & ~bit)
            bits = R.IS_SDBS
        else:
            bits = R.IS_DHRS | (R.IS_PSS if out.pio else 0)
        self.event(bits | (R.IS_DPS if cmd.irq_on_done else 0))
        self._maybe_idle()
        self._pump()

    # -- errors (AHCI 6.1) -------------------------------------------------------------
    def _halt(self, slot: int) -> None:
        self.halted = True
        self.queue.clear()
        cmd = self.get("PxCMD") & ~(0x1F << R.CMD_CCS_SHIFT)
        self.set("PxCMD", cmd | slot << R.CMD_CCS_SHIFT)

    def _task_file_error(self, cmd: Command, out: Outcome) -> None:
        """6.1.2: the device reported ERR; the slot stays issued (non-NCQ) for the driver."""
        self._halt(cmd.slot)
        if cmd.ncq:
            self.set("PxCI", self.get("PxCI") & ~(1 << cmd.slot))
            self.event(R.IS_TFES | R.IS_SDBS)
        else:
            self.event(R.IS_TFES | R.IS_DHRS)

    def _interface_error(self, slot: int, error: BaseException | None) -> None:
        """6.1.1/6.1.4: unreachable memory is a host bus fatal error, a malformed
        command list entry an interface fatal error; both halt the port."""
        self._halt(slot)
        if isinstance(error, DmaError):
            log.info("port %d slot %d: %s", self.i, slot, error)
            self.event(R.IS_HBFS)
        else:
            if not isinstance(error, F.BadCommand):
                log.error("port %d slot %d: unexpected failure", self.i, slot, exc_info=error)
            self.set("PxSERR", self.get("PxSERR") | R.SERR_ERR_P)
            self.event(R.IS_IFS)

    # -- FIS delivery outside commands ---------------------------------------------------
    def _deliver_async(self, fis: bytes, offset: int) -> None:
        if not self.get("PxCMD") & R.CMD_FRE:
            return
        addr = self._addr("PxFB", "PxFBU") + offset
        self.hba.work.submit(partial(self.hba.dma.write, addr, fis), self._delivered)

    def _delivered(self, result: None, error: BaseException | None) -> None:
        if isinstance(error, DmaError):
            self.event(R.IS_HBFS)
