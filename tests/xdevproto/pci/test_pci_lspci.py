"""The sample device's config space, dumped in ``lspci -xxxx`` format, is
decoded by the real ``lspci -vvv -F FILE`` (pciutils) as we expect."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from pci_sample_device import SampleDevice

from xdevproto.wire import PciRegion

LSPCI = shutil.which("lspci")
pytestmark = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")


def dump(config: bytes, slot: str = "00:05.0") -> str:
    """The hex dump format ``lspci -F`` reads (the output of ``lspci -xxxx``)."""
    lines = [f"{slot} Device: dumped by xdev"]
    for off in range(0, len(config), 16):
        lines.append(f"{off:02x}: " + " ".join(f"{b:02x}" for b in config[off:off + 16]))
    return "\n".join(lines) + "\n\n"


def lspci(tmp_path: Path, config: bytes) -> str:
    path = tmp_path / "config.dump"
    path.write_text(dump(config))
    assert LSPCI is not None
    out = subprocess.run([LSPCI, "-vvv", "-nn", "-F", str(path)], capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout


def programmed() -> SampleDevice:
    """What firmware would have done: BARs assigned, decoding and MSI-X enabled."""
    dev = SampleDevice()
    cfg = PciRegion.CONFIG
    dev.region_write(cfg, 0x10, struct.pack("<I", 0xFEB00000))
    dev.region_write(cfg, 0x14, struct.pack("<I", 0xC040))
    dev.region_write(cfg, 0x18, struct.pack("<II", 0xFE000000, 0x1))
    dev.region_write(cfg, 0x30, struct.pack("<I", 0xFEB80000))
    dev.region_write(cfg, 0x04, struct.pack("<H", 0x0407))
    dev.region_write(cfg, 0x3C, b"\x0b")
    msix = dev.msix
    assert msix is not None
    dev.region_write(cfg, msix.offset + 2, struct.pack("<H", 0x8000))
    return dev


def test_lspci_decodes_ids_bars_and_capabilities(tmp_path: Path) -> None:
    dev = programmed()
    text = lspci(tmp_path, dev.region_read(PciRegion.CONFIG, 0, 4096))
    assert text.startswith("00:05.0 Mass storage controller [0180]")
    assert "[1b36:0011] (rev 02)" in text
    assert "Subsystem: Red Hat, Inc. Device [1af4:1100]" in text
    assert "Control: I/O+ Mem+ BusMaster+" in text
    assert "DisINTx+" in text
    assert "Status: Cap+" in text
    assert "Region 0: Memory at feb00000 (32-bit, non-prefetchable)" in text
    assert "Region 1: I/O ports at c040" in text
    assert "Region 2: Memory at 1fe000000 (64-bit, prefetchable)" in text
    assert "Expansion ROM at feb80000 [disabled]" in text
    assert "Capabilities: [40] Power Management version 3" in text
    assert "Capabilities: [48] MSI: Enable- Count=1/4 Maskable+ 64bit+" in text
    assert "Capabilities: [60] MSI-X: Enable+ Count=8 Masked-" in text
    assert "Vector table: BAR=2 offset=00000000" in text
    assert "PBA: BAR=2 offset=00002000" in text
    assert "Express (v2) Endpoint" in text
    assert "FLReset+" in text
    assert "LnkSta:\tSpeed 2.5GT/s, Width x1" in text


def test_lspci_after_bar_sizing_shows_size_masks(tmp_path: Path) -> None:
    """The sizing read-back is itself a valid header lspci decodes."""
    dev = SampleDevice()
    for off in range(0x10, 0x28, 4):
        dev.region_write(PciRegion.CONFIG, off, b"\xff\xff\xff\xff")
    text = lspci(tmp_path, dev.region_read(PciRegion.CONFIG, 0, 256))
    assert "Region 0: Memory at fffff000 (32-bit, non-prefetchable)" in text
    assert "Region 2: Memory at ffffffffffffc000 (64-bit, prefetchable)" in text
