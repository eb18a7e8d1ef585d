"""Back ends on loopback sockets and a tap device of our own; pcap output."""

from __future__ import annotations

import io
import json
import os
import platform
import queue
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable

import pytest

from servers.e1000 import mmsg
from servers.e1000.backends import (
    MAX_FRAME,
    RX_BATCH,
    DgramBackend,
    PcapWriter,
    StreamBackend,
    TapBackend,
    open_tap,
    parse_netdev,
)

FRAME = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x06" + bytes(range(46))


def collector() -> tuple[queue.Queue[bytes], queue.Queue[bool]]:
    return queue.Queue(), queue.Queue()


def each(q: queue.Queue[bytes]) -> Callable[[list[bytes]], None]:
    """A frame sink putting every frame of a batch on ``q``."""
    def sink(frames: list[bytes]) -> None:
        for frame in frames:
            q.put(frame)
    return sink


@pytest.mark.parametrize("text,kind", [
    ("tap,ifname=xdev0", "tap"), ("tap,fd=5", "tap"),
    ("dgram,local=127.0.0.1:5000,remote=127.0.0.1:5001", "dgram"),
    ("stream,connect=127.0.0.1:5000", "stream"), ("stream,listen=:5000", "stream"),
    ("null", "null"),
])
def test_parse_netdev(text: str, kind: str) -> None:
    assert parse_netdev(text).kind == kind


@pytest.mark.parametrize("text", [
    "vde", "tap", "tap,ifname=a,fd=3", "tap,fd=x", "dgram,remote=1.2.3.4:5",
    "stream", "stream,connect=a:1,listen=b:2", "dgram,local=1:2,bogus=1",
])
def test_parse_netdev_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_netdev(text)


def test_dgram_pair_exchanges_frames() -> None:
    a = DgramBackend(local="127.0.0.1:0")
    port_a = a.sock.getsockname()[1]
    b = DgramBackend(local="127.0.0.1:0", remote=f"127.0.0.1:{port_a}")
    port_b = b.sock.getsockname()[1]
    a.remote = ("127.0.0.1", port_b)
    qa, _ = collector()
    qb, _ = collector()
    a.start(each(qa))
    b.start(each(qb))
    try:
        a.send(FRAME)
        assert qb.get(timeout=5) == FRAME
        b.send(FRAME[::-1])
        assert qa.get(timeout=5) == FRAME[::-1]
        assert a.tx_frames == 1 and b.rx_frames == 1
    finally:
        a.close()
        b.close()


def test_dgram_learns_peer_when_no_remote() -> None:
    a = DgramBackend(local="127.0.0.1:0")
    a.send(FRAME)
    assert a.tx_dropped == 1, "nobody to send to yet"
    q, _ = collector()
    a.start(each(q))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.sendto(FRAME, a.sock.getsockname())
        assert q.get(timeout=5) == FRAME
        a.send(b"reply-frame")
        peer.settimeout(5)
        assert peer.recv(100) == b"reply-frame"
    finally:
        peer.close()
        a.close()


def received_in_batches(backend: DgramBackend, frames: list[bytes],
                        sender: socket.socket) -> list[list[bytes]]:
    """Send ``frames`` before ``backend`` starts, then the batches its
    thread hands over until all arrived; checks their order and size."""
    for frame in frames:
        sender.sendto(frame, backend.sock.getsockname())
    batches: queue.Queue[list[bytes]] = queue.Queue()
    backend.start(batches.put)
    got: list[list[bytes]] = []
    while sum(map(len, got)) < len(frames):
        got.append(batches.get(timeout=5))
    assert [f for batch in got for f in batch] == frames
    assert len(got[0]) == RX_BATCH and max(map(len, got)) == RX_BATCH
    return got


def test_dgram_hands_over_waiting_frames_in_batches() -> None:
    """Frames already queued when the thread looks arrive together, in
    order, at most RX_BATCH at a time; the first sender becomes the peer."""
    a = DgramBackend(local="127.0.0.1:0")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    frames = [FRAME + i.to_bytes(2, "big") for i in range(RX_BATCH + 36)]
    try:
        received_in_batches(a, frames, peer)
        assert a.rx_frames == len(frames)
        assert a.remote == peer.getsockname()
    finally:
        peer.close()
        a.close()


