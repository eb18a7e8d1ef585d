"""The emulated Xen host boots, runs HVM guests, and returns results via 9p."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.emuhost import EmuHost, HostSession, HvmGuest, Share

pytestmark = pytest.mark.xen

PROBE_INIT = """
echo XDEV-GUEST-MARKER-7f3a
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo)"
lspci -n
echo XDEV-GUEST-DONE
"""

GUEST_SCRIPT = """
set -e
. "$XDEV_LIB"
xl info > xl-info.txt
python3 -c 'import bridge.emuhost, construct, cffi, pyxs; print("imports ok")' > imports.txt
started=$(cut -d' ' -f1 /proc/uptime)
xdev_guest_run probe XDEV-GUEST-DONE 400
echo "$started $(cut -d' ' -f1 /proc/uptime)" > guest-uptimes.txt
"""


def test_hvm_guest_marker_comes_back_through_the_share(emuhost_session: HostSession) -> None:
    result = emuhost_session.run(
        GUEST_SCRIPT, guests=[HvmGuest(name="probe", init_script=PROBE_INIT)], timeout=450
    )
    assert result.ok, result.describe()

    virt_caps = re.search(r"^virt_caps\s*:\s*(.*)$", result.file("xl-info.txt"), re.M)
    assert virt_caps is not None and "hvm" in virt_caps.group(1).split()
    assert result.file("imports.txt").strip() == "imports ok"

    serial = result.guest_serial("probe")
    assert "XDEV-GUEST-MARKER-7f3a" in serial
    # qemu-xen's i440FX host bridge, as lspci -n prints it inside the guest.
    assert "8086:1237" in serial, serial[-2000:]

    start, end = (float(x) for x in result.file("guest-uptimes.txt").split())
    ready = float((emuhost_session.directory / "dom0-ready-uptime").read_text())
    print(f"\nemuhost timings: dom0 ready at {ready:.0f} s uptime, "
          f"guest create-to-marker-and-destroy {end - start:.0f} s")


DRIVER_INIT = """
echo "bound: $(ls /sys/bus/pci/drivers/ahci /sys/bus/pci/drivers/e1000 | grep -c '^0000:')"
ls /sys/block
echo DRIVERS-DONE
"""


def test_guest_modules_drive_qemus_own_ahci_and_e1000(emuhost_session: HostSession) -> None:
    """Module loading in the guest initramfs, against the baseline devices."""
    guest = HvmGuest(
        name="drivers",
        init_script=DRIVER_INIT,
        modules=("ahci", "sd_mod", "e1000"),
        disks=("/tmp/drivers-disk.img,raw,hda,rw",),
        extra=(("hdtype", '"ahci"'),),
        device_model_args=("-device", "e1000,addr=6"),
    )
    script = '. "$XDEV_LIB"; truncate -s 16M /tmp/drivers-disk.img; '
    script += "xdev_guest_run drivers DRIVERS-DONE 400"
    result = emuhost_session.run(script, guests=[guest], timeout=450)
    assert result.ok, result.describe()
    serial = result.guest_serial("drivers")
    assert "bound: 2" in serial, serial[-2000:]
    assert "sda" in serial.split()


def test_failing_script_reports_its_status(emuhost_session: HostSession) -> None:
    result = emuhost_session.run("echo about-to-fail; exit 7", timeout=60)
    assert result.exit_status == 7, result.describe()
    assert not result.timed_out
    assert "about-to-fail" in result.output


def test_script_timeout_is_enforced_and_the_host_survives(
    emuhost_session: HostSession, emuhost_scratch: Path
) -> None:
    hung = emuhost_session.run("echo started; sleep 600", timeout=5)
    assert hung.exit_status == 124 and hung.timed_out, hung.describe()
    after = emuhost_session.run("echo still-here > /xdev/scratch/after.txt", timeout=30)
    assert after.ok, after.describe()
    assert (emuhost_scratch / "after.txt").read_text() == "still-here\n"


def test_run_boots_its_own_host_with_a_read_only_share(emuhost: EmuHost, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("from-the-host\n")
    script = "cat /xdev/data/input.txt > seen.txt; touch /xdev/data/written 2>/dev/null; true"
    result = emuhost.run(script, shares={"data": Share(data)}, timeout=60,
                         results_dir=tmp_path / "run")
    assert result.ok, result.describe()
    assert result.file("seen.txt") == "from-the-host\n"
    assert not (data / "written").exists()
    print(f"\nemuhost timings: boot + script + power-off {result.seconds:.0f} s")
