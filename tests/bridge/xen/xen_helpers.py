"""Shared test doubles for tests/bridge/xen: a recording IoHandler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingHandler:
    """Answers reads from ``values`` (default ``default``) and records every call."""

    values: dict[tuple[str, int], int] = field(default_factory=dict)
    default: int = 0x11223344
    calls: list[tuple[object, ...]] = field(default_factory=list)
    fail: bool = False

    def _read(self, kind: str, where: int, size: int) -> int:
        self.calls.append((f"{kind}_read", where, size))
        if self.fail:
            raise RuntimeError("device server went away")
        return self.values.get((kind, where), self.default)

    def _write(self, kind: str, where: int, size: int, value: int) -> None:
        self.calls.append((f"{kind}_write", where, size, value))
        if self.fail:
            raise RuntimeError("device server went away")

    def pio_read(self, port: int, size: int) -> int:
        return self._read("pio", port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._write("pio", port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read("mmio", addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._write("mmio", addr, size, value)

    def config_read(self, sbdf: int, reg: int, size: int) -> int:
        self.calls.append(("config_read", sbdf, reg, size))
        if self.fail:
            raise RuntimeError("device server went away")
        return self.values.get(("config", reg), self.default)

    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None:
        self.calls.append(("config_write", sbdf, reg, size, value))

    def invalidate(self) -> None:
        self.calls.append(("invalidate",))
