"""The bridge core serving libvfio-user's gpio-pci-idio-16 sample (no Xen:
a fake front end), as the Xen tier does in a guest. Skipped where the
sample is absent."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from bridge.core import GUEST_DMA_RANGES, Bridge, BridgeDevice, parse_bdf
from tests.bridge.test_core import FakeFrontend
from tests.xdevproto.test_client_lvu_samples import SAMPLES

pytestmark = pytest.mark.lvu
SBDF = parse_bdf("00:05.0")


def test_bridge_serves_the_gpio_sample(tmp_path: Path) -> None:
    if SAMPLES is None:
        pytest.skip("libvfio-user samples not found")
    sock = tmp_path / "gpio.sock"
    proc = subprocess.Popen([str(SAMPLES / "gpio-pci-idio-16"), str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    front = FakeFrontend()
    bridge = Bridge(front)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        dev = BridgeDevice(SBDF, str(sock), front, None)
        bridge.add(dev)
        bridge.start()
        # The whole guest-physical space is offered in pieces libvfio-user accepts.
        assert dev.alive and len(GUEST_DMA_RANGES) == 32
        assert bridge.config_read(SBDF, 0, 4) == 0x0DC8_494F
        bridge.config_write(SBDF, 0x18, 4, 0xFFFFFFFF)
        assert bridge.config_read(SBDF, 0x18, 4) == 0xFFFFFF01  # 256 I/O ports
        bridge.config_write(SBDF, 0x18, 4, 0xC000)
        bridge.config_write(SBDF, 0x04, 2, 0x0001)  # I/O decoding
        assert front.claims == {(False, 0xC000, 0xC0FF)}
        bridge.pio_write(0xC000, 1, 0x05)  # pins 0 and 2 count once
        assert bridge.pio_read(0xC001, 1) == 0xFA  # counters 0, 2 no longer multiples of 3
        assert bridge.pio_read(0xD000, 1) == 0xFF  # not ours
    finally:
        bridge.stop()
        proc.kill()
        proc.wait(5)
