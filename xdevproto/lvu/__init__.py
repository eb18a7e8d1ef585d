"""Optional libvfio-user engine: cffi (ABI mode) bindings to its server API.

libvfio-user (https://github.com/nutanix/libvfio-user) is the reference C
implementation of a vfio-user server. It is loaded at run time by name
(``libvfio-user.so.0``, or ``$XDEV_LVU_LIBRARY``); nothing is compiled at
install. Importing this package does not load the library:
:func:`~xdevproto.lvu.loader.load` (called by :class:`Context`) does, and
raises :class:`LibraryUnavailable` or :class:`AbiMismatch` with the reason.
"""

from xdevproto.lvu.cdef import IrqType, MigrState, PciType, Region, RegionFlag, ResetType
from xdevproto.lvu.context import Context, DmaInfo
from xdevproto.lvu.loader import AbiMismatch, LibraryUnavailable, load, unavailable_reason

__all__ = [
    "AbiMismatch", "Context", "DmaInfo", "IrqType", "LibraryUnavailable", "MigrState",
    "PciType", "Region", "RegionFlag", "ResetType", "load", "unavailable_reason",
]
