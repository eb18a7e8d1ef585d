"""The emulated Xen host boots, runs HVM guests, and returns results via 9p."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.emuhost import EmuHost, HvmGuest, Share

pytestmark = pytest.mark.xen

PROBE_INIT = """
echo XDEV-GUEST-MARKER-7f3a
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo)"
lspci -n
echo XDEV-GUEST-DONE
"""

RUN_SCRIPT = """
set -e
. "$XDEV_LIB"
xl info > xl-info.txt
python3 -c 'import bridge.emuhost, construct, cffi, pyxs; print("imports ok")' > imports.txt
cat /xdev/data/input.txt > data-seen.txt
started=$(cut -d' ' -f1 /proc/uptime)
xdev_guest_run probe XDEV-GUEST-DONE 300
echo "$started $(cut -d' ' -f1 /proc/uptime)" > guest-uptimes.txt
"""


def test_hvm_guest_marker_comes_back_through_the_share(
    emuhost: EmuHost, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("from-the-host\n")
    guest = HvmGuest(name="probe", init_script=PROBE_INIT)
    result = emuhost.run(
        RUN_SCRIPT,
        guests=[guest],
        shares={"data": Share(data)},
        timeout=900,
        results_dir=tmp_path / "run",
    )
    assert result.ok, result.describe()

    virt_caps = re.search(r"^virt_caps\s*:\s*(.*)$", result.file("xl-info.txt"), re.M)
    assert virt_caps is not None and "hvm" in virt_caps.group(1).split()
    assert result.file("imports.txt").strip() == "imports ok"
    assert result.file("data-seen.txt") == "from-the-host\n"

    serial = result.guest_serial("probe")
    assert "XDEV-GUEST-MARKER-7f3a" in serial
    # qemu-xen's i440FX host bridge, as lspci -n prints it inside the guest.
    assert re.search(r"8086:1237", serial), serial[-2000:]

    ready = float(result.file("dom0-ready-uptime"))
    start, end = (float(x) for x in result.file("guest-uptimes.txt").split())
    print(f"\nemuhost timings: dom0 ready at {ready:.0f} s uptime, guest run "
          f"{end - start:.0f} s, whole run {result.seconds:.0f} s")


def test_failing_script_reports_its_status(emuhost: EmuHost, tmp_path: Path) -> None:
    result = emuhost.run("echo about-to-fail; exit 7", timeout=600, results_dir=tmp_path / "r")
    assert result.exit_status == 7, result.describe()
    assert "about-to-fail" in result.output
