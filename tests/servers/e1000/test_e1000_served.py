"""xdev-e1000 as a daemon over a real UNIX socket: a vfio-user client maps
memfd guest RAM, drives TX and RX through the protocol, and the frames cross
a UDP loopback wire (the QEMU ``-netdev dgram`` format)."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e1000_driver import MAC, PEER, padded, tcp_frame

from servers.e1000 import cli
from servers.e1000 import regs as R
from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

BAR0 = PciRegion.BAR0


def test_config_is_frozen_and_validated() -> None:
    c = cli.parse(["--socket", "/tmp/x.sock", "--mac", "02:00:00:00:00:01",
                   "--netdev", "stream,connect=127.0.0.1:1"])
    assert c.mac == bytes.fromhex("020000000001") and c.netdev.kind == "stream"
    with pytest.raises(AttributeError):
        c.mac = b""  # type: ignore[misc]
    for bad in (["--mac", "01:00:00:00:00:01"], ["--mac", "zz"], ["--netdev", "vde"]):
        with pytest.raises(SystemExit) as e:
            cli.parse(bad)
        assert e.value.code == 2


def test_help() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_bad_backend_exits_2(tmp_path: Path) -> None:
    assert cli.main(["--socket", str(tmp_path / "s"), "--netdev", "dgram,local=256.1.1.1:1"]) == 2


def wait_path(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"server did not start: {err!r}")
        time.sleep(0.05)


def rd(c: Client, off: int) -> int:
    return int.from_bytes(c.region_read(BAR0, off, 4), "little")


def wr(c: Client, off: int, value: int) -> None:
    c.region_write(BAR0, off, value.to_bytes(4, "little"))


def test_daemon_tx_rx_over_dgram_wire(tmp_path: Path) -> None:
    wire_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wire_peer.bind(("127.0.0.1", 0))
    wire_peer.settimeout(10)
    port = wire_peer.getsockname()[1]
    sock = tmp_path / "e1000.sock"
    pcap = tmp_path / "cap.pcap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.e1000.cli", "--socket", str(sock),
         "--mac", MAC.hex(":"), "--netdev", f"dgram,local=127.0.0.1:0,remote=127.0.0.1:{port}",
         "--pcap", str(pcap)],
        stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[3])
    try:
        wait_path(sock, proc)
        with MemfdRam(1 << 20) as ram, Client.connect(str(sock), guest=ram) as c:
            c.dma_map(0, 1 << 20, fd=ram.fd)
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[efd])
            cfg = c.region_read(PciRegion.CONFIG, 0, 4)
            assert struct.unpack("<HH", cfg) == (0x8086, 0x100E)
            # TX ring of 8 at 0x1000, one frame.
            frame = tcp_frame(b"over the wire" * 10)
            ram.write(0x8000, frame)
            ram.write(0x1000, struct.pack("<QHBBBBH", 0x8000, len(frame), 0, 0x0B, 0, 0, 0))
            wr(c, R.TDBAL, 0x1000)
            wr(c, R.TDLEN, 128)
            wr(c, R.TCTL, R.TCTL_EN)
            wr(c, R.IMS, R.ICR_TXDW | R.ICR_RXT0)
            wr(c, R.TDT, 1)
            data, server_addr = wire_peer.recvfrom(4096)
            assert data == frame
            assert ram.read(0x1000 + 12, 1)[0] & 1
            assert select.select([efd], [], [], 5)[0]
            assert rd(c, R.ICR) & R.ICR_TXDW
            # RX ring of 8 at 0x2000 with 2 KiB buffers at 0x10000.
            for i in range(8):
                ram.write(0x2000 + 16 * i, struct.pack("<QQ", 0x10000 + 2048 * i, 0))
            wr(c, R.RDBAL, 0x2000)
            wr(c, R.RDLEN, 128)
            wr(c, R.RDT, 7)
            wr(c, R.RCTL, R.RCTL_EN | R.RCTL_SECRC)  # CRC stripped: the length is the frame's
            incoming = tcp_frame(b"hello nic", dst=MAC, src=PEER)
            wire_peer.sendto(incoming, server_addr)
            deadline = time.monotonic() + 10
            while not ram.read(0x2000 + 12, 1)[0] & 1:
                assert time.monotonic() < deadline, "frame never arrived in the ring"
                time.sleep(0.01)
            length = struct.unpack("<H", ram.read(0x2000 + 8, 2))[0]
            assert ram.read(0x10000, length) == padded(incoming)
            assert rd(c, R.RDH) == 1
            os.close(efd)
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
    data = pcap.read_bytes()
    assert data[:4] == struct.pack("<I", 0xA1B2C3D4)
    assert frame in data and incoming in data
