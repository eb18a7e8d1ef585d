"""xdev-bridge serves libvfio-user's gpio-pci-idio-16 sample to an HVM guest.

The bridge is not tied to xdev's own servers: any vfio-user server works.
Where libvfio-user is installed on the host, the test copies its
``gpio-pci-idio-16`` sample and the shared libraries it needs (``ldd``; the
glibc family excepted, dom0 has its own) into the session's scratch share,
runs the sample in dom0 of the emulated Xen host, and serves it to a guest
at 00:05.0.

What the sample does (samples/gpio-pci-idio-16.c): PCI ID 494f:0dc8, BAR2 is
256 bytes of I/O space. A write of a byte at offset 0 (pins 0-7) or 4 (pins
8-15) adds one to the counter of each pin whose bit is set; a read at offset
1 (pins 0-7) or 5 (pins 8-15) returns bit i set where pin i's counter is a
multiple of 3. The guest reads and writes the I/O BAR through /dev/port, so
each access is a PIO ioreq to the bridge and a REGION_READ/WRITE to the
sample.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from bridge.emuhost import HostSession, HvmGuest
from tests.e2e.xen.lvu_stage import require_libvfio_user, shared_libraries

pytestmark = pytest.mark.xen

SAMPLE = "gpio-pci-idio-16"
DEV = "/sys/bus/pci/devices/0000:00:05.0"

GUEST_INIT = f"""
echo XDEV-GUEST-UP
how=boot
i=0
while [ ! -e {DEV}/vendor ] && [ $i -lt 120 ]; do
    how=rescan
    echo 1 > /sys/bus/pci/rescan
    sleep 1
    i=$((i+1))
done
echo "XDEV-FOUND-BY $how"
lspci | sed 's/^/XDEV-LSPCI /'
echo 1 > {DEV}/enable 2>/dev/null
# resource line 3 is BAR2: start end flags (0x100 in flags: I/O space).
set -- $(sed -n 3p {DEV}/resource)
echo "XDEV-BAR2 $1 $2 $3"
port=$(($1))
[ -e /dev/port ] || mknod /dev/port c 1 4
# One byte at a time through /dev/port: each is one inb/outb.
rd() {{ dd if=/dev/port bs=1 skip=$((port + $1)) count=1 2>/dev/null | od -An -tx1 \\
        | tr -d ' \\n'; }}
wr() {{ printf "\\\\$(printf %o $2)" | dd of=/dev/port bs=1 seek=$((port + $1)) count=1 \\
        conv=notrunc 2>/dev/null; }}
echo "XDEV-IN-A $(rd 1) $(rd 5)"
wr 0 5
wr 4 128
echo "XDEV-IN-B $(rd 1) $(rd 5)"
wr 0 1
wr 0 1
echo "XDEV-IN-C $(rd 1) $(rd 5)"
echo XDEV-GPIO-DONE
"""

DOM0_SCRIPT = r"""
. "$XDEV_LIB"
export PYTHONPYCACHEPREFIX=/tmp/xdev-pycache
log() { echo "$(cut -d' ' -f1 /proc/uptime) $*" >> "$XDEV_RUN/status"; }
# Off the 9p share: executables and libraries on local disk.
rm -rf /tmp/lvu && cp -r /xdev/scratch/lvu-gpio /tmp/lvu || exit 2
mkdir -p /run/xdev
SOCK=/run/xdev/gpio.sock
for attempt in 1 2 3; do
    rm -f "$SOCK"
    LD_LIBRARY_PATH=/tmp/lvu/lib /tmp/lvu/gpio-pci-idio-16 -v "$SOCK" \
        2>> "$XDEV_RUN/gpio.log" &
    server=$!
    for i in $(seq 60); do
        [ -S "$SOCK" ] && break
        kill -0 $server 2>/dev/null || break
        sleep 0.5
    done
    [ -S "$SOCK" ] && kill -0 $server 2>/dev/null && break
    log "sample attempt $attempt failed"
