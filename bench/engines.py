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

As in bench/protocol.py, client and servers are pinned to one CPU, so the
figures measure CPU cost rather than this machine's cross-CPU wake-up
latency (the same figures unpinned are reported as ``*_unpinned``), and
every server of both engines stays up for the whole run while short rounds
of each measurement alternate between the engines: every figure is the
median over the rounds and each ratio is taken within a round, so load
from elsewhere on the machine falls on both sides of it.
Without libvfio-user only the native figures are written, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ahci import RAM, Hba, run_queue  # noqa: E402  (bench/ahci.py's driver)
from timing import pin, timed  # noqa: E402

from xdevproto.client import Client  # noqa: E402
from xdevproto.guestmem import MemfdRam  # noqa: E402
from xdevproto.lvu.loader import unavailable_reason  # noqa: E402
from xdevproto.wire import PciRegion  # noqa: E402

ENGINES = {"native": "native", "lvu": "libvfio-user"}
E1000_STATUS = 0x08




@contextmanager
def served(argv: list[str], engine: str, cpu: int | None) -> Iterator[str]:
    """Start ``python -m ARGV --engine ENGINE`` (pinned to ``cpu``); yield its socket."""
    tmp = Path(tempfile.mkdtemp(prefix="xdev-bench-"))
    sock = tmp / "dev.sock"
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--socket", str(sock),
                             "--engine", engine, "--log-level", "warning"], cwd=REPO,
                            preexec_fn=lambda: pin(cpu))
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




class _Rig:
    """Every server of one engine up at once, with a client connected to each."""

    def __init__(self, stack: ExitStack, engine: str, cpu: int | None, image: Path) -> None:
        sock = stack.enter_context(served(["xdevproto.testdev"], engine, cpu))
        self.testdev = stack.enter_context(Client.connect(sock))
        sock = stack.enter_context(served(["servers.e1000.cli"], engine, cpu))
        self.e1000 = stack.enter_context(Client.connect(sock))
        sock = stack.enter_context(served(["servers.ahci", "--disk", f"file={image}"],
                                          engine, cpu))
        ram = stack.enter_context(MemfdRam(RAM))
        self.hba = Hba(stack.enter_context(Client.connect(sock, guest=ram)), ram)
        stack.callback(os.close, self.hba.efd)
        self.sectors = image.stat().st_size // 512
        self.rng = random.Random(1)

    def figures(self, seconds: float) -> dict[str, float]:
        out = {
            "region_read_rtt_per_s": timed(
                lambda: self.testdev.region_read(PciRegion.BAR0, 4, 4), seconds),
            "e1000_status_read_rtt_per_s": timed(
                lambda: self.e1000.region_read(PciRegion.BAR0, E1000_STATUS, 4), seconds),
        }

        def rand(tag: int) -> None:
            self.hba.build(tag, self.rng.randrange(self.sectors // 8 - 1) * 8, 8, False)

        for depth in (1, 32):
            n, t = run_queue(self.hba, depth, seconds, rand)
            out[f"ahci_rand4k_read_iops_qd{depth}"] = n / t
        return out


def measure(engines: list[str], cpu: int | None, images: dict[str, Path],
            seconds: float, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` alternating rounds; ratios taken within each round."""
    pin(cpu)
    samples: dict[str, list[float]] = {}
    with ExitStack() as stack:
        rigs = {short: _Rig(stack, ENGINES[short], cpu, images[short]) for short in engines}
        for _ in range(rounds):
            got = {short: rig.figures(seconds / rounds) for short, rig in rigs.items()}
            for short, figures in got.items():
                for key, value in figures.items():
                    samples.setdefault(f"{key}_{short}", []).append(value)
            if "lvu" in got:
                for key, value in got["lvu"].items():
                    samples.setdefault(f"ratio_{key}_lvu_vs_native", []).append(
                        value / got["native"][key])
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating rounds; figures are medians over them")
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
        images = {short: Path(tmp) / f"bench-{short}.img" for short in engines}
        chunk = os.urandom(1 << 20)
        for image in images.values():  # one image per server: no sharing of a file
            with open(image, "wb") as f:
                for _ in range(args.size_mb):
                    f.write(chunk)
        results: dict[str, float | str] = dict(
            measure(engines, cpu, images, args.seconds, args.rounds))
        unpinned = measure(engines, None, images, args.seconds, args.rounds)
    results.update({f"{key}_unpinned": value for key, value in unpinned.items()})
    results["pinned_cpu"] = cpu
    results["rounds"] = args.rounds
    if reason:
        results["lvu_unavailable"] = reason
    for key, value in results.items():
        print(f"{key:52s} {value:14.2f}" if isinstance(value, float) else f"{key:52s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
