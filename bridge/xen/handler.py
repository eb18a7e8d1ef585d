"""The interface between the Xen front end and the bridge core.

The ioreq server decodes and validates each request, resolves rep and
``data_is_ptr`` strings through guest memory, and calls these methods once
per element.  Values are unsigned and at most ``size`` bytes; the server
masks what a handler returns.  A handler that raises is logged and the
guest's access completes as an unanswered one (reads all-ones).

``sbdf`` is Xen's PCI_CONFIG encoding (``addr >> 32``): segment in bits
31..16, bus 15..8, device 7..3, function 2..0 (``abi.Sbdf.from_int``).
"""

from __future__ import annotations

from typing import Protocol


class IoHandler(Protocol):
    def pio_read(self, port: int, size: int) -> int: ...
    def pio_write(self, port: int, size: int, value: int) -> None: ...
    def mmio_read(self, addr: int, size: int) -> int: ...
    def mmio_write(self, addr: int, size: int, value: int) -> None: ...
    def config_read(self, sbdf: int, reg: int, size: int) -> int: ...
    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None: ...
    def invalidate(self) -> None: ...
