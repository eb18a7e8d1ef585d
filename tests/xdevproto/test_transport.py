"""Transports: fd passing on the header's sendmsg, MSG_CTRUNC, TCP without
fds, addresses, listening paths and systemd socket activation."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdevproto import wire
from xdevproto.client import Client
from xdevproto.errors import ConnectionClosed, LocalProtocolError, PeerProtocolError
from xdevproto.guestmem import MemfdRam
from xdevproto.server import Server
from xdevproto.testdev import BUF_OFF, ID_VALUE, TestDevice
from xdevproto.transport import (
    Transport,
    fds_from_ancillary,
    listen,
    listen_fds,
    listening_path,
    parse_address,
)
from xdevproto.wire import PciRegion


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def recv_header_with_fds(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """What libvfio-user does: recvmsg() of the 16-byte header only; the
    fds must come with it."""
    data, anc, _flags, _ = sock.recvmsg(wire.HEADER_SIZE, socket.CMSG_SPACE(4 * max_fds))
    return data, fds_from_ancillary(anc)


@pytest.mark.parametrize("body_size", [16, 8192, 300000])
def test_fds_travel_with_the_header(unix_pair: tuple[socket.socket, socket.socket],
                                    body_size: int) -> None:
    a, b = unix_pair
    r, w = os.pipe()
    msg = wire.encode_message(7, wire.Command.DMA_MAP, 0, b"\xab" * body_size)
    t = threading.Thread(target=Transport(a).send, args=(msg, [r, w]))
    t.start()
    head, fds = recv_header_with_fds(b)
    assert head == msg[:16] and len(fds) == 2
    rest = bytearray()
    while len(rest) < body_size:
        rest += b.recv(1 << 20)
    t.join()
    assert bytes(rest) == msg[16:]
    # the received fds are the same pipe: what goes in w comes out of fds[0]
    os.write(fds[1], b"z")
    assert os.read(r, 1) == b"z"
    for fd in (r, w, *fds):
        os.close(fd)


def test_small_message_without_fds_is_one_send(unix_pair: tuple[socket.socket,
                                                                socket.socket]) -> None:
    a, b = unix_pair
    msg = wire.encode_message(1, wire.Command.REGION_READ, 0, b"\0" * 16)
    Transport(a).send(msg)
    assert b.recv(100) == msg


def test_recv_returns_fds(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix_pair
    r, w = os.pipe()
    a.sendmsg([b"x" * 20],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
    data, fds = Transport(b).recv()
    assert bytes(data) == b"x" * 20 and len(fds) == 1
    for fd in (r, w, *fds):
        os.close(fd)


def test_ctrunc_closes_fds_and_is_fatal(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """More fds than the receiver's buffer holds: the kernel truncates the
    control data (MSG_CTRUNC); we close what did arrive and give up."""
    a, b = unix_pair
    pipes = [os.pipe() for _ in range(3)]
    sent = [w for _, w in pipes]
    tr = Transport(b, max_recv_fds=1)
    a.sendmsg([b"y" * 16], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                             array.array("i", sent).tobytes())])
    for fd in sent:
        os.close(fd)
    with pytest.raises(PeerProtocolError) as e:
        tr.recv()
    assert e.value.fatal and e.value.errno == errno.EINVAL
    # EOF on every pipe: no copy of a write end survived the receive
    for r, _ in pipes:
        assert os.read(r, 1) == b"", "received fds leaked"
        os.close(r)


def test_eof_and_reset_read_as_empty(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = unix_pair
    a.close()
    data, fds = Transport(b).recv()
    assert len(data) == 0 and fds == []


def test_send_to_closed_peer_is_connection_closed(unix_pair: tuple[socket.socket,
                                                                   socket.socket]) -> None:
    a, b = unix_pair
    b.close()
    with pytest.raises(ConnectionClosed):
        Transport(a).send(b"x" * 16)


def test_fds_from_ancillary_ignores_partial_ints() -> None:
    payload = array.array("i", [5, 6]).tobytes() + b"\x01\x02"
    assert fds_from_ancillary([(socket.SOL_SOCKET, socket.SCM_RIGHTS, payload)]) == [5, 6]
    assert fds_from_ancillary([(socket.SOL_SOCKET, 99, payload)]) == []


# -- TCP --------------------------------------------------------------------------


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    yield a, b
    a.close()
    b.close()


def test_tcp_transport_refuses_to_send_fds(tcp_pair: tuple[socket.socket,
                                                           socket.socket]) -> None:
    a, _ = tcp_pair
    tr = Transport(a)
    assert not tr.passes_fds
    r, w = os.pipe()
    with pytest.raises(LocalProtocolError):
        tr.send(b"\0" * 16, [r])
    os.close(r)
    os.close(w)


def test_tcp_transport_moves_bytes(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    Transport(a).send(b"q" * 5000)
    got = bytearray()
    tb = Transport(b)
    while len(got) < 5000:
        data, fds = tb.recv()
        assert fds == []
        got += data
    assert got == b"q" * 5000


@pytest.fixture
def tcp_served() -> Iterator[tuple[str, TestDevice]]:
    device = TestDevice()
    server = Server(device)
    lst = listen("tcp:127.0.0.1:0")
    thread = threading.Thread(target=server.serve, args=(lst,), daemon=True)
    thread.start()
    host, port = lst.getsockname()[:2]
    yield f"tcp:{host}:{port}", device
    server.stop()
    thread.join(5)
    lst.close()


def test_tcp_client_server_message_only_dma(tcp_served: tuple[str, TestDevice]) -> None:
    addr, device = tcp_served
    with MemfdRam(1 << 16) as ram, Client.connect(addr, guest=ram) as c:
        c.transport.sock.settimeout(10)  # a lost message fails the test, not hangs it
        neg = c.conn.negotiated
        assert neg is not None
        assert neg.peer_max_msg_fds == 0  # the server advertises no fds over TCP
        assert not neg.twin_socket
        assert c.conn.our_caps.max_msg_fds == 0
        assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
        r2 = c.region_info(PciRegion.BAR2)
        assert r2.fd is None and not r2.flags & wire.RegionFlags.MMAP
        c.dma_map(0, 1 << 16)  # no fd: DMA_READ/DMA_WRITE messages
        ram.write(0x300, b"over tcp")
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x300, 8))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 1))  # guest -> buffer
        assert c.region_read(PciRegion.BAR0, 0x18, 4) == b"\0\0\0\0"
        assert bytes(device.regs[BUF_OFF:BUF_OFF + 8]) == b"over tcp"
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x400, 8))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))  # buffer -> guest
        assert ram.read(0x400, 8) == b"over tcp"


# -- addresses and listening -----------------------------------------------------------


@pytest.mark.parametrize("addr,expect", [
    ("/run/x.sock", ("unix", "/run/x.sock")),
    ("unix:/run/x.sock", ("unix", "/run/x.sock")),
    ("tcp:127.0.0.1:5000", ("tcp", ("127.0.0.1", 5000))),
    ("tcp:[::1]:5000", ("tcp", ("::1", 5000))),
])
def test_parse_address(addr: str, expect: tuple[str, object]) -> None:
    assert parse_address(addr) == expect


@pytest.mark.parametrize("addr", ["", "unix:", "tcp:host", "tcp::80", "tcp:h:port"])
def test_parse_address_refuses(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_address(addr)


def test_listen_replaces_stale_socket_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = listen(str(path))
    first.close()  # leaves a stale socket file behind
    second = listen(str(path))
    assert (path.stat().st_mode & 0o777) == 0o600
    second.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        listen(str(regular))
    assert regular.read_text() == "keep me"


def test_listening_path_is_the_public_name_not_the_bind_name(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    sock = listen(str(path))
    try:
        # The kernel reports the temporary name listen() bound before renaming.
        assert sock.getsockname() != str(path)
        assert listening_path(sock) == str(path)
    finally:
        sock.close()
    assert listening_path(socket.socket(socket.AF_UNIX)) is None


# -- systemd socket activation (sd_listen_fds(3)) ------------------------------------

CHILD = textwrap.dedent("""
    import json, os, sys
    from xdevproto.transport import listen_fds
    socks = listen_fds()
    out = {name: [s.fileno(), s.family == 1] for name, s in socks.items()}
    left = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
    conn, _ = socks["vfio"].accept() if "vfio" in socks else (None, None)
    if conn is not None:
        conn.sendall(b"hello from fd 3")
    print(json.dumps({"socks": out, "left": left}))
