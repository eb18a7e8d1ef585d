"""bridge.xen.abi checked against Xen's own header (libxen-dev) by a compiled probe.

The probe (probe_ioreq.c) sets one field at a time to all ones in C and
prints the bytes; Python must decode exactly that field, and encode the
same bytes.  Skips only if gcc or <xen/hvm/ioreq.h> is absent
(``apt-get install gcc libxen-dev``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

import pytest

from bridge.xen import abi

HERE = pathlib.Path(__file__).parent
IOREQ_FIELDS = ["addr", "data", "count", "size", "vp_eport", "_pad0", "state",
                "data_is_ptr", "dir", "df", "_pad1", "type"]
BUF_FIELDS = ["type", "pad", "dir", "size", "addr", "data"]
IOREQ_WIDTH = {"addr": 64, "data": 64, "count": 32, "size": 32, "vp_eport": 32, "_pad0": 16,
               "state": 4, "data_is_ptr": 1, "dir": 1, "df": 1, "_pad1": 1, "type": 8}
BUF_WIDTH = {"type": 8, "pad": 1, "dir": 1, "size": 2, "addr": 20, "data": 32}
RAW_NAME = {"_pad0": "pad0", "_pad1": "pad1", "size_buf": "size_log2"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    header = subprocess.run([gcc, "-E", "-x", "c", "-"], input="#include <xen/hvm/ioreq.h>\n",
                            capture_output=True, text=True, check=False)
    if header.returncode != 0:
        pytest.skip("Xen public headers absent (apt-get install libxen-dev)")
    exe = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([gcc, "-w", "-o", str(exe), str(HERE / "probe_ioreq.c")], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_sizes_and_offsets(probe: dict[str, str]) -> None:
    assert int(probe["sizeof.ioreq"]) == abi.IOREQ_SIZE == abi.IOREQ_STRUCT.size
    assert int(probe["offsetof.shared_iopage.vcpu_ioreq1"]) == abi.IOREQ_SIZE
    assert int(probe["sizeof.buf_ioreq"]) == abi.BUF_IOREQ_SIZE == abi.BUF_IOREQ_STRUCT.size
    assert int(probe["sizeof.buffered_iopage"]) <= abi.PAGE_SIZE
    assert (int(probe["sizeof.buffered_iopage"])
            == abi.BUFFERED_SLOTS_OFFSET + abi.IOREQ_BUFFER_SLOT_NUM * abi.BUF_IOREQ_SIZE)
    assert int(probe["offsetof.ioreq.data"]) == abi.IOREQ_DATA_OFFSET
    assert int(probe["offsetof.ioreq.vp_eport"]) == abi.IOREQ_VP_EPORT_OFFSET
    assert int(probe["offsetof.ioreq.type"]) == abi.IOREQ_STATE_OFFSET + 1
    assert int(probe["offsetof.buffered_iopage.read_pointer"]) == abi.BUFFERED_READ_POINTER_OFFSET
    assert (int(probe["offsetof.buffered_iopage.write_pointer"])
            == abi.BUFFERED_WRITE_POINTER_OFFSET)
    assert int(probe["offsetof.buffered_iopage.buf_ioreq"]) == abi.buf_slot_offset(0)
    assert int(probe["offsetof.buffered_iopage.buf_ioreq1"]) == abi.buf_slot_offset(1)


def test_constants(probe: dict[str, str]) -> None:
    assert int(probe["const.IOREQ_BUFFER_SLOT_NUM"]) == abi.IOREQ_BUFFER_SLOT_NUM
    assert int(probe["const.IOREQ_READ"]) == abi.IoreqDir.READ
    assert int(probe["const.IOREQ_WRITE"]) == abi.IoreqDir.WRITE
    for state in abi.IoreqState:
        name = {"NONE": "STATE_IOREQ_NONE", "IOREQ_READY": "STATE_IOREQ_READY",
                "IOREQ_INPROCESS": "STATE_IOREQ_INPROCESS",
                "IORESP_READY": "STATE_IORESP_READY"}[state.name]
        assert int(probe[f"const.{name}"]) == state
    for typ in abi.IoreqType:
        assert int(probe[f"const.IOREQ_TYPE_{typ.name}"]) == typ


@pytest.mark.parametrize("field", IOREQ_FIELDS)
def test_ioreq_field_position(probe: dict[str, str], field: str) -> None:
    raw_bytes = bytes.fromhex(probe[f"ioreq.{field}"])
    raw = abi.unpack_ioreq(raw_bytes)
    name = RAW_NAME.get(field, field)
    values = dataclasses.asdict(raw)
    assert values.pop(name) == (1 << IOREQ_WIDTH[field]) - 1
    assert set(values.values()) == {0}, f"setting {field} in C leaked into {values}"
    assert abi.pack_ioreq(raw) == raw_bytes


@pytest.mark.parametrize("field", BUF_FIELDS)
def test_buf_ioreq_field_position(probe: dict[str, str], field: str) -> None:
    raw_bytes = bytes.fromhex(probe[f"buf_ioreq.{field}"])
    raw = abi.unpack_buf_ioreq(raw_bytes)
    name = "size_log2" if field == "size" else field
    values = dataclasses.asdict(raw)
    assert values.pop(name) == (1 << BUF_WIDTH[field]) - 1
    assert set(values.values()) == {0}, f"setting {field} in C leaked into {values}"
    assert abi.pack_buf_ioreq(raw) == raw_bytes


def test_mixed_records_decode(probe: dict[str, str]) -> None:
    req = abi.decode_ioreq(bytes.fromhex(probe["mixed.ioreq"]).replace(
        # Make the addresses valid for an MMIO string: decode must validate.
        bytes.fromhex("8877665544332211"), (0x1000).to_bytes(8, "little"), 1).replace(
        bytes.fromhex("00ffeeddccbbaa99"), (0x2000).to_bytes(8, "little"), 1))
    assert req == abi.Ioreq(abi.IoreqType.COPY, abi.IoreqDir.READ, 0x1000, 0x2000, 4, 3,
                            True, True)
    raw = abi.unpack_ioreq(bytes.fromhex(probe["mixed.ioreq"]))
    assert (raw.addr, raw.data, raw.vp_eport) == (0x1122334455667788, 0x99AABBCCDDEEFF00, 0x55)
    buf = abi.decode_buf_ioreq(bytes.fromhex(probe["mixed.buf_ioreq"]), None)
    assert buf == abi.Ioreq(abi.IoreqType.COPY, abi.IoreqDir.WRITE, 0xABCDE, 0x12345678, 4, 1,
                            False, False)


def test_evtchn_device_interface_matches_the_kernel_header(tmp_path: pathlib.Path) -> None:
    """XenLibs makes libxenevtchn's per-request calls on the evtchn fd
    itself: its ioctl number and port size must be the kernel's
    (<xen/evtchn.h> of linux-libc-dev, which libc6-dev depends on)."""
    from bridge.xen import libs

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    src = tmp_path / "probe_evtchn.c"
    # The header uses Xen's domid_t without defining it (the kernel's own
    # xen/interface headers do); uint16_t is its type in xen.h.
    src.write_text("#include <stdint.h>\n#include <stdio.h>\n#include <sys/ioctl.h>\n"
                   "typedef uint16_t domid_t;\n#include <xen/evtchn.h>\n"
                   "int main(void) { struct ioctl_evtchn_notify n;\n"
                   "  printf(\"%lu %lu\\n\", (unsigned long)IOCTL_EVTCHN_NOTIFY,\n"
                   "         (unsigned long)sizeof n.port); return 0; }\n")
    exe = tmp_path / "probe_evtchn"
    subprocess.run([gcc, "-w", "-o", str(exe), str(src)], check=True)
    number, port_size = subprocess.run([str(exe)], capture_output=True, text=True,
                                       check=True).stdout.split()
    assert int(number) == libs.IOCTL_EVTCHN_NOTIFY
    assert int(port_size) == libs.EVTCHN_PORT_SIZE