def test_stream_listen_connect_both_ways_and_link() -> None:
    server = StreamBackend(listen="127.0.0.1:0")
    addr = server.address
    assert addr is not None
    client = StreamBackend(connect=f"127.0.0.1:{addr[1]}")
    qs, ls = collector()
    qc, lc = collector()
    server.start(each(qs), ls.put)
    client.start(each(qc), lc.put)
    try:
        assert ls.get(timeout=5) is True and lc.get(timeout=5) is True
        for i in range(20):
            client.send(FRAME + bytes([i]))
        assert [qs.get(timeout=5) for _ in range(20)] == [FRAME + bytes([i]) for i in range(20)]
        server.send(FRAME)
        assert qc.get(timeout=5) == FRAME
    finally:
        client.close()
        server.close()


def test_stream_hostile_length_disconnects() -> None:
    server = StreamBackend(listen="127.0.0.1:0")
    addr = server.address
    assert addr is not None
    q, links = collector()
    server.start(each(q), links.put)
    s = socket.create_connection(addr)
    try:
        assert links.get(timeout=5) is True
        s.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        assert links.get(timeout=5) is False
        assert q.empty()
        # The next peer is accepted.
        s2 = socket.create_connection(addr)
        assert links.get(timeout=5) is True
        s2.sendall(struct.pack(">I", len(FRAME)) + FRAME)
        assert q.get(timeout=5) == FRAME
        s2.close()
    finally:
        s.close()
        server.close()


