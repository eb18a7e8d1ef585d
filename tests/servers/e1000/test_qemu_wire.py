"""An xdev e1000 and a QEMU e1000 on one wire (issue 5, the shared-wire test).

A real QEMU (TCG) boots Debian's kernel with a busybox initramfs and one
e1000 NIC on ``-netdev dgram`` (one Ethernet frame per UDP datagram) or
``-netdev stream`` (length-prefixed frames over TCP), both on 127.0.0.1.
The other end of that wire is ``xdev-e1000`` with the matching back end,
driven from this test over vfio-user by a minimal driver with memfd
guest RAM; the driver answers ARP and ICMP echo for its link-local address.
The guest pings it and prints the summary on its serial console, which
QEMU writes to a file; the guest powers off when done.

Frame formats: Ethernet II, ARP (RFC 826), IPv4 (RFC 791), ICMP echo
(RFC 792); classic pcap for the server's capture (LINKTYPE_ETHERNET).
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e1000_driver import ones
from qemu_guest import GuestKernel, debian_kernel, initramfs

from servers.e1000 import regs as R
from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

QEMU = "qemu-system-x86_64"
XDEV_MAC = bytes.fromhex("525400123456")
XDEV_IP = ipaddress.IPv4Address("169.254.10.2").packed
GUEST_MAC = bytes.fromhex("525400aa0001")
GUEST_IP = "169.254.10.1"
PINGS = 3
#: Boot (~10 s under TCG here) plus the pings; past this QEMU is killed.
QEMU_TIMEOUT = 150.0

ETH_ARP, ETH_IPV4 = 0x0806, 0x0800
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8

GUEST_SCRIPT = f"""
ip link set lo up
ip addr add {GUEST_IP}/16 dev eth0
ip link set eth0 up
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
done
echo "xdev-wire: carrier $(cat /sys/class/net/eth0/carrier)"
ping -c {PINGS} -w 30 {ipaddress.IPv4Address(XDEV_IP)}
echo "xdev-wire: ping status $?"
"""


# -- the responder: pure functions over frames ----------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: 0 over a correct header."""
    return ~ones(data) & 0xFFFF


def respond(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    """The reply a host at ``mac``/``ip`` sends to ``frame``, or None.

    Answers ARP requests for ``ip`` (RFC 826) and ICMP echo requests to
    ``ip`` (RFC 792, the payload echoed); anything else, malformed or not,
    gets no answer.
    """
    if len(frame) < 14:
        return None
    src, ethertype = frame[6:12], struct.unpack_from(">H", frame, 12)[0]
    body = frame[14:]
    if ethertype == ETH_ARP and len(body) >= 28:
        htype, ptype, hlen, plen, op = struct.unpack_from(">HHBBH", body)
        sha, spa, tpa = body[8:14], body[14:18], body[24:28]
        if (htype, ptype, hlen, plen, op) != (1, ETH_IPV4, 6, 4, 1) or tpa != ip:
            return None
        arp = struct.pack(">HHBBH", 1, ETH_IPV4, 6, 4, 2) + mac + ip + sha + spa
        return src + mac + struct.pack(">H", ETH_ARP) + arp
    if ethertype != ETH_IPV4 or len(body) < 20:
        return None
    ihl = (body[0] & 15) * 4
    total = struct.unpack_from(">H", body, 2)[0]
    if body[0] >> 4 != 4 or ihl < 20 or total < ihl + 8 or total > len(body):
        return None
    if body[9] != 1 or body[16:20] != ip or body[ihl] != ICMP_ECHO_REQUEST:
        return None
    icmp = bytearray(body[ihl:total])
    icmp[0], icmp[2:4] = ICMP_ECHO_REPLY, b"\0\0"
    icmp[2:4] = struct.pack(">H", checksum(bytes(icmp)))
    header = bytearray(struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0))
    header += ip + body[12:16]
    header[10:12] = struct.pack(">H", checksum(bytes(header)))
    return src + mac + struct.pack(">H", ETH_IPV4) + bytes(header) + bytes(icmp)


