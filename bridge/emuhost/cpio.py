"""A minimal writer for the cpio "newc" archive format used by Linux initramfs.

Format: Linux ``Documentation/driver-api/early-userspace/buffer-format.rst``
("initramfs buffer format"): each member is a 110-byte ASCII header (magic
``070701`` then thirteen 8-digit hex fields), the NUL-terminated name padded to
a multiple of 4, then the data padded to a multiple of 4; the archive ends with
a member named ``TRAILER!!!``.

Written here rather than calling ``cpio(1)`` so that building a guest
initramfs needs no host tool and no file tree on disk, and so that archives are
byte-for-byte reproducible (fixed inode numbers and mtimes).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioError(ValueError):
    """A member cannot be represented in a newc archive."""


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


@dataclass
class CpioWriter:
    """Collects members in order and renders them as one newc archive.

    Parent directories are not created implicitly: the kernel's unpacker
    needs them listed before their children, so callers add them first
    (``add_dir`` with ``parents=True`` does it for them).
    """

    _chunks: list[bytes] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _next_ino: int = 1

    def _member(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise CpioError(f"bad member name {name!r}")
        if name in self._names:
            raise CpioError(f"duplicate member {name!r}")
        self._names.add(name)
        self._emit(name, mode, data, nlink)

    def _emit(self, name: str, mode: int, data: bytes, nlink: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._next_ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed for reproducible archives
            len(data),
            0,  # devmajor
            0,  # devminor
            0,  # rdevmajor
            0,  # rdevminor
            len(encoded),
            0,  # check (only for the "crc" variant)
        )
        self._next_ino += 1
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self._chunks.append(header + encoded + _pad4(len(header) + len(encoded)))
        self._chunks.append(data + _pad4(len(data)))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def add_dir(self, name: str, mode: int = 0o755, *, parents: bool = False) -> None:
        """Add a directory; with ``parents`` also any missing ancestors."""
        if parents:
            parts = name.strip("/").split("/")
            for depth in range(1, len(parts) + 1):
                path = "/".join(parts[:depth])
                if not self.has(path):
                    self._member(path, stat.S_IFDIR | mode, nlink=2)
            return
        self._member(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._member(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._member(name, stat.S_IFLNK | 0o777, target.encode())

    def render(self) -> bytes:
        """The archive so far plus the trailer (the writer stays usable)."""
        trailer = CpioWriter(_next_ino=0)
        trailer._emit(_TRAILER, 0, b"", 1)
        return b"".join(self._chunks) + b"".join(trailer._chunks)

    def render_gzip(self) -> bytes:
        # mtime=0 keeps the gzip header reproducible too.
        return gzip.compress(self.render(), compresslevel=6, mtime=0)
