"""xdev-ahci throughput against the raw image file, measured in one run.

    python bench/ahci.py [--json OUT] [--seconds S] [--size-mb N] [--rounds N]

An ``xdev-ahci`` server process serves a raw image; this process is the
driver: it maps memfd guest RAM into the server (DMA_MAP with an fd, so disk
data moves by ``preadv``/``pwritev`` straight into guest memory), programs
the HBA through REGION_READ/WRITE over the real vfio-user socket (writes
posted with NO_REPLY, as a CPU posts MMIO writes), and takes completions as
MSI eventfd signals.

Figures:
* ``seq_read_mb_per_s`` / ``seq_write_mb_per_s``: 4 MiB READ/WRITE FPDMA
  QUEUED commands (PRDs of 64 KiB over contiguous buffers), 4 in flight,
  through the image (page cache warm);
* ``rand4k_read_iops_qd1`` / ``rand4k_read_iops_qd32``: 4 KiB NCQ reads at
  random aligned offsets, 1 or 32 outstanding;
* ``raw_seq_read_mb_per_s``: ``os.preadv`` of the same file in the same
  4 MiB pieces into the same four memfd buffers, in this process (the
  baseline: same copy, same cache footprint, no device);
* ``ratio_seq_read_vs_raw`` (target >= 0.7) and ``ratio_qd32_vs_qd1``
  (target >= 4).

The sequential reads and the baseline alternate in ``--rounds`` short
rounds with the server up throughout; the figures are medians and the ratio
is the median of the per-round ratios, so load from elsewhere on the machine
falls on both sides of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from xdevproto.client import Client  # noqa: E402
from xdevproto.guestmem import MemfdRam  # noqa: E402
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags  # noqa: E402

SECTOR = 512
RAM = 64 << 20
CLB, FB, CT = 0x10000, 0x11000, 0x20000  # command list, received FIS, 32 tables of 4 KiB
DATA = 1 << 20  # 32 data buffers of 1 MiB
P0 = 0x100
PxCLB, PxFB, PxIS, PxIE, PxCMD, PxSERR, PxSACT, PxCI = 0, 8, 0x10, 0x14, 0x18, 0x30, 0x34, 0x38
TFES_HBFS_IFS = 1 << 30 | 1 << 29 | 1 << 27
SEQ_BYTES, SEQ_DEPTH = 4 << 20, 4  # sequential: 4 MiB commands, 4 in flight


class Hba:
    """Just enough of a driver: port 0, NCQ, MSI completions."""

    def __init__(self, client: Client, ram: MemfdRam) -> None:
        self.c, self.ram = client, ram
        self._prdt: dict[int, tuple[int, bytes]] = {}  # tag -> (bytes, the PRDT in memory)
        client.dma_map(0, RAM, fd=ram.fd)
        self.efd = os.eventfd(0)
        client.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, fds=[self.efd])
        ptr = self.cfg(0x34, 1)
        while self.cfg(ptr, 1) != 0x05:
            ptr = self.cfg(ptr + 1, 1)
        ctl = self.cfg(ptr + 2, 2)
        client.region_write(PciRegion.CONFIG, ptr + 2, struct.pack("<H", ctl | 1))
        self.wr(0x04, 1 << 31 | 1)
        while self.rd(0x04) & 1:
            pass
        self.wr(0x04, 1 << 31 | 2)
        self.wr(P0 + PxCLB, CLB)
        self.wr(P0 + PxFB, FB)
        self.wr(P0 + PxSERR, 0xFFFFFFFF)
        self.wr(P0 + PxIS, 0xFFFFFFFF)
        self.wr(P0 + PxIE, 0xFDC000FF)
        self.wr(P0 + PxCMD, 0x10)
        self.wr(P0 + PxCMD, 0x11)

    def cfg(self, off: int, n: int) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.CONFIG, off, n), "little")

    def rd(self, off: int) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.BAR5, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        # Posted, as a CPU's MMIO writes are: the next read still sees it.
        self.c.region_write(PciRegion.BAR5, off, value.to_bytes(4, "little"), posted=True)

    def build(self, tag: int, lba: int, sectors: int, write: bool) -> None:
        table = CT + tag * 0x1000
        nbytes = sectors * SECTOR
        fis = bytes((0x27, 0x80, 0x61 if write else 0x60, sectors & 0xFF,
                     lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, 0x40,
                     lba >> 24 & 0xFF, lba >> 32 & 0xFF, 0, sectors >> 8 & 0xFF,
                     tag << 3, 0, 0, 0, 0, 0, 0, 0))
        size, prds = self._prdt.get(tag, (0, b""))
        if size != nbytes:  # a tag's buffer stays the same: its list changes with the size
            buf = DATA + tag * max(nbytes, 1 << 20)
            step = 64 << 10  # PRDs of 64 KiB, as a driver with large pages might build
            prds = b"".join(struct.pack("<IIII", buf + o, 0, 0, min(step, nbytes - o) - 1)
                            for o in range(0, nbytes, step))
            self._prdt[tag] = nbytes, prds
            self.ram.write(table + 0x80, prds)
        self.ram.write(table, fis)
        header = struct.pack("<IIII", 5 | (0x40 if write else 0) | (len(prds) // 16) << 16, 0,
                             table, 0)
        self.ram.write(CLB + tag * 32, header)

    def issue(self, tags: int) -> None:
        self.wr(P0 + PxSACT, tags)
        self.wr(P0 + PxCI, tags)

    def wait(self) -> int:
        """Block for an MSI; then what libahci does: PxIS, SACT, IS. Returns SACT."""
        os.eventfd_read(self.efd)
        pis = self.rd(P0 + PxIS)
        if pis & TFES_HBFS_IFS:
            raise RuntimeError(f"port error, PxIS {pis:#x}")
        self.wr(P0 + PxIS, pis)
        sact = self.rd(P0 + PxSACT)
        self.wr(0x08, 1)
        return sact


def run_queue(hba: Hba, depth: int, seconds: float,
              next_cmd: Callable[[int], None]) -> tuple[int, float]:
    """Keep ``depth`` tags busy for ``seconds``; returns (commands completed, elapsed)."""
    busy = 0
    done = 0
    start = time.perf_counter()
    end = start + seconds
    fresh = (1 << depth) - 1
    while True:
        now = time.perf_counter()
        if fresh and now < end:
            for tag in range(depth):
                if fresh >> tag & 1:
                    next_cmd(tag)
            hba.issue(fresh)
            busy |= fresh
        elif not busy:
            return done, time.perf_counter() - start
        sact = hba.wait()
        finished = busy & ~sact
        busy &= sact
        done += bin(finished).count("1")
        fresh = finished


def bench_device(image: Path, sectors: int, seconds: float, rounds: int) -> dict[str, float]:
    """Every figure; sequential reads alternate with the raw baseline in
    ``rounds`` short rounds (medians; the ratio is taken within each round,
    so load from elsewhere on the machine falls on both of its sides)."""
    sock = Path(tempfile.mkdtemp(prefix="xdev-bench-")) / "ahci.sock"
    proc = subprocess.Popen([sys.executable, "-m", "servers.ahci", "--socket", str(sock),
                             "--disk", f"file={image}", "--log-level", "warning"], cwd=REPO)
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError("xdev-ahci did not start")
            time.sleep(0.05)
        out: dict[str, float] = {}
        with MemfdRam(RAM) as ram, Client.connect(str(sock), guest=ram) as c, \
                RawReader(image) as raw:
            hba = Hba(c, ram)
            big = SEQ_BYTES // SECTOR
            pos = [0]

            def seq(write: bool) -> Callable[[int], None]:
                def one(tag: int) -> None:
                    hba.build(tag, pos[0], big, write)
                    pos[0] = (pos[0] + big) % (sectors - big)
                return one

            per = seconds / rounds
            dev, base, ratio = [], [], []
            for _ in range(rounds):
                base.append(raw.mb_per_s(per))
                n, t = run_queue(hba, SEQ_DEPTH, per, seq(False))
                dev.append(n * big * SECTOR / t / 1e6)
                ratio.append(dev[-1] / base[-1])
            out["seq_read_mb_per_s"] = statistics.median(dev)
            out["raw_seq_read_mb_per_s"] = statistics.median(base)
            out["ratio_seq_read_vs_raw"] = statistics.median(ratio)
            pos[0] = 0
            n, t = run_queue(hba, SEQ_DEPTH, seconds, seq(True))
            out["seq_write_mb_per_s"] = n * big * SECTOR / t / 1e6
            rng = random.Random(1)

            def rand(tag: int) -> None:
                hba.build(tag, rng.randrange(sectors // 8 - 1) * 8, 8, False)

            n, t = run_queue(hba, 1, seconds, rand)
            out["rand4k_read_iops_qd1"] = n / t
            n, t = run_queue(hba, 32, seconds, rand)
            out["rand4k_read_iops_qd32"] = n / t
            out["rounds"] = rounds
            os.close(hba.efd)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()


class RawReader:
    """The baseline: ``os.preadv`` of the file in the device run's pieces into
    guest buffers of their own (same sizes, same memfd layout: the same cache
    footprint), in this process."""

    def __init__(self, image: Path) -> None:
        self.fd = os.open(image, os.O_RDONLY)
        self.ram = MemfdRam(RAM)
        self.mv = memoryview(self.ram.map)
        self.views = [self.mv[DATA + i * SEQ_BYTES:DATA + (i + 1) * SEQ_BYTES]
                      for i in range(SEQ_DEPTH)]
        self.size = os.fstat(self.fd).st_size - SEQ_BYTES
        self.off = self.i = 0

    def mb_per_s(self, seconds: float) -> float:
        moved = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            moved += os.preadv(self.fd, [self.views[self.i % SEQ_DEPTH]], self.off)
            self.off = (self.off + SEQ_BYTES) % self.size
            self.i += 1
        return moved / (time.perf_counter() - start) / 1e6

    def __enter__(self) -> RawReader:
        return self

    def __exit__(self, *_: object) -> None:
        for v in self.views:
            v.release()
        self.mv.release()
        self.ram.close()
        os.close(self.fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    ap.add_argument("--size-mb", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating raw/device rounds for the sequential reads (default 8)")
    args = ap.parse_args(argv)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xdev"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        image = Path(tmp) / "bench.img"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mb):
                f.write(chunk)
        results = bench_device(image, args.size_mb << 11, args.seconds, args.rounds)
    results["ratio_qd32_vs_qd1"] = (results["rand4k_read_iops_qd32"]
                                    / results["rand4k_read_iops_qd1"])
    for key, value in results.items():
        print(f"{key:28s} {value:12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
