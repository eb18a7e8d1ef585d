"""bench/xen.py's reading of the guest's XB-RESULT lines (no Xen needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "xen.py"
spec = importlib.util.spec_from_file_location("bench_xen", BENCH)
assert spec is not None and spec.loader is not None
xen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(xen)

SERIAL = """XB-UP
XB-RESULT xdev-seqread ops=85 bytes=89128960 secs=5.0 per_s=17.0 value=0x0
XB-RESULT qemu-seqread ops=4 bytes=4194304 secs=8.0 per_s=0.5 value=0x0\r
XB-RESULT qemu-seqread ops=75 bytes=78643200 secs=5.0 per_s=15.0 value=0x0
XB-RESULT xdev-seqread ops=115 bytes=117440512 secs=5.0 per_s=23.0 value=0x0
XB-RESULT xdev-mmio ops=1250 bytes=5000 secs=5.0 per_s=250.0 value=0xc1241f00
XB-DONE
"""


def test_figures_are_totals_over_rounds_and_rounds_are_kept() -> None:
    raw = xen.parse_results(SERIAL)
    assert raw["qemu-seqread"] == [(4.0, 8.0), (75.0, 5.0)]
    fig = xen.figures(raw)
    mib = (1 << 20) / 1e6
    assert fig["xdev_seq_read_mb_per_s"] == round(200 / 10 * mib, 2)
    assert fig["qemu_seq_read_mb_per_s"] == round(79 / 13 * mib, 2)
    assert fig["ratio_seq_read"] == round(fig["xdev_seq_read_mb_per_s"]
                                          / fig["qemu_seq_read_mb_per_s"], 3)
    assert fig["xdev_mmio_rtt_per_s"] == 250.0 and fig["ratio_mmio"] is None  # no QEMU figure
    rounds = xen.per_round(raw)
    assert rounds["qemu_seq_read_mb_per_s"] == [round(0.5 * mib, 2), round(15 * mib, 2)]
    assert rounds["xdev_seq_write_mb_per_s"] == []
