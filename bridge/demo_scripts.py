"""What the demo's guest and dom0 do, as scripts, and how to read the guest's answers.

The guest (a busybox initramfs, see bridge.emuhost.guest) prints one line
per finding on its serial port, ``XDEV <uptime> <key> <value...>``;
:func:`parse_guest` turns them into a dict of key -> (uptime, value). The
same scripts drive the Xen test tier (tests/e2e/xen/test_xdev_devices.py)
and ``xdev-demo`` on the emulated host.

Disk layout (64 MiB image written by dom0 before the guest starts):

* 0 .. 48 MiB: the guest's ext4 file system (mkfs.ext4 with a block count);
* at 49 MiB: 5 MiB whose every 4 KiB block names its file and block
  (dom0 wrote it; the guest copies it into 20 files on its file system, and
  dom0 checks each file's blocks in the image after the guest is gone);
* at 56 MiB: 1 MiB of a known pattern (dom0 wrote it, the guest checks it);
* at 60 MiB: 1 MiB the guest writes from /dev/urandom and reads back
  (O_DIRECT), and dom0 checks after the guest is gone.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

DISK_MB = 64
FS_MB = 48
FILES_MB = 49
FILES = 20
FILE_BLOCKS = 64  # 4 KiB blocks per file: 256 KiB
PATTERN_MB = 56
GUEST_WRITE_MB = 60
TAP = "xdevtap0"
DOM0_IP = "169.254.77.1"
GUEST_IP = "169.254.77.2"
MARKER = "XDEV-DEMO-DONE"
BOOT_MARKER = "XDEV-BOOTSECTOR-RAN"
E2FS_DIR = "/opt/e2fs"


def pattern_block() -> bytes:
    """1 MiB whose every 16 bytes name their offset: a misplaced sector shows."""
    return b"".join(b"xdev%012x" % off for off in range(0, 1 << 20, 16))


def pattern_sha256() -> str:
    return hashlib.sha256(pattern_block()).hexdigest()


CD_VOLUME = "XDEV_DEMO_CD"
CD_SECTORS = 512  # 1 MiB of 2048-byte sectors


def cd_image() -> bytes:
    """The demo's CD: an ISO 9660 volume's descriptors (ECMA-119 8.4, 8.3:
    the primary volume descriptor at sector 16 naming :data:`CD_VOLUME`
    and the volume's size, the set terminator at 17) and sectors naming
    their number after them, so a misplaced one shows."""
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[8:40] = b" " * 32  # system identifier
    pvd[40:72] = CD_VOLUME.encode().ljust(32)
    pvd[80:88] = CD_SECTORS.to_bytes(4, "little") + CD_SECTORS.to_bytes(4, "big")
    pvd[120:124] = b"\x01\x00\x00\x01"  # volume set size, both byte orders
    pvd[124:128] = b"\x01\x00\x00\x01"  # volume sequence number
    pvd[128:132] = b"\x00\x08\x08\x00"  # logical block size 2048
    pvd[881] = 1  # file structure version
    terminator = b"\xffCD001\x01".ljust(2048, b"\0")
    data = b"".join((b"xdev cd sector %06d;" % n * 100)[:2048] for n in range(18, CD_SECTORS))
    return bytes(16 * 2048) + bytes(pvd) + terminator + data


def cd_sha256() -> str:
    return hashlib.sha256(cd_image()).hexdigest()


def file_block(index: int, block: int) -> bytes:
    """Block ``block`` of the guest's file ``index``: 4 KiB naming both."""
    name = b"xdev file %02d block %02d;" % (index, block)
    return (name * (4096 // len(name) + 1))[:4096]


def files_source() -> bytes:
    """What dom0 writes at FILES_MB: the guest's files, one after the other."""
    return b"".join(file_block(i, b) for i in range(FILES) for b in range(FILE_BLOCKS))


def check_files(read_file, locate=None) -> str:
    """``ok``, or which blocks of which files are wrong and what they hold
    instead (another block, zeros, something else); ``read_file(name)``
    returns a file's bytes from the image or None, ``locate(name, block)``
    where the block is on the disk (a string) if given."""
    wrong = []
    for i in range(FILES):
        data = read_file(f"file{i}")
        if data is None or len(data) != FILE_BLOCKS * 4096:
            wrong.append(f"file{i}: {'missing' if data is None else f'{len(data)} bytes'}")
            continue
        for b in range(FILE_BLOCKS):
            got = data[b * 4096:(b + 1) * 4096]
            want = file_block(i, b)
            if got != want:
                where = f" at {locate(f'file{i}', b)}" if locate else ""
                wrong.append(f"file{i} block {b}{where}: {_describe(got, want)}")
    return "ok" if not wrong else f"{len(wrong)} bad: " + "; ".join(wrong[:8])


_NAME = re.compile(rb"xdev file (\d\d) block (\d\d);")


def _describe(got: bytes, want: bytes) -> str:
    """What a wrong 4 KiB block holds, per 512-byte sector: ``ok``, ``zero``,
    ``fFFbBB`` (a sector of that file's block), or ``?`` (other bytes)."""
    if not got.strip(b"\0"):
        return "zeros"
    marks = []
    for at in range(0, 4096, 512):
        sector = got[at:at + 512]
        name = _NAME.search(sector)
        marks.append("ok" if sector == want[at:at + 512] else
                     "zero" if not sector.strip(b"\0") else
                     f"f{name[1].decode()}b{name[2].decode()}" if name else "?")
    return "sectors " + ",".join(marks)


def check_image_files(image: str) -> str:
    """:func:`check_files` on the guest's ext4 file system in ``image``
    (debugfs, read-only)."""
    def read(name: str) -> bytes | None:
        out = subprocess.run(["debugfs", "-R", f"cat /{name}", image],
                             capture_output=True, check=False)
        return out.stdout if out.returncode == 0 and out.stdout else None

    stats = subprocess.run(["debugfs", "-R", "stats", image], capture_output=True,
                           text=True, errors="replace", check=False).stdout
    size = re.search(r"^Block size:\s+(\d+)", stats, re.M)
    block_size = int(size[1]) if size else 4096

    def locate(name: str, block: int) -> str:
        index = block * 4096 // block_size
        out = subprocess.run(["debugfs", "-R", f"bmap /{name} {index}", image],
                             capture_output=True, text=True, errors="replace", check=False)
        fs_block = out.stdout.strip()
        return f"sector {int(fs_block) * block_size // 512}" if fs_block.isdigit() else "?"
    return check_files(read, locate)


def boot_sector(message: str = BOOT_MARKER) -> bytes:
    """A 512-byte MBR that writes ``message`` to COM1 (port 0x3f8) and halts.

    Loaded by the BIOS at 0000:7C00 (BIOS boot specification 1.01, 6.5.1);
    the UART's transmit register takes bytes without set-up in QEMU.
    """
    msg = message.encode() + b"\r\n\0"
    code = bytearray()
    code += b"\xfa\xfc"                 # cli; cld
    code += b"\x31\xc0\x8e\xd8"         # xor ax,ax; mov ds,ax
    si_at = len(code) + 1
    code += b"\xbe\x00\x00"             # mov si, msg (patched below)
    code += b"\xba\xf8\x03"             # mov dx, 0x3f8
    loop = len(code)
    code += b"\xac\x84\xc0\x74\x03\xee"  # lodsb; test al,al; jz done; out dx,al
    code += b"\xeb" + bytes([(loop - (len(code) + 2)) & 0xFF])  # jmp loop
    code += b"\xf4\xeb\xfd"             # done: hlt; jmp done
    code[si_at:si_at + 2] = (0x7C00 + len(code)).to_bytes(2, "little")
    sector = bytes(code) + msg
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def e2fs_files() -> tuple[tuple[str, str], ...]:
    """mkfs.ext4 and e2fsck from this host, with their libraries, for the guest.

    Busybox has neither; ``ldd`` names the libraries (the guest runs the
    same x86-64 glibc binaries). Empty if the host has no e2fsprogs.
    """
    tools = [shutil.which(t, path="/usr/sbin:/sbin:/usr/bin") for t in ("mke2fs", "e2fsck")]
    if not all(tools) or shutil.which("ldd") is None:
        return ()
    files = {}
    for tool in tools:
        assert tool is not None
        files[f"{E2FS_DIR}/{Path(tool).name}"] = str(Path(tool).resolve())
        out = subprocess.run(["ldd", tool], capture_output=True, text=True, check=False).stdout
        for lib in re.findall(r"(/\S+\.so[.\d]*)", out):
            files[lib] = str(Path(lib).resolve())
    return tuple(sorted(files.items()))


GUEST_INIT = rf"""
say() {{ echo "XDEV $(cut -d' ' -f1 /proc/uptime) $*"; }}
say up "$(cat /proc/cmdline)"
ahci=/sys/bus/pci/devices/0000:00:05.0
nic=/sys/bus/pci/devices/0000:00:06.0
how=boot
i=0
while {{ [ ! -e $ahci ] || [ ! -e $nic ]; }} && [ $i -lt 60 ]; do
    how=rescan; echo 1 > /sys/bus/pci/rescan; sleep 1; i=$((i+1))
done
say found-by $how
lspci | while read -r line; do say lspci "$line"; done
drv() {{ d=$(readlink "$1/driver"); echo "${{d##*/}}"; }}
irq() {{ if [ -n "$(ls "$1/msi_irqs" 2>/dev/null)" ]; then echo msi; else echo intx; fi; }}

# --- disk: xdev AHCI at 00:05.0
say ahci-driver "$(drv $ahci)"
disk=; cd=
i=0
# The disk, and the CD drive on the next port (given 20 s more to show).
while [ $i -lt 60 ] && {{ [ -z "$disk" ] || {{ [ -z "$cd" ] && [ $i -lt 20 ]; }}; }}; do
    for b in $ahci/ata*/host*/target*/*/block/*; do
        n=${{b##*/}}
        case $n in sd*) disk=$n ;; sr*) cd=$n ;; esac
    done
    [ -n "$disk" ] && [ -n "$cd" ] || sleep 1
    i=$((i+1))
done
say ahci-irq "$(irq $ahci) $(grep -m1 ahci /proc/interrupts | tr -s ' ' | cut -d' ' -f2-3)"
if [ -n "$disk" ]; then
    say disk "$disk $(( $(cat /sys/block/$disk/size) / 2048 )) MiB"
    if [ -n "$cd" ]; then
        say cdrom "$cd $(( $(cat /sys/block/$cd/size) / 4 )) sectors, volume \
$(dd if=/dev/$cd bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null)"
        say cdrom-sha "$(dd if=/dev/$cd bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
    fi
    say pattern "$(dd if=/dev/$disk bs=1M skip={PATTERN_MB} count=1 iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1)"
    dd if=/dev/urandom of=/tmp/w.bin bs=1M count=1 2>/dev/null
    t=$(cut -d' ' -f1 /proc/uptime)
    dd if=/tmp/w.bin of=/dev/$disk bs=1M seek={GUEST_WRITE_MB} count=1 oflag=direct conv=fsync \
        2>/dev/null
    say wrote "$(sha256sum < /tmp/w.bin | cut -d' ' -f1)"
    say readback "$(dd if=/dev/$disk bs=1M skip={GUEST_WRITE_MB} count=1 iflag=direct \
        2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [ -x {E2FS_DIR}/mke2fs ]; then
        {E2FS_DIR}/mke2fs -q -F -t ext4 /dev/$disk {FS_MB * 1024}k >/tmp/mkfs.log 2>&1
        say mkfs "$? $(tail -n1 /tmp/mkfs.log)"
        mkdir -p /mnt
        mount -t ext4 /dev/$disk /mnt; say mount $?
        dd if=/dev/$disk of=/tmp/src.bin bs=1M skip={FILES_MB} count={FILES * FILE_BLOCKS // 256} \
            iflag=direct 2>/dev/null
        say files-source "$(sha256sum < /tmp/src.bin | cut -d' ' -f1)"
        i=0; while [ $i -lt {FILES} ]; do
            dd if=/tmp/src.bin of=/mnt/file$i bs=4k skip=$((i * {FILE_BLOCKS})) \
                count={FILE_BLOCKS} 2>/dev/null; i=$((i+1)); done
        rm -f /tmp/src.bin
        echo "hello from the xdev guest" > /mnt/hello.txt
        cat /mnt/file* | sha256sum | cut -d' ' -f1 > /tmp/files.sha
        sync; umount /mnt; say umount $?
        mount -t ext4 -o ro /dev/$disk /mnt
        say files "$(cat /mnt/file* | sha256sum | cut -d' ' -f1) $(cat /tmp/files.sha)"
        umount /mnt
        {E2FS_DIR}/e2fsck -n -f /dev/$disk >/tmp/fsck.log 2>&1
        say fsck "$? $(tail -n1 /tmp/fsck.log)"
    fi
fi

# --- NIC: xdev e1000 at 00:06.0
say e1000-driver "$(drv $nic)"
say e1000-irq "$(irq $nic)"
eth=$(ls $nic/net 2>/dev/null | head -n1)
if [ -n "$eth" ]; then
    ip link set $eth up
    ip addr add {GUEST_IP}/24 dev $eth
    i=0; while [ "$(cat /sys/class/net/$eth/carrier 2>/dev/null)" != 1 ] && [ $i -lt 30 ]; do
        sleep 1; i=$((i+1)); done
    say link "$eth carrier=$(cat /sys/class/net/$eth/carrier) $(cat /sys/class/net/$eth/address)"
    say ping "$(ping -c 3 -W 5 {DOM0_IP} 2>&1 | grep -E 'transmitted|round-trip' | tr '\n' ' ')"
    st=/sys/class/net/$eth/statistics
    say eth-stats "tx $(cat $st/tx_packets) rx $(cat $st/rx_packets) rx_missed \
$(cat $st/rx_missed_errors) irqs $(grep -m1 "$eth" /proc/interrupts | tr -s ' ' | cut -d' ' -f2-4)"
    say arp "$(tail -n +2 /proc/net/arp | tr -s ' ' | tr '\n' ';')"
    dd if=/dev/urandom of=/tmp/up.bin bs=64k count=16 2>/dev/null
    say up-sha "$(sha256sum < /tmp/up.bin | cut -d' ' -f1)"
    t=$(cut -d' ' -f1 /proc/uptime)
    nc {DOM0_IP} 5001 < /tmp/up.bin; say up-sent "$? $t"
    nc {DOM0_IP} 5002 < /dev/zero > /tmp/down.bin
    say down-sha "$(sha256sum < /tmp/down.bin | cut -d' ' -f1) $(wc -c < /tmp/down.bin) $t"
fi
say dmesg-errors "$(dmesg | grep -ciE 'error|fail|timeout|exception')"
dmesg | grep -iE 'error|fail|timeout|exception' | head -n 5 | while read -r line; do
    say dmesg "$line"; done
say done
echo {MARKER}
"""


#: dom0 side of one demo run: image, network peers, bridge.serve, checks.
#: Needs XDEV_LAUNCHER (process|systemd) and XDEV_GUEST; writes results.txt.
#: XDEV_FOREIGN_DMA=true: the servers map the guest themselves ("process").
#: XDEV_DIRECT_IOREQ=true: the servers serve their BARs' ioreqs themselves.
DOM0_SCRIPT = rf"""
export PYTHONPYCACHEPREFIX=/var/cache/xdev-pycache PYTHONFAULTHANDLER=1
R="$XDEV_RUN"
res() {{ echo "$*" >> "$R/results.txt"; }}
IMG=/var/lib/xdev/images/demo.img
ISO=/var/lib/xdev/images/demo.iso
# Byte code for every module the daemons import, written once into a cache
# that the sandboxed units can read (their /tmp is private, and with a
# pycache prefix even the standard library would be compiled at each start).
python3 -c 'import bridge.serve, bridge.cli, servers.ahci.cli, servers.e1000.cli'
mkdir -p /var/lib/xdev/images /run/xdev
rm -f "$IMG"
truncate -s {DISK_MB}M "$IMG"
python3 -c 'import sys; from bridge.demo_scripts import pattern_block as p; \
sys.stdout.buffer.write(p())' | dd of="$IMG" bs=1M seek={PATTERN_MB} conv=notrunc 2>/dev/null
res "pattern-written $(dd if="$IMG" bs=1M skip={PATTERN_MB} count=1 2>/dev/null \
    | sha256sum | cut -d' ' -f1)"
python3 -c 'import sys; from bridge.demo_scripts import files_source as f; \
sys.stdout.buffer.write(f())' | dd of="$IMG" bs=1M seek={FILES_MB} conv=notrunc 2>/dev/null
python3 -c 'import sys; from bridge.demo_scripts import cd_image as c; \
sys.stdout.buffer.write(c())' > "$ISO"

if [ "$XDEV_LAUNCHER" = systemd ]; then
    mkdir -p /usr/local/lib/xdev/bin
    for pair in ahci:servers.ahci e1000:servers.e1000.cli bridge:bridge.cli; do
        name=${{pair%%:*}}; mod=${{pair#*:}}
        {{ echo '#!/bin/sh'
          echo 'export PYTHONPATH=/xdev/repo PYTHONPYCACHEPREFIX=/var/cache/xdev-pycache'
          echo 'export PYTHONFAULTHANDLER=1'
          echo "exec python3 -m $mod \"\$@\""; }} > /usr/local/lib/xdev/bin/xdev-$name
        chmod 755 /usr/local/lib/xdev/bin/xdev-$name
    done
    python3 -m xdevproto.units install --bindir /usr/local/lib/xdev/bin > /dev/null
    systemctl daemon-reload
fi

# The dom0 ends of the TCP transfers (busybox nc: a listener that sends
# nothing until the peer closes, and one that sends a file and closes).
head -c 1048576 /dev/urandom > /tmp/down.bin
res "down-sent $(sha256sum < /tmp/down.bin | cut -d' ' -f1) $(wc -c < /tmp/down.bin)"
(sleep 3000 | busybox nc -l -p 5001 > /tmp/up.bin) &
up_nc=$!
busybox nc -l -p 5002 < /tmp/down.bin > /dev/null &
down_nc=$!

cat > "$R/demo.toml" <<EOF
[guest]
xl_config = "$R/guests/$XDEV_GUEST.cfg"
serial = "$R/guests/$XDEV_GUEST.serial"
marker = "{MARKER}"
timeout_s = ${{XDEV_GUEST_TIMEOUT:-900}}
[disk]
image = "$IMG"
cdrom = "$ISO"
engine = "${{XDEV_AHCI_ENGINE:-native}}"
log_level = "${{XDEV_AHCI_LOG_LEVEL:-info}}"
[nic]
tap = "{TAP}"
host_address = "{DOM0_IP}/24"
[run]
launcher = "$XDEV_LAUNCHER"
log_dir = "$R/logs"
foreign_dma = ${{XDEV_FOREIGN_DMA:-false}}
direct_ioreq = ${{XDEV_DIRECT_IOREQ:-false}}
EOF
if [ -n "$XDEV_LVU_STAGE" ]; then
    # libvfio-user copied from the host (tests/e2e/xen/lvu_stage.py): off the
    # 9p share onto local disk, and found by the servers started from here.
    rm -rf /tmp/lvu-lib && cp -r "$XDEV_LVU_STAGE" /tmp/lvu-lib
    export LD_LIBRARY_PATH=/tmp/lvu-lib XDEV_LVU_LIBRARY=/tmp/lvu-lib/libvfio-user.so.0
fi
: > "$R/guests/$XDEV_GUEST.serial"
python3 -m bridge.serve --config "$R/demo.toml" --report "$R/serve.json" > "$R/serve.log" 2>&1
res "serve-status $?"

sleep 1
res "up-received $(sha256sum < /tmp/up.bin | cut -d' ' -f1) $(wc -c < /tmp/up.bin)"
kill $up_nc $down_nc 2>/dev/null
res "image-write $(dd if="$IMG" bs=1M skip={GUEST_WRITE_MB} count=1 2>/dev/null \
    | sha256sum | cut -d' ' -f1)"
res "image-pattern $(dd if="$IMG" bs=1M skip={PATTERN_MB} count=1 2>/dev/null \
    | sha256sum | cut -d' ' -f1)"
e2fsck -n -f "$IMG" > "$R/fsck-dom0.log" 2>&1
res "image-fsck $?"
res "image-hello $(debugfs -R 'cat /hello.txt' "$IMG" 2>/dev/null)"
res "image-files $(python3 -c 'import sys; from bridge.demo_scripts import check_image_files \
as c; print(c(sys.argv[1]))' "$IMG")"
if [ "$XDEV_LAUNCHER" = systemd ]; then
    journalctl --no-pager -o short-monotonic -u 'xdev-*' > "$R/units-journal.txt" 2>&1
fi
exit 0
"""


_LINE = re.compile(r"^XDEV (\d+\.\d+) (\S+) ?(.*?)\r?$", re.M)


def parse_guest(serial: str) -> dict[str, tuple[float, str]]:
    """The guest's ``XDEV <uptime> <key> <value>`` lines; ``lspci`` and
    ``dmesg`` lines joined."""
    found: dict[str, tuple[float, str]] = {}
    for uptime, key, value in _LINE.findall(serial):
        if key in found and key in ("lspci", "dmesg"):
            found[key] = (found[key][0], found[key][1] + "\n" + value)
        else:
            found[key] = (float(uptime), value)
    return found


def parse_results(text: str) -> dict[str, str]:
    """dom0's ``results.txt``: ``key value...`` per line."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out
