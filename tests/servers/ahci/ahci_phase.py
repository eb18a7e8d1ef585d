"""A DataPhase over a plain bytearray, for command-set tests without a controller."""

from __future__ import annotations

from servers.ahci.disk import SECTOR, DiskError, DiskImage


class BufferPhase:
    def __init__(self, size: int, content: bytes = b"") -> None:
        self.buf = bytearray(content.ljust(size, b"\0")[:size])

    @property
    def length(self) -> int:
        return len(self.buf)

    def put(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), len(self.buf))
        self.buf[:n] = bytes(data[:n])
        return n

    def get(self, nbytes: int) -> bytes:
        return bytes(self.buf[:nbytes])

    def disk_to_guest(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        if disk.read_into(lba, [memoryview(self.buf)[:nbytes]]) != nbytes:
            raise DiskError("short")

    def guest_to_disk(self, disk: DiskImage, lba: int, nbytes: int) -> None:
        disk.write_from(lba, [memoryview(self.buf)[:nbytes]])


def pattern(lba: int, count: int) -> bytes:
    """Each sector tagged with its LBA, so misplaced data shows."""
    return b"".join((b"LBA%012d" % n).ljust(SECTOR, bytes([n & 0xFF]))
                    for n in range(lba, lba + count))