def icmp_type(frame: bytes) -> int | None:
    """The ICMP type of an Ethernet/IPv4/ICMP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return None
    ihl = (frame[14] & 15) * 4
    return frame[14 + ihl] if len(frame) > 14 + ihl else None


def pcap_frames(data: bytes) -> list[bytes]:
    """The frames of a classic little-endian pcap file."""
    if data[:4] != struct.pack("<I", 0xA1B2C3D4):
        raise ValueError("not a little-endian classic pcap")
    frames, pos = [], 24
    while pos + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, pos + 8)[0]
        frames.append(data[pos + 16:pos + 16 + caplen])
        pos += 16 + caplen
    return frames


# -- the driver ------------------------------------------------------------------------------

RAM_SIZE = 1 << 20
TX_RING, RX_RING = 0x1000, 0x2000
RX_BUF, TX_BUF, BUF = 0x10000, 0x50000, 2048
RING = 64
DD = 1


@dataclass
class WireDriver:
    """Drives the served NIC: RX ring read on INTx, replies sent on TX.

    Runs in its own thread (:meth:`serve`); the vfio-user client is used
    only there. Frames it received and sent are kept for the assertions.
    """

    client: Client
    ram: MemfdRam
    received: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    interrupts: int = 0
    rx_next: int = 0
    tx_tail: int = 0

    def rd(self, off: int) -> int:
        return int.from_bytes(self.client.region_read(PciRegion.BAR0, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        self.client.region_write(PciRegion.BAR0, off, value.to_bytes(4, "little"))

    def start(self, irq_fd: int) -> None:
        """Map RAM, wire INTx, bring the link up and fill both rings (SDM 14.4, 14.5)."""
        self.client.dma_map(0, RAM_SIZE, fd=self.ram.fd)
        self.client.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[irq_fd])
        self.wr(R.CTRL, self.rd(R.CTRL) | R.CTRL_SLU)
        for i in range(RING):
            self.ram.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + BUF * i, 0))
        for base, length, head, tail in ((R.RDBAL, R.RDLEN, R.RDH, R.RDT),
                                         (R.TDBAL, R.TDLEN, R.TDH, R.TDT)):
            self.wr(base, TX_RING if base == R.TDBAL else RX_RING)
            self.wr(base + 4, 0)
            self.wr(length, RING * 16)
            self.wr(head, 0)
            self.wr(tail, 0)
        self.wr(R.RDT, RING - 1)
        self.wr(R.RCTL, R.RCTL_EN | 1 << 15)  # BAM: ARP requests are broadcast
        self.wr(R.TCTL, R.TCTL_EN | R.TCTL_PSP)
        self.wr(R.IMS, R.ICR_RXT0)

    def send(self, frame: bytes) -> None:
        i = self.tx_tail
        if (i + 1) % RING == self.rd(R.TDH):
            raise RuntimeError("TX ring full: the device stopped sending")
        self.ram.write(TX_BUF + BUF * i, frame)
        self.ram.write(TX_RING + 16 * i,
                       struct.pack("<QHBBBBH", TX_BUF + BUF * i, len(frame), 0, 0x0B, 0, 0, 0))
        self.tx_tail = (i + 1) % RING
        self.wr(R.TDT, self.tx_tail)
        self.sent.append(frame)

    def drain(self) -> None:
        """Take every completed RX descriptor, answer it, hand it back."""
        while True:
            i = self.rx_next
            addr, length, _csum, status, _err, _special = struct.unpack(
                "<QHHBBH", self.ram.read(RX_RING + 16 * i, 16))
            if not status & DD:
                return
            frame = self.ram.read(addr, length)
            self.received.append(frame)
            self.ram.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + BUF * i, 0))
            self.rx_next = (i + 1) % RING
            self.wr(R.RDT, i)  # i is now the one descriptor software holds back
            reply = respond(frame, XDEV_MAC, XDEV_IP)
            if reply is not None:
                self.send(reply)

    def serve(self, irq_fd: int, stop: threading.Event) -> None:
        """Handle each INTx, then end it like a host's EOI; nothing is polled.

        The server reports INTx automasked (vfio's VFIO_IRQ_INFO_AUTOMASKED):
        after each signal it stays masked until the client unmasks it, and it
        signals again at the unmask if the level is still high. The rings are
        read only after an interrupt, so a frame the device fails to signal
        goes unanswered and the guest's ping fails. The timeout only bounds
        how late :attr:`stop` is seen.
        """
        while not stop.is_set():
            if not select.select([irq_fd], [], [], 0.2)[0]:
                continue
            os.eventfd_read(irq_fd)
            self.interrupts += 1
            self.rd(R.ICR)  # read-to-clear drops the level
            self.drain()
            self.client.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_UNMASK, count=1)


# -- the test --------------------------------------------------------------------------------


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (Debian package qemu-system-x86)")
    return debian_kernel(("drivers/net/ethernet/intel/e1000/*",))


@dataclass(frozen=True)
class Wire:
    """One wire between the two NICs: the server's ``--netdev`` and QEMU's ``-netdev``."""

    server_netdev: str
    qemu_netdev: str


def make_wire(kind: str) -> Wire:
    """QEMU 7.2 ``-netdev dgram``/``stream`` options (qemu-options.hx) on 127.0.0.1."""
    if kind == "dgram":
        xdev_port, qemu_port = free_udp_ports(2)
        return Wire(f"dgram,local=127.0.0.1:{xdev_port},remote=127.0.0.1:{qemu_port}",
                    f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={qemu_port},"
                    f"remote.type=inet,remote.host=127.0.0.1,remote.port={xdev_port}")
    # The server listens (it starts first); QEMU connects as the client.
    port = free_tcp_port()
    return Wire(f"stream,listen=127.0.0.1:{port}",
                f"stream,id=n0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port={port}")


@pytest.fixture(params=["dgram", "stream"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path, Wire]]:
    """xdev-e1000 on one end of a wire: (vfio-user socket, pcap file, the wire)."""
    wire = make_wire(request.param)
    sock, pcap = tmp_path / "e1000.sock", tmp_path / "wire.pcap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.e1000.cli", "--socket", str(sock),
         "--mac", XDEV_MAC.hex(":"), "--pcap", str(pcap), "--netdev", wire.server_netdev],
        stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[3])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else b""
                raise AssertionError(f"xdev-e1000 did not start: {err!r}")
            time.sleep(0.05)
        yield sock, pcap, wire
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""


def run_qemu(kernel: GuestKernel, initrd: Path, serial: Path, netdev: str) -> None:
    """Boot the guest to its power-off; kill QEMU at QEMU_TIMEOUT whatever happens."""
    command = [
        QEMU, "-nodefaults", "-display", "none", "-no-reboot", "-accel", "tcg", "-m", "256",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 no_timer_check tsc=reliable",
        "-serial", f"file:{serial}", "-monitor", "none",
        "-netdev", netdev, "-device", f"e1000,netdev=n0,mac={GUEST_MAC.hex(':')}",
    ]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        console = serial.read_text(errors="replace") if serial.exists() else "(none)"
        raise AssertionError(f"QEMU still running after {QEMU_TIMEOUT:.0f} s; serial:\n"
                             + console) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"QEMU exited {proc.returncode}: {err.decode(errors='replace')}"


def test_qemu_guest_pings_xdev_nic_on_one_wire(
        kernel: GuestKernel, server: tuple[Path, Path, Wire], tmp_path: Path) -> None:
    sock, pcap, wire = server
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(initramfs(kernel, GUEST_SCRIPT, ("e1000",)))
    serial = tmp_path / "serial.txt"
    stop = threading.Event()
    failure: list[BaseException] = []
    irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
    with MemfdRam(RAM_SIZE) as ram, Client.connect(str(sock), guest=ram) as client:
        driver = WireDriver(client, ram)
        driver.start(irq_fd)

        def serve() -> None:
            try:
                driver.serve(irq_fd, stop)
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        thread = threading.Thread(target=serve, name="wire-driver", daemon=True)
        thread.start()
        try:
            run_qemu(kernel, initrd, serial, wire.qemu_netdev)
        finally:
            stop.set()
            thread.join(10)
            os.close(irq_fd)
    console = serial.read_text(errors="replace")
    print(console)
    assert not failure, f"driver failed: {failure[0]!r}"
    assert not thread.is_alive()
    summary = re.search(r"(\d+) packets transmitted, (\d+) packets received", console)
    assert summary, f"no ping summary on the guest console:\n{console}"
    assert summary.groups() == (str(PINGS), str(PINGS)), console
    assert "xdev-wire: ping status 0" in console

    # The driver saw the guest's frames and answered them through the device.
    from_guest = [f for f in driver.received if f[6:12] == GUEST_MAC]
    assert any(f[12:14] == b"\x08\x06" for f in from_guest), "no ARP from the guest"
    assert sum(icmp_type(f) == ICMP_ECHO_REQUEST for f in from_guest) == PINGS
    assert sum(icmp_type(f) == ICMP_ECHO_REPLY for f in driver.sent) == PINGS
    assert driver.interrupts >= PINGS + 1  # the ARP request and each echo request

    # The server's capture holds both directions of every echo.
    frames = pcap_frames(pcap.read_bytes())
    requests = [f for f in frames if icmp_type(f) == ICMP_ECHO_REQUEST and f[6:12] == GUEST_MAC]
    replies = [f for f in frames if icmp_type(f) == ICMP_ECHO_REPLY and f[6:12] == XDEV_MAC]
    assert len(requests) == PINGS and len(replies) == PINGS


# -- the responder alone (no QEMU) -----------------------------------------------------------

PEER_IP = ipaddress.IPv4Address(GUEST_IP).packed


def arp_request(target: bytes) -> bytes:
    arp = struct.pack(">HHBBH", 1, ETH_IPV4, 6, 4, 1) + GUEST_MAC + PEER_IP + bytes(6) + target
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp + bytes(18)


def echo_request(dst: bytes, payload: bytes = b"xdev" * 14, icmp_kind: int = 8) -> bytes:
    icmp = bytearray(struct.pack(">BBHHH", icmp_kind, 0, 0, 0x1234, 7) + payload)
    icmp[2:4] = struct.pack(">H", checksum(bytes(icmp)))
    ip = bytearray(struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0))
    ip += PEER_IP + dst
    ip[10:12] = struct.pack(">H", checksum(bytes(ip)))
    return XDEV_MAC + GUEST_MAC + b"\x08\x00" + bytes(ip) + bytes(icmp)


def test_responder_answers_arp_for_its_address_only() -> None:
    reply = respond(arp_request(XDEV_IP), XDEV_MAC, XDEV_IP)
    assert reply is not None
    assert reply[:14] == GUEST_MAC + XDEV_MAC + b"\x08\x06"
    assert struct.unpack_from(">H", reply, 20)[0] == 2  # op: reply
    assert reply[22:28] == XDEV_MAC and reply[28:32] == XDEV_IP
    assert reply[32:38] == GUEST_MAC and reply[38:42] == PEER_IP
    assert respond(arp_request(bytes([169, 254, 10, 3])), XDEV_MAC, XDEV_IP) is None


def test_responder_echoes_icmp_with_valid_checksums() -> None:
    request = echo_request(XDEV_IP) + bytes(4)  # trailing Ethernet padding is not echoed
    reply = respond(request, XDEV_MAC, XDEV_IP)
    assert reply is not None and icmp_type(reply) == ICMP_ECHO_REPLY
    assert reply[:12] == GUEST_MAC + XDEV_MAC
    ip, icmp = reply[14:34], reply[34:]
    assert checksum(ip) == 0 and checksum(icmp) == 0
    assert ip[12:16] == XDEV_IP and ip[16:20] == PEER_IP
    assert icmp[4:] == request[38:-4]  # identifier, sequence and payload echoed


@pytest.mark.parametrize("frame", [
    b"", b"\x00" * 13, echo_request(bytes([10, 0, 0, 1])), echo_request(XDEV_IP, icmp_kind=0),
    echo_request(XDEV_IP)[:40], arp_request(XDEV_IP)[:30],
])
def test_responder_ignores_other_and_short_frames(frame: bytes) -> None:
    assert respond(frame, XDEV_MAC, XDEV_IP) is None


def test_pcap_frames_reads_records() -> None:
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    records = b"".join(struct.pack("<IIII", 0, 0, len(f), len(f)) + f for f in (b"ab", b"cde"))
    assert pcap_frames(header + records) == [b"ab", b"cde"]
    with pytest.raises(ValueError):
        pcap_frames(b"\0" * 24)