done
kill -0 $server 2>/dev/null || exit 3
log "sample $server up"
# Paused, so that SeaBIOS assigns BAR2 like any other device's.
xdev_guest_start gpio -p || exit 4
xdev_bridge_start gpio "$XDEV_RUN/bridge.log" "00:05.0=unix:$SOCK" || { xl destroy gpio; exit 5; }
bridge=$XDEV_BRIDGE_PID
log "bridge $bridge running"
timeout 60 xl unpause gpio
log "unpaused ($?)"
(sleep 900; echo "guest timeout" >> "$XDEV_RUN/status"; xl destroy gpio) &
watchdog=$!
# The guest powers off after its checks; the bridge exits on the release.
wait $bridge
log "bridge exit $?"
kill $watchdog 2>/dev/null
kill $server
wait $server
# The sample has no SIGTERM handler: 143 is its normal end here.
log "sample exit $?"
exit 0
"""


def samples_dir() -> Path | None:
    candidates = [os.environ.get("XDEV_LVU_SAMPLES", "")]
    candidates += [f"{prefix}/libexec/libvfio-user/samples" for prefix in ("/usr/local", "/usr")]
    for candidate in candidates:
        if candidate and (Path(candidate) / SAMPLE).is_file():
            return Path(candidate)
    return None


def stage_sample(scratch: Path) -> Path:
    """Copy the sample and its libraries into the scratch share (never the repo)."""
    require_libvfio_user()
    where = samples_dir()
    if where is None:
        pytest.skip(f"libvfio-user sample {SAMPLE} not installed (set XDEV_LVU_SAMPLES)")
    stage = scratch / "lvu-gpio"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "lib").mkdir(parents=True)
    shutil.copy(where / SAMPLE, stage / SAMPLE)
    for lib in shared_libraries(where / SAMPLE):
        shutil.copy(lib, stage / "lib" / lib.name)  # follows symlinks: the soname's file
    return stage


def test_bridge_serves_libvfio_user_gpio_sample(
    emuhost_session: HostSession, emuhost_scratch: Path
) -> None:
    stage = stage_sample(emuhost_scratch)
    assert any(p.name.startswith("libvfio-user.so") for p in (stage / "lib").iterdir())
    guest = HvmGuest(name="gpio", init_script=GUEST_INIT)
    result = emuhost_session.run(DOM0_SCRIPT, guests=[guest], timeout=1500)
    serial = result.guest_serial("gpio")
    where = (result.file("status") + "\n--- bridge\n" + result.file("bridge.log")[-3000:]
             + "\n--- sample\n" + result.file("gpio.log")[-2000:]
             + "\n--- serial\n" + serial[-3000:])
    assert result.ok, result.describe() + where
    values = dict(re.findall(r"^(XDEV-[A-Z0-9-]+) (.*?)\r?$", serial, re.M))
    assert re.search(r"^XDEV-LSPCI 0000:00:05.0 \w+: 494f:0dc8", serial, re.M), where
    start, end, flags = (int(v, 16) for v in values["XDEV-BAR2"].split())
    assert flags & 0x100 and end - start + 1 == 0x100, where  # IORESOURCE_IO, 256 ports
    # All counters 0: every pin's counter is a multiple of 3.
    assert values["XDEV-IN-A"] == "ff ff", where
    # Pins 0 and 2 and pin 15 counted once.
    assert values["XDEV-IN-B"] == "fa 7f", where
    # Pin 0 three times: a multiple of 3 again; pin 2 still 1.
    assert values["XDEV-IN-C"] == "fb 7f", where
    assert "bridge exit 0" in result.file("status"), where
    print(f"\ngpio-pci-idio-16 through the bridge: found by {values['XDEV-FOUND-BY']}, "
          f"BAR2 {values['XDEV-BAR2']}, inputs {values['XDEV-IN-A']} / {values['XDEV-IN-B']} / "
          f"{values['XDEV-IN-C']}, job {result.seconds:.0f} s")
