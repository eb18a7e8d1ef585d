"""e1000 TX and RX throughput through the protocol, against bare sockets.

    python bench/e1000.py [--json OUT] [--seconds S] [--rounds N] [--size BYTES]

The server (``xdev-e1000`` in its own process, ``dgram`` back end on
loopback) gets guest RAM as an fd-mapped DMA region; the bench plays the
driver over vfio-user like a guest would: it hands 64 transmit descriptors
per tail write, and finds received frames by the DD bits in memory,
returning buffers 16 at a time, as Linux's e1000 driver does.

Figures:
* ``tx_pps`` / ``tx_mbit_per_s``: frames the device put on the wire (counted
  at the UDP peer), ``--size``-byte frames;
* ``rx_pps`` / ``rx_mbit_per_s``: frames the device stored in the RX ring
  while a peer process sends as fast as it can;
* ``baseline_pps``: the same UDP sender and a lean receiver process without
  the device, measured in this run;
* ``ratio_tx_vs_baseline`` / ``ratio_rx_vs_baseline``: target >= 0.5.

With two or more CPUs the figures come first with the sender (the blaster,
or this process driving TX) on one CPU and the receiver (the server, or the
baseline's receiver) on another, so they measure CPU cost; the same figures
with the scheduler's placement follow as ``*_unpinned`` (this machine's
cross-CPU wake-ups and other load make them noisy).

Baseline, TX and RX alternate in ``--rounds`` short rounds against one
server; the rates are medians and each ratio is the median of the ratios
taken within a round, so load from elsewhere on the machine falls on both
sides of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import pin  # noqa: E402

from servers.e1000 import regs as R  # noqa: E402
from xdevproto.client import Client  # noqa: E402
from xdevproto.guestmem import MemfdRam  # noqa: E402
from xdevproto.wire import PciRegion  # noqa: E402

MAC = bytes.fromhex("525400123456")
RING = 256
RX_RING_SIZE = 1024  # descriptors; Linux allows up to 4096
BATCH = 64
RX_REFILL = 16  # Linux's E1000_RX_BUFFER_WRITE
IDLE_WAIT = 0.0002  # an interrupt throttled to ~4000/s, as Linux's default ITR allows
RAM = 8 << 20
ALL_CPUS = os.sched_getaffinity(0)
MPC = 0x4010  # missed packets: frames that found the ring full (clear on read)
TX_RING, RX_RING, TX_BUF, RX_BUF = 0x1000, 0x4000, 0x100000, 0x200000


def frame(size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (without checksums: the
    device verifies nothing it was not asked to, and this costs the same)."""
    udp_len = size - 14 - 20
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack(">HHHH", 5000, 6000, udp_len, 0)
    return MAC + bytes.fromhex("525400abcdef") + b"\x08\x00" + ip + udp + bytes(udp_len - 8)


STOP = b"xdev-bench-stop"
MARK = b"xdev-bench-mark"


def _count(conn: Any, cpu: int | None) -> None:
    """As lean a receiver as Python allows: blocking recv into one buffer."""
    pin(cpu)
    sock = udp_sock()
    conn.send(sock.getsockname()[1])
    buf = bytearray(65536)
    n, peer = 0, None
    while True:
        size, addr = sock.recvfrom_into(buf)
        if size == len(STOP) and buf[:size] in (STOP, MARK):
            if buf[:size] == STOP:
                break
            conn.send((n, peer))
            continue
        n += 1
        peer = addr
    conn.send((n, peer))


class Counter:
    """Counts datagrams arriving at a UDP port, in a process of its own."""

    def __init__(self, cpu: int | None) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_count, args=(child, cpu))
        self.proc.start()
        self.port: int = self.conn.recv()

    def mark(self) -> tuple[int, tuple[str, int] | None]:
        """The datagrams counted so far and the last sender's address."""
        return self._ask(MARK)

    def finish(self) -> tuple[int, tuple[str, int] | None]:
        """Stop; the datagrams counted and the last sender's address."""
        result = self._ask(STOP)
        self.proc.join()
        return result

    def _ask(self, what: bytes) -> tuple[int, tuple[str, int] | None]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(what, ("127.0.0.1", self.port))
        result: tuple[int, tuple[str, int] | None] = self.conn.recv()
        return result




