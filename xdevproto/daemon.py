"""What every xdev daemon shares: socket options, systemd integration,
logging, signals.

* Listening socket: inherited from systemd socket activation
  (``LISTEN_FDS``), or ``--fd N``, or ``--socket PATH`` (the vfio-user
  spec's backend program conventions: ``--socket-path=PATH`` or
  ``--fd=FDNUM``; both spellings are accepted).
* Readiness: ``READY=1`` once the device can serve, ``STATUS=`` lines with
  what is connected, ``STOPPING=1`` on the way out (sd_notify(3)); a no-op
  without ``NOTIFY_SOCKET``.
* Logging to stderr; under systemd (``JOURNAL_STREAM`` set) each line
  carries a ``<N>`` priority prefix that journald keeps as the priority
  (sd-daemon(3)).
* SIGTERM and SIGINT stop the server; the caller's cleanup (flushing a
  disk) runs before exit. No daemonising.
* Protocol engine: ``--engine native`` (xdevproto.server, the default) or
  ``--engine libvfio-user`` (the C library through :mod:`xdevproto.lvu`,
  loaded at run time); the device object is the same for both. See
  docs/libvfio-user-engine.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .device import Device
from .server import Server
from .transport import listen, listen_fds, listening_path, socket_from_fd

if TYPE_CHECKING:
    from .lvu.engine import LvuServer

log = logging.getLogger(__name__)

ENGINES = ("native", "libvfio-user")

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, as journald expects."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(level: str = "info", name: str = "xdev") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{name}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager, if any."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager: %s", exc)
        return False
    return True


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where to listen (systemd socket activation wins)")
    where.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                       help="listen on this UNIX socket path (or tcp:HOST:PORT)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="listen on this inherited socket descriptor")
    parser.add_argument("--config", metavar="FILE",
                        help="read options from FILE (one or more per line, # comments)")
    parser.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                        help="accept clients with this uid only (repeatable)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--engine", default="native", type=_engine, metavar="|".join(ENGINES),
                        help="vfio-user protocol engine: xdev's own (native, the default) or "
                             "libvfio-user's C library, loaded at run time (UNIX sockets "
                             "only; --fd and socket activation work with both)")
    parser.add_argument("--xen-foreign-dma", action="store_true",
                        help="when xdev-bridge offers it, map the Xen guest's memory here and "
                             "do DMA directly instead of by DMA_READ/DMA_WRITE messages "
                             "(native engine; needs the right to map the guest, e.g. root "
                             "in dom0)")
    parser.add_argument("--xen-ioreq", action="store_true",
                        help="when xdev-bridge offers it, serve the guest's accesses to this "
                             "device's BARs here, from an ioreq server the bridge made for "
                             "it, instead of through the bridge (native engine; needs the "
                             "right to serve the guest's ioreqs, e.g. root in the bridge's "
                             "domain)")


def _engine(name: str) -> str:
    """argparse type for --engine: refuses libvfio-user now if it cannot be loaded."""
    if name not in ENGINES:
        raise argparse.ArgumentTypeError(f"unknown engine {name!r} (choose from "
                                         f"{', '.join(ENGINES)})")
    if name == "libvfio-user":
        from .lvu.loader import unavailable_reason
        reason = unavailable_reason()
        if reason is not None:
            raise argparse.ArgumentTypeError(reason)
    return name


def expand_config(argv: list[str]) -> list[str]:
    """Replace ``--config FILE`` with the options the file holds.

    The file holds command-line options, one or more per line, as a shell
    would split them; blank lines and ``#`` comments are ignored. Options
    given on the command line after ``--config`` override the file's.
    """
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] if "=" in arg else next(it, None)
            if not path:
                raise SystemExit("--config needs a file")
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise SystemExit(f"cannot read config {path}: {exc.strerror}") from None
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    out.extend(shlex.split(line, comments=True))
                except ValueError as exc:
                    raise SystemExit(f"{path}:{number}: {exc}") from None
        else:
            out.append(arg)
    return out


def listener_from(socket_path: str | None, fd: int | None) -> socket.socket:
    """The listening socket: systemd's, ``--fd``'s, or a new one at the path."""
    inherited = listen_fds()
    if inherited:
        if len(inherited) > 1:
            log.warning("systemd passed %d sockets; using the first", len(inherited))
        return next(iter(inherited.values()))
    if fd is not None:
        return socket_from_fd(fd)
    if socket_path:
        return listen(socket_path)
    raise SystemExit("no socket: give --socket PATH or --fd N, or use socket activation")


def run_server(device: Device, listener: socket.socket, *, name: str,
               allowed_uids: list[int] | None = None,
               cleanup: Callable[[], None] | None = None, engine: str = "native",
               xen_foreign_dma: bool = False, xen_ioreq: bool = False) -> int:
    """Serve until SIGTERM/SIGINT on ``engine`` (one of :data:`ENGINES`); then
    clean up and say so to systemd. ``xen_foreign_dma``: accept the bridge's
    offer of Xen guest memory (the xdev VERSION extension, bridge.foreign).
    ``xen_ioreq``: accept its offer of the device's ioreqs (bridge.direct)."""
    server: Server | LvuServer

    def refuse(why: str) -> NoReturn:
        if cleanup is not None:
            cleanup()
        listener.close()
        raise SystemExit(f"{name}: {why}")

    if engine == "libvfio-user":
        if listener.family != socket.AF_UNIX:
            refuse("--engine libvfio-user serves UNIX sockets only")
        if xen_foreign_dma or xen_ioreq:
            flag = "--xen-foreign-dma" if xen_foreign_dma else "--xen-ioreq"
            refuse(f"{flag} needs the native engine (libvfio-user answers VERSION itself)")
        from .lvu.engine import LvuServer
        server = LvuServer(device, allowed_uids=allowed_uids)
    else:
        mappers = None
        if xen_foreign_dma:
            # The Xen mapper lives with the bridge's Xen bindings; imported
            # only when asked for, so servers elsewhere never load them.
            from bridge.foreign import GUEST_MAPPERS
            mappers = GUEST_MAPPERS
        attachers = None
        if xen_ioreq:
            from bridge.direct import IOREQ_ATTACHERS
            attachers = IOREQ_ATTACHERS
        server = Server(device, allowed_uids=allowed_uids, guest_mappers=mappers,
                        ioreq_attachers=attachers)
    def on_state(state: str) -> None:
        notify(f"STATUS={name}: {state}")

    server.on_state = on_state
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        server.stop()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        notify("READY=1")
        log.info("%s serving on %s (engine %s)", name, _describe(listener), engine)
        server.serve(listener)
    finally:
        notify("STOPPING=1")
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if cleanup is not None:
            cleanup()
        listener.close()
    return 0


def _describe(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return listening_path(sock) or f"an unnamed socket (fd {sock.fileno()})"
    try:
        return str(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"
