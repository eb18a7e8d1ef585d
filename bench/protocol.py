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
reported as ``*_unpinned``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.server import Server
from xdevproto.testdev import BUF_OFF, TestDevice
from xdevproto.transport import listen
from xdevproto.wire import PciRegion

REQ = 32  # header + REGION_READ request
REP = 36  # header + REGION_READ reply header + 4 bytes


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _raw_server(path: str, cpu: int | None, ready: mp.Event) -> None:  # type: ignore[valid-type]
    _pin(cpu)
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
    _pin(cpu)
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


def _timed(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Calls per second of fn() over about ``seconds``."""
    n, batch = 0, 200
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def baseline(seconds: float, cpu: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "raw.sock")
        proc = _spawn(_raw_server, path, cpu)
        _pin(cpu)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        req = bytes(REQ)

        def once() -> None:
            sock.send(req)
            got = 0
            while got < REP:
                got += len(sock.recv(65536))

        rate = _timed(once, seconds)
        sock.close()
        proc.join(5)
        return rate


def xdev(seconds: float, cpu: int | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dev.sock")
        proc = _spawn(_xdev_server, path, cpu)
        _pin(cpu)
        out: dict[str, float] = {}
        with MemfdRam(1 << 20) as ram, Client.connect(path, guest=ram) as c:
            out["region_read_rtt_per_s"] = _timed(
                lambda: c.region_read(PciRegion.BAR0, 4, 4), seconds)
            value = b"\1\2\3\4"
            out["region_write_rtt_per_s"] = _timed(
                lambda: c.region_write(PciRegion.BAR0, 4, value), seconds)
            # Message DMA: the device copies 3840 bytes (its buffer) per
            # command; count the bytes that crossed as DMA_READ replies.
            c.dma_map(0, 1 << 20)
            length = 0x1000 - BUF_OFF
            c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0, length))
            cmd = struct.pack("<I", 1)
            rate = _timed(lambda: c.region_write(PciRegion.BAR0, 0x14, cmd), seconds)
            out["dma_read_mb_per_s"] = rate * length / 1e6
        proc.join(5)
        return out


def run(seconds: float) -> dict[str, float]:
    cpu = sorted(os.sched_getaffinity(0))[0]
    results: dict[str, float] = {}
    results["baseline_rtt_per_s"] = baseline(seconds, cpu)
    results.update(xdev(seconds, cpu))
    results["ratio_read_vs_baseline"] = (results["region_read_rtt_per_s"]
                                         / results["baseline_rtt_per_s"])
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    unpinned = {"baseline_rtt_per_s": baseline(seconds, None), **xdev(seconds, None)}
    for key, value in unpinned.items():
        results[f"{key}_unpinned"] = value
    results["ratio_read_vs_baseline_unpinned"] = (unpinned["region_read_rtt_per_s"]
                                                  / unpinned["baseline_rtt_per_s"])
    results["pinned_cpu"] = cpu
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = ap.parse_args(argv)
    results = run(args.seconds)
    for key, value in results.items():
        print(f"{key:40s} {value:14.2f}")
    target = results["ratio_read_vs_baseline"] >= 0.7
    print(f"target ratio_read_vs_baseline >= 0.7: {'met' if target else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