def _blast(port: int, size: int, seconds: float, cpu: int | None = None) -> None:
    pin(cpu)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = frame(size)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(64):
            try:
                s.sendto(data, ("127.0.0.1", port))
            except OSError:
                pass


def udp_sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    return s


def baseline(size: int, seconds: float, cpus: tuple[int, int] | None) -> float:
    """The sender alone on one CPU, a receiving process on the other."""
    counter = Counter(cpus[1] if cpus else None)
    p = mp.Process(target=_blast, args=(counter.port, size, seconds,
                                        cpus[0] if cpus else None))
    p.start()
    p.join()
    time.sleep(0.2)
    return counter.finish()[0] / seconds


def rd(c: Client, off: int) -> int:
    return int.from_bytes(c.region_read(PciRegion.BAR0, off, 4), "little")


def wr(c: Client, off: int, value: int) -> None:
    c.region_write(PciRegion.BAR0, off, value.to_bytes(4, "little"))


def measure_tx(c: Client, ram: MemfdRam, size: int, seconds: float) -> float:
    """Frames/s put on the wire; the caller counts them at the peer."""
    data = frame(size)
    for i in range(RING):
        ram.write(TX_BUF + i * 2048, data)
        ram.write(TX_RING + 16 * i, struct.pack("<QHBBBBH", TX_BUF + i * 2048, size, 0, 0x0B,
                                                0, 0, 0))
    wr(c, R.TDBAL, TX_RING)
    wr(c, R.TDLEN, RING * 16)
    wr(c, R.TDH, 0)
    wr(c, R.TDT, 0)
    wr(c, R.TCTL, R.TCTL_EN)
    tail = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        tail = (tail + BATCH) % RING
        wr(c, R.TDT, tail)  # the device sends the batch before answering
    return time.monotonic() - start


def measure_rx(c: Client, ram: MemfdRam, port: int, size: int, seconds: float,
               blast_cpu: int | None) -> float:
    """Frames/s stored in the RX ring. The bench drives it like Linux's
    e1000 driver does: it finds received frames by the DD bit in the
    descriptors in memory (never reading RDH), clears the status, and
    hands buffers back with one RDT write per RX_REFILL of them; when it
    finds nothing it waits about as long as interrupt throttling would."""
    for i in range(RX_RING_SIZE):
        ram.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + i * 2048, 0))
    wr(c, R.RDBAL, RX_RING)
    wr(c, R.RDLEN, RX_RING_SIZE * 16)
    wr(c, R.RDH, 0)
    wr(c, R.RDT, RX_RING_SIZE - 1)
    wr(c, R.RCTL, R.RCTL_EN | (1 << 3))  # promiscuous: count everything
    p = mp.Process(target=_blast, args=(port, size, seconds + 0.5, blast_cpu))
    p.start()
    time.sleep(0.3)
    view = ram.view
    status = RX_RING + 12  # the status byte of descriptor 0
    # Forget what arrived before the start: hand every buffer back.
    head = 0
    while view[status + 16 * head] & 1:
        view[status + 16 * head] = 0
        head = (head + 1) % RX_RING_SIZE
    wr(c, R.RDT, (head - 1) % RX_RING_SIZE)
    received = returned = 0
    rd(c, MPC)  # clear on read: count only the frames missed from here on
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        got = 0
        while got < RX_RING_SIZE and view[status + 16 * head] & 1:  # DD
            view[status + 16 * head] = 0
            head = (head + 1) % RX_RING_SIZE
            got += 1
        received += got
        returned += got
        if returned >= RX_REFILL:
            wr(c, R.RDT, (head - 1) % RX_RING_SIZE)  # hand the used buffers back
            returned = 0
        if not got:
            time.sleep(IDLE_WAIT)
    elapsed = time.monotonic() - start
    missed = rd(c, MPC)
    p.join()
    wr(c, R.RCTL, 0)  # the next round sets the ring up afresh
    if missed:
        print(f"rx: {missed} frames found the ring full while measured", file=sys.stderr)
    return received / elapsed


