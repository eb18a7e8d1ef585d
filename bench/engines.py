"""The native engine against the libvfio-user engine, measured in one run.

    python bench/engines.py [--json OUT] [--seconds S] [--size-mb N]

Each server is a separate process started from its command line with
``--engine native`` or ``--engine libvfio-user``; this process is the client
(xdev's own :class:`~xdevproto.client.Client`, the same for both). Figures,
per engine (``*_native``, ``*_lvu``) and as ``ratio_*_lvu_vs_native``:

* ``region_read_rtt_per_s``: 4-byte REGION_READs of the test device's
  SCRATCH register (``python -m xdevproto.testdev``), one at a time;
* ``e1000_status_read_rtt_per_s``: 4-byte reads of xdev-e1000's STATUS
  register (a register with a read hook, through the PCI framework);
* ``ahci_rand4k_read_iops_qd1`` / ``_qd32``: xdev-ahci, 4 KiB READ FPDMA
  QUEUED at random aligned offsets of a raw image (page cache warm), 1 or
  32 outstanding, guest RAM mapped with an fd, MSI completions (the driver
  of bench/ahci.py).

As in bench/protocol.py, client and server are pinned to one CPU, so the
figures measure CPU cost rather than this machine's cross-CPU wake-up
latency; the same figures unpinned are reported as ``*_unpinned``.
Without libvfio-user only the native figures are written, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ahci import RAM, Hba, run_queue  # noqa: E402  (bench/ahci.py's driver)

from xdevproto.client import Client  # noqa: E402
from xdevproto.guestmem import MemfdRam  # noqa: E402
from xdevproto.lvu.loader import unavailable_reason  # noqa: E402
from xdevproto.wire import PciRegion  # noqa: E402

ENGINES = {"native": "native", "lvu": "libvfio-user"}
E1000_STATUS = 0x08


def _pin(cpu: int | None) -> None:
    os.sched_setaffinity(0, {cpu} if cpu is not None else set(range(os.cpu_count() or 1)))


@contextmanager
def served(argv: list[str], engine: str, cpu: int | None) -> Iterator[str]:
    """Start ``python -m ARGV --engine ENGINE`` (pinned to ``cpu``); yield its socket."""
    tmp = Path(tempfile.mkdtemp(prefix="xdev-bench-"))
    sock = tmp / "dev.sock"
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--socket", str(sock),
                             "--engine", engine, "--log-level", "warning"], cwd=REPO,
                            preexec_fn=lambda: _pin(cpu))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} --engine {engine} did not start")
            time.sleep(0.05)
        time.sleep(0.2)  # the native runtime binds before it listens
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)
        tmp.rmdir()


def _timed(fn: Callable[[], object], seconds: float) -> float:
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


def region_reads(engine: str, cpu: int | None, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    with served(["xdevproto.testdev"], engine, cpu) as sock, Client.connect(sock) as c:
        out["region_read_rtt_per_s"] = _timed(
            lambda: c.region_read(PciRegion.BAR0, 4, 4), seconds)
    with served(["servers.e1000.cli"], engine, cpu) as sock, Client.connect(sock) as c:
        out["e1000_status_read_rtt_per_s"] = _timed(
            lambda: c.region_read(PciRegion.BAR0, E1000_STATUS, 4), seconds)
    return out


def ahci_iops(engine: str, cpu: int | None, image: Path, seconds: float) -> dict[str, float]:
    sectors = image.stat().st_size // 512
    out: dict[str, float] = {}
    with served(["servers.ahci", "--disk", f"file={image}"], engine, cpu) as sock, \
            MemfdRam(RAM) as ram, Client.connect(sock, guest=ram) as c:
        hba = Hba(c, ram)
        rng = random.Random(1)

        def rand(tag: int) -> None:
            hba.build(tag, rng.randrange(sectors // 8 - 1) * 8, 8, False)

        for depth in (1, 32):
            n, t = run_queue(hba, depth, seconds, rand)
            out[f"ahci_rand4k_read_iops_qd{depth}"] = n / t
        os.close(hba.efd)
    return out


def measure(engines: list[str], cpu: int | None, image: Path,
            seconds: float) -> dict[str, float]:
    _pin(cpu)
    results: dict[str, float] = {}
    for short in engines:
        figures = {**region_reads(ENGINES[short], cpu, seconds),
                   **ahci_iops(ENGINES[short], cpu, image, seconds)}
        results.update({f"{key}_{short}": value for key, value in figures.items()})
    if "lvu" in engines:
        for key in [k.removesuffix("_native") for k in results if k.endswith("_native")]:
            results[f"ratio_{key}_lvu_vs_native"] = (results[f"{key}_lvu"]
                                                     / results[f"{key}_native"])
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    ap.add_argument("--size-mb", type=int, default=64, help="AHCI image size (default 64)")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    engines = ["native"] if reason else ["native", "lvu"]
    if reason:
        print(f"libvfio-user unavailable, native engine only: {reason}", file=sys.stderr)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xdev"
    cache.mkdir(parents=True, exist_ok=True)
    cpu = sorted(os.sched_getaffinity(0))[0]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        image = Path(tmp) / "bench.img"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mb):
                f.write(chunk)
        results: dict[str, float | str] = dict(measure(engines, cpu, image, args.seconds))
        unpinned = measure(engines, None, image, args.seconds)
    results.update({f"{key}_unpinned": value for key, value in unpinned.items()})
    results["pinned_cpu"] = cpu
    if reason:
        results["lvu_unavailable"] = reason
    for key, value in results.items():
        print(f"{key:52s} {value:14.2f}" if isinstance(value, float) else f"{key:52s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
