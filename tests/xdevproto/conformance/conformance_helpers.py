"""Serving devices in a thread for the conformance suite, and running it."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from xdevproto.conformance.catalog import server_checks
from xdevproto.conformance.runner import Report, run_server_suite
from xdevproto.conformance.target import Target
from xdevproto.server import Server
from xdevproto.transport import listen
from xdevproto.wire import Capabilities

#: the test device with everything on, write_multiple included
FULL_CAPS = Capabilities(max_msg_fds=8, write_multiple=True)

@contextlib.contextmanager
def serving(server: Server) -> Iterator[str]:
    """``server`` listening on a fresh socket path, served by a thread."""
    with tempfile.TemporaryDirectory(prefix="xdev-conf-") as tmp:
        path = str(Path(tmp) / "dev.sock")
        listener: socket.socket = listen(path)
        thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        thread.start()
        try:
            yield path
        finally:
            server.stop()
            thread.join(5)
            listener.close()

def run_suite(path: str, ids: set[str] | None = None, peer: str | None = None) -> Report:
    checks = [c for c in server_checks() if not ids or c.id in ids]
    return run_server_suite(Target(path), checks, peer=peer, timeout=1.0)
