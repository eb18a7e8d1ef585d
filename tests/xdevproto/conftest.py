"""Fixtures: a test device served over a real UNIX socket."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdevproto.server import Server
from xdevproto.testdev import TestDevice
from xdevproto.transport import listen


class Served:
    def __init__(self, path: Path, device: TestDevice, server: Server,
                 listener: socket.socket) -> None:
        self.path = str(path)
        self.device = device
        self.server = server
        self.listener = listener
        self.thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    device = TestDevice()
    server = Server(device)
    s = Served(tmp_path / "dev.sock", device, server, listen(str(tmp_path / "dev.sock")))
    yield s
    s.stop()


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}