""")


def test_listen_fds_in_activated_child(tmp_path: Path) -> None:
    """A child started the way systemd starts it: the sockets from fd 3 on
    and its own pid in LISTEN_PID (set by a launcher that then exec()s,
    keeping the pid)."""
    path = tmp_path / "act.sock"
    lst = listen(str(path))
    other = listen(str(tmp_path / "other.sock"))
    fd1, fd2 = lst.fileno(), other.fileno()
    launcher = (
        "import fcntl, os, sys\n"
        f"high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in ({fd1}, {fd2})]\n"
        "for want, fd in enumerate(high, 3):\n"
        "    os.dup2(fd, want)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', "
        "LISTEN_FDNAMES='vfio:')\n"
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    child = subprocess.Popen([sys.executable, "-c", launcher, CHILD], pass_fds=(fd1, fd2),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            assert s.recv(100) == b"hello from fd 3"
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
        lst.close()
        other.close()
    assert child.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["socks"] == {"vfio": [3, True], "fd4": [4, True]}
    assert result["left"] == []  # the environment was unset


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # another process's sockets
    {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
    {"LISTEN_PID": "self", "LISTEN_FDS": "x"},
    {"LISTEN_PID": "", "LISTEN_FDS": "1"},
])
def test_listen_fds_not_for_us(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert listen_fds() == {}
    assert is_open(0)  # nothing was wrapped or closed
