"""Cost of a register access on the PCI framework's hot path.

    python bench/pci_regs.py [--json OUT] [--n N]

Figures (microseconds per access, through ``PciDevice.region_read`` /
``region_write`` as the server runtime calls them):

* ``dword_read_us`` / ``dword_write_us``: a declared 32-bit RW register;
* ``hooked_write_us``: a register whose write calls a side-effect hook;
* ``unaligned_read_us``: a 4-byte read straddling two registers;
* ``config_read_us``: a config-space dword;
* ``baseline_us``: a locked bytearray slice + ``int.to_bytes`` of the same
  size, measured in this run (the least any Python register model pays);
* ``ratio_dword_read_vs_baseline``.

Target: a dword read of a declared register in a few microseconds at most.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xdevproto.pci import Bar, Identity, PciDevice, Reg, RegisterLayout  # noqa: E402

LAYOUT = RegisterLayout("bench", 0x1000, [
    Reg(0x0, "CTRL", mask=0xFFFF),
    Reg(0x4, "STATUS"),
    Reg(0x8, "DOORBELL", on_write="ring"),
    *[Reg(0x100 + 4 * i, f"R{i}") for i in range(64)],
])


class BenchDevice(PciDevice):
    identity = Identity(0x1B36, 0x00FF, 0xFF0000)
    bars = (Bar(0, 0x1000, regs=LAYOUT),)

    def ring(self, index: int, value: int, old: int) -> None:
        self.rings = value


def measure(n: int) -> dict[str, float]:
    dev = BenchDevice()
    data = b"\x01\x00\x00\x00"
    lock = threading.RLock()
    buf = bytearray(0x1000)

    def baseline() -> bytes:
        with lock:
            return int.from_bytes(buf[4:8], "little").to_bytes(4, "little")

    def us(fn: object) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6  # type: ignore[arg-type]

    out = {
        "dword_read_us": us(lambda: dev.region_read(0, 0x4, 4)),
        "dword_write_us": us(lambda: dev.region_write(0, 0x4, data)),
        "hooked_write_us": us(lambda: dev.region_write(0, 0x8, data)),
        "unaligned_read_us": us(lambda: dev.region_read(0, 0x102, 4)),
        "config_read_us": us(lambda: dev.region_read(7, 0, 4)),
        "baseline_us": us(baseline),
    }
    out["ratio_dword_read_vs_baseline"] = out["dword_read_us"] / out["baseline_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args(argv)
    figures = measure(args.n)
    for key, value in figures.items():
        print(f"{key:32} {value:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