def test_stream_delivers_frames_before_a_hostile_length() -> None:
    server = StreamBackend(listen="127.0.0.1:0")
    addr = server.address
    assert addr is not None
    batches: queue.Queue[list[bytes]] = queue.Queue()
    _, links = collector()
    server.start(batches.put, links.put)
    s = socket.create_connection(addr)
    try:
        assert links.get(timeout=5) is True
        good = [FRAME + bytes([i]) for i in range(3)]
        s.sendall(b"".join(struct.pack(">I", len(f)) + f for f in good)
                  + struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        assert links.get(timeout=5) is False
        got: list[bytes] = []
        while not batches.empty():
            got += batches.get()
        assert got == good, "the frames before the bad length are delivered"
    finally:
        s.close()
        server.close()


def test_stream_qemu_wire_format() -> None:
    """What a QEMU -netdev stream peer sees: a 4-byte big-endian length, then the frame."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    client = StreamBackend(connect=f"127.0.0.1:{port}")
    _, links = collector()
    client.start(lambda frames: None, links.put)
    peer, _ = lst.accept()
    try:
        assert links.get(timeout=5) is True
        client.send(FRAME)
        peer.settimeout(5)
        data = b""
        while len(data) < 4 + len(FRAME):
            data += peer.recv(4096)
        assert data == struct.pack(">I", len(FRAME)) + FRAME
    finally:
        peer.close()
        lst.close()
        client.close()


def test_pcap_format() -> None:
    buf = io.BytesIO()
    buf.close = lambda: None  # type: ignore[method-assign]
    w = PcapWriter(buf)
    w.write(FRAME, when=1000.25)
    w.write(b"\x01" * 10, when=1001.0)
    data = buf.getvalue()
    magic, major, minor, _, _, snap, link = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, link) == (0xA1B2C3D4, 2, 4, 1) and snap >= 1518
    sec, usec, incl, orig = struct.unpack_from("<IIII", data, 24)
    assert (sec, usec, incl, orig) == (1000, 250000, len(FRAME), len(FRAME))
    assert data[40:40 + len(FRAME)] == FRAME
    assert struct.unpack_from("<IIII", data, 40 + len(FRAME))[2] == 10


def _tap_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _tap_available() or not shutil.which("ip"),
                    reason="needs root, /dev/net/tun and iproute2 for a tap device")
def test_tap_by_name_and_by_fd() -> None:
    name = "xdt" + uuid.uuid4().hex[:8]
    fd = open_tap(name)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        tap = TapBackend(fd=os.dup(fd))
        q, _ = collector()
        tap.start(each(q))
        try:
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            raw.bind((name, 0))
            raw.settimeout(5)
            try:
                mine = bytes.fromhex("525400123456525400abcdef88b5") + b"to-the-nic" * 5
                raw.send(mine)  # the kernel transmits on the tap: the NIC receives it
                while (got := q.get(timeout=5)) != mine:
                    pass  # the kernel's own IPv6 chatter on a fresh interface
                tap.send(bytes.fromhex("525400abcdef52540012345688b5") + b"from-nic" * 6)
                assert raw.recv(2048).endswith(b"from-nic" * 6)
                assert got == mine and tap.tx_frames == 1
            finally:
                raw.close()
        finally:
            tap.close()
    finally:
        os.close(fd)
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def _icmp_echo(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes) -> bytes:
    def csum(data: bytes) -> int:
        total = sum(struct.unpack(f">{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x4242, 1) + b"xdev-e1000 ping!" * 2
    icmp = icmp[:2] + struct.pack(">H", csum(icmp)) + icmp[4:]
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0,
                     src_ip, dst_ip)
    ip = ip[:10] + struct.pack(">H", csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + icmp


@pytest.mark.skipif(not _tap_available() or not shutil.which("ip"),
                    reason="needs root, /dev/net/tun and iproute2")
def test_kernel_answers_ping_through_tap() -> None:
    """The NIC on a tap device in a network namespace of our own: the
    driver sends an ICMP echo request, the kernel's reply lands in the RX ring."""
    import time

    from e1000_driver import MAC, Driver

    from servers.e1000 import regs as R

    tag = uuid.uuid4().hex[:8]
    name, ns = "xdt" + tag, "xdev-test-" + tag

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], check=True, capture_output=True,
                              text=True).stdout

    fd = open_tap(name)
    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        os.close(fd)
        pytest.skip(f"cannot create a network namespace: {exc.stderr.strip()}")
    try:
        ip("link", "set", name, "netns", ns)
        ip("-n", ns, "addr", "add", "10.77.0.1/24", "dev", name)
        ip("-n", ns, "link", "set", name, "up")
        ip("-n", ns, "neigh", "add", "10.77.0.2", "lladdr", MAC.hex(":"), "dev", name)
        tap_mac = bytes.fromhex(json.loads(ip("-n", ns, "-j", "link", "show", name))[0]
                                ["address"].replace(":", ""))
        drv = Driver(backend=TapBackend(fd=fd))
        fd = -1  # the back end owns it now
        try:
            drv.setup_rx(n=64)
            drv.setup_tx()
            drv.legacy(_icmp_echo(tap_mac, MAC, bytes([10, 77, 0, 2]), bytes([10, 77, 0, 1])))
            drv.kick()
            deadline = time.monotonic() + 10
            reply = None
            seen = 0
            while reply is None:
                assert time.monotonic() < deadline, "no echo reply from the kernel"
                while seen < drv.rd(R.RDH):
                    f = drv.rx_frame(seen)
                    seen += 1
                    if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:
                        reply = f
                time.sleep(0.01)
            assert reply[:6] == MAC and reply[26:30] == bytes([10, 77, 0, 1])
            assert struct.unpack_from(">HH", reply, 38) == (0x4242, 1)
            assert reply[42:74] == b"xdev-e1000 ping!" * 2
        finally:
            drv.close()
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.mark.parametrize("batched", [True, False], ids=["recvmmsg", "recv"])
def test_dgram_known_peer_batches_in_order(batched: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With the peer known, waiting datagrams arrive in order, at most
    RX_BATCH at a time, by recvmmsg or, where it is unavailable, one recv
    each."""
    if not batched:
        monkeypatch.setattr(mmsg, "_load", lambda: None)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    a = DgramBackend(local="127.0.0.1:0", remote=f"127.0.0.1:{peer.getsockname()[1]}")
    assert (a._batch is not None) is batched
    frames = [FRAME + i.to_bytes(2, "big") * (i % 700) for i in range(2 * RX_BATCH + 5)]
    try:
        assert len(received_in_batches(a, frames, peer)) >= 3
    finally:
        peer.close()
        a.close()


def test_batch_reader_limits_and_cuts_long_datagrams() -> None:
    """A datagram longer than a slot arrives cut to the slot (still longer
    than any frame the NIC takes); ``limit`` bounds a read; an empty
    socket gives [] without blocking; a closed one raises."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    reader = mmsg.batch_reader(rx)
    if reader is None:
        # Every LP64 glibc Linux has it; elsewhere the back end reads one by one.
        assert not (platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc")
        pytest.skip("recvmmsg not loadable through cffi on this platform")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert reader.read() == []
        big = os.urandom(mmsg.SLOT_BYTES + 1000)
        tx.sendto(big, rx.getsockname())
        for i in range(5):
            tx.sendto(bytes([i]) * 60, rx.getsockname())
        first = reader.read(2)
        assert first == [big[:mmsg.SLOT_BYTES], bytes([0]) * 60]
        assert reader.read() == [bytes([i]) * 60 for i in range(1, 5)]
        assert reader.read() == []
    finally:
        tx.close()
        rx.close()
    with pytest.raises(OSError):
        reader.read()
