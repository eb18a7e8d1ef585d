"""Protocol-stack cost against bare sockets, measured in one run.

    python bench/protocol.py [--json OUT] [--seconds S]

Figures (round trips/s, MB/s):
* ``baseline_rtt_per_s``: a raw Python AF_UNIX ping-pong, client and server
  in two processes, with the sizes of a 4-byte REGION_READ (32-byte request,
  36-byte reply);
* ``region_read_rtt_per_s`` / ``region_write_rtt_per_s``: our client and our
  server runtime serving the test device, 4-byte accesses;
* ``dma_read_mb_per_s``: the device pulling 4 KiB at a time from guest
  memory over DMA_READ messages (no fd mapping);
* ``ratio_read_vs_baseline``: target >= 0.7.

Both processes are pinned to one CPU (so the figures measure CPU cost, not
this machine's cross-CPU wake-up latency); the same figures unpinned are
reported as ``*_unpinned``. Both servers stay up for the whole run and short
rounds of each measurement alternate; every figure is the median over the
rounds and each ratio is taken within a round, so load from elsewhere on the
machine falls on both sides of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import pin, timed

from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.server import Server
from xdevproto.testdev import BUF_OFF, TestDevice
from xdevproto.transport import listen
from xdevproto.wire import PciRegion

REQ = 32  # header + REGION_READ request
REP = 36  # header + REGION_READ reply header + 4 bytes




def _raw_server(path: str, cpu: int | None, ready: mp.Event) -> None:  # type: ignore[valid-type]
    pin(cpu)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    ready.set()  # type: ignore[attr-defined]
    conn, _ = lsock.accept()
    reply = bytes(REP)
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.send(reply)


def _xdev_server(path: str, cpu: int | None, ready: mp.Event) -> None:  # type: ignore[valid-type]
    pin(cpu)
    listener = listen(path)
    ready.set()  # type: ignore[attr-defined]
    Server(TestDevice()).serve(listener, max_sessions=1)


def _spawn(target, path: str, cpu: int | None) -> mp.Process:  # type: ignore[no-untyped-def]
    ready = mp.Event()
    proc = mp.Process(target=target, args=(path, cpu, ready), daemon=True)
    proc.start()
    if not ready.wait(10):
        raise RuntimeError("server did not start")
    return proc




class Rig:
    """Both servers up at once, with a connection to each, so that rounds of
    baseline and xdev measurements can alternate: whatever load the machine
    has falls on both sides of every ratio."""

    def __init__(self, tmp: str, cpu: int | None) -> None:
        self.raw_proc = _spawn(_raw_server, os.path.join(tmp, "raw.sock"), cpu)
        self.xdev_proc = _spawn(_xdev_server, os.path.join(tmp, "dev.sock"), cpu)
        pin(cpu)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.path.join(tmp, "raw.sock"))
        self.ram = MemfdRam(1 << 20)
        self.client = Client.connect(os.path.join(tmp, "dev.sock"), guest=self.ram)
        self.client.dma_map(0, 1 << 20)
        self.dma_len = 0x1000 - BUF_OFF
        self.client.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0, self.dma_len))

    def raw_once(self) -> None:
        self.sock.send(RAW_REQ)
        got = 0
        while got < REP:
            got += len(self.sock.recv(65536))

    def read_once(self) -> None:
        self.client.region_read(PciRegion.BAR0, 4, 4)

    def write_once(self) -> None:
        self.client.region_write(PciRegion.BAR0, 4, b"\1\2\3\4")

    def dma_once(self) -> None:
        # The device pulls its whole buffer from guest memory by DMA_READ.
        self.client.region_write(PciRegion.BAR0, 0x14, DMA_CMD)

    def close(self) -> None:
        self.client.close()
        self.ram.close()
        self.sock.close()
        self.raw_proc.join(5)
        self.xdev_proc.join(5)


RAW_REQ = bytes(REQ)
DMA_CMD = struct.pack("<I", 1)


def measure(cpu: int | None, seconds: float, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` alternating rounds; ratios per round."""
    per = seconds / rounds
    samples: dict[str, list[float]] = {k: [] for k in (
        "baseline_rtt_per_s", "region_read_rtt_per_s", "region_write_rtt_per_s",
        "dma_read_mb_per_s", "ratio_read_vs_baseline")}
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(tmp, cpu)
        try:
            for _ in range(rounds):
                base = timed(rig.raw_once, per)
                read = timed(rig.read_once, per)
                samples["baseline_rtt_per_s"].append(base)
                samples["region_read_rtt_per_s"].append(read)
                samples["ratio_read_vs_baseline"].append(read / base)
                samples["region_write_rtt_per_s"].append(timed(rig.write_once, per))
                samples["dma_read_mb_per_s"].append(
                    timed(rig.dma_once, per) * rig.dma_len / 1e6)
        finally:
            rig.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def run(seconds: float, rounds: int) -> dict[str, float]:
    cpu = sorted(os.sched_getaffinity(0))[0]
    results = measure(cpu, seconds, rounds)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    for key, value in measure(None, seconds, rounds).items():
        results[f"{key}_unpinned"] = value
    results["pinned_cpu"] = cpu
    results["rounds"] = rounds
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="per figure, split over the rounds")
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating rounds; figures are medians over them")
    args = ap.parse_args(argv)
    results = run(args.seconds, args.rounds)
    for key, value in results.items():
        print(f"{key:40s} {value:14.2f}")
    target = results["ratio_read_vs_baseline"] >= 0.7
    print(f"target ratio_read_vs_baseline >= 0.7: {'met' if target else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