def run(size: int, seconds: float, rounds: int,
        cpus: tuple[int, int] | None) -> dict[str, float]:
    """Baseline, TX and RX in ``rounds`` rounds of ``seconds / rounds``
    each with the given placement; medians of the rates, and of the
    ratios taken within each round, so that load from elsewhere on the
    machine falls on both sides of a ratio."""
    per = seconds / rounds
    pin(cpus[0] if cpus else None)
    counter = Counter(cpus[0] if cpus else None)
    tmp = tempfile.mkdtemp(prefix="xdev-bench-")
    path = os.path.join(tmp, "e1000.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.e1000.cli", "--socket", path, "--log-level", "warning",
         "--netdev", f"dgram,local=127.0.0.1:0,remote=127.0.0.1:{counter.port}"],
        cwd=ROOT, preexec_fn=(lambda: pin(cpus[1])) if cpus else None)
    base: list[float] = []
    tx: list[float] = []
    rx: list[float] = []
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("xdev-e1000 did not start")
            time.sleep(0.05)
        with MemfdRam(RAM) as ram, Client.connect(path, guest=ram) as c:
            c.dma_map(0, RAM, fd=ram.fd)
            for _ in range(rounds):
                base.append(baseline(size, per, cpus))
                pin(cpus[0] if cpus else None)
                before = counter.mark()[0]
                elapsed = measure_tx(c, ram, size, per)
                time.sleep(0.2)
                sent, device = counter.mark()
                if device is None:
                    raise SystemExit("no frame reached the wire")
                tx.append((sent - before) / elapsed)
                rx.append(measure_rx(c, ram, device[1], size, per, cpus[0] if cpus else None))
    finally:
        proc.terminate()
        proc.wait(10)
        if counter.proc.is_alive():
            counter.finish()
        os.sched_setaffinity(0, ALL_CPUS)
    med = statistics.median
    return {"baseline": med(base), "tx": med(tx), "rx": med(rx),
            "ratio_tx": med(t / b for t, b in zip(tx, base, strict=True)) if all(base) else 0.0,
            "ratio_rx": med(r / b for r, b in zip(rx, base, strict=True)) if all(base) else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="per direction and placement, split into the rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=1500)
    args = ap.parse_args(argv)
    bits = args.size * 8 / 1e6
    results: dict[str, object] = {"frame_bytes": args.size}
    cpus = sorted(ALL_CPUS)
    placements: list[tuple[str, tuple[int, int] | None]] = [("", None)]
    if len(cpus) >= 2:
        placements = [("", (cpus[0], cpus[1])), ("_unpinned", None)]
    for suffix, placement in placements:
        f = run(args.size, args.seconds, args.rounds, placement)
        results.update({
            f"tx_pps{suffix}": round(f["tx"]),
            f"rx_pps{suffix}": round(f["rx"]),
            f"tx_mbit_per_s{suffix}": round(f["tx"] * bits, 1),
            f"rx_mbit_per_s{suffix}": round(f["rx"] * bits, 1),
            f"baseline_pps{suffix}": round(f["baseline"]),
            f"ratio_tx_vs_baseline{suffix}": round(f["ratio_tx"], 3),
            f"ratio_rx_vs_baseline{suffix}": round(f["ratio_rx"], 3),
        })
    results["rounds"] = args.rounds
    for key, value in results.items():
        print(f"{key:34} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
