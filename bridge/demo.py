"""``xdev-demo``: a Xen guest whose disk and NIC are served by xdev device servers.

    xdev-demo                      # no Xen here: boot the emulated Xen host and show a guest
    xdev-demo --config demo.toml   # on a Xen host (dom0): serve the guest the file describes

Where this machine is not a Xen dom0, the demo builds (once, ~2-3 min) and
boots the emulated Xen host (bridge.emuhost), and in its dom0 runs the same
code a real host runs (``python3 -m bridge.serve``): xdev-ahci serves a
64 MiB disk at 00:05.0, xdev-e1000 a NIC on a tap device at 00:06.0, both
through xdev-bridge, beside the guest's own QEMU. The guest (Linux with a
busybox initramfs) lists its PCI devices, reads a pattern dom0 wrote into
the image, writes and reads back, makes and checks an ext4 file system,
pings dom0 and moves 1 MiB each way over TCP; the demo prints what it saw,
and what dom0 found in the image afterwards. See docs/xdev-demo.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bridge import demo_scripts as ds
from bridge import serve

GUEST_NAME = "xdevdemo"


def xen_host_present() -> bool:
    """True in a Xen control domain with the xl tool stack."""
    try:
        caps = Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False
    return "control_d" in caps and shutil.which("xl") is not None


def demo_guest(*, nomsi: bool = False, name: str = GUEST_NAME) -> object:
    """The demo's HVM guest (an emuhost HvmGuest): drivers, e2fs tools, the checks."""
    from bridge.emuhost import HvmGuest
    from bridge.emuhost.guest import DEFAULT_CMDLINE

    return HvmGuest(
        name=name, init_script=ds.GUEST_INIT,
        cmdline=DEFAULT_CMDLINE + (" pci=nomsi" if nomsi else ""),
        modules=("ahci", "sd_mod", "sr_mod", "e1000", "crc32c_generic", "ext4"),
        files=ds.e2fs_files(),
    )


def run_emulated(args: argparse.Namespace) -> int:
    from bridge.emuhost import EmuHost, EmuHostError, MissingHostTool
    from bridge.emuhost.image import BOOT_TOOLS, BUILD_TOOLS, check_host_tools

    host = EmuHost()
    try:
        check_host_tools(BOOT_TOOLS)
        if host.image() is None:
            if os.geteuid() != 0:
                print("xdev-demo: the emulated Xen host's image must be built once, which "
                      "needs root (debootstrap): run it with sudo", file=sys.stderr)
                return 2
            check_host_tools(BUILD_TOOLS)
            print("building the emulated Xen host image (once; about 2-3 minutes) ...")
    except MissingHostTool as exc:
        print(f"xdev-demo: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    guest = demo_guest(nomsi=args.nomsi)
    env = {"XDEV_LAUNCHER": args.launcher, "XDEV_GUEST": GUEST_NAME,
           "XDEV_GUEST_TIMEOUT": str(int(args.timeout))}
    try:
        host.ensure_image()
        with host.session() as session:  # boots on the first job; it says where results go
            print("Xen 4.17 under QEMU TCG: dom0 boots (30-60 s), then serves the guest "
                  "(about 3-5 minutes) ...")
            result = session.run(ds.DOM0_SCRIPT, guests=[guest],  # type: ignore[list-item]
                                 env=env, timeout=args.timeout + 300)
    except EmuHostError as exc:
        print(f"xdev-demo: the emulated host failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xdev-demo: interrupted; the emulated host is shut down", file=sys.stderr)
        return 130
    ok = print_report(result.guest_serial(GUEST_NAME), result.file("results.txt"),
                      result.file("serve.log"))
    print(f"\ntotal {time.monotonic() - started:.0f} s; everything the run produced is in "
          f"{result.results_dir}")
    if not result.ok:
        print(f"xdev-demo: dom0 job failed: {result.describe()}", file=sys.stderr)
    return 0 if ok and result.ok else 1


def print_report(serial: str, results: str, serve_log: str) -> bool:
    """Print what the guest did and what dom0 found; True if every check passed."""
    g = ds.parse_guest(serial)
    r = ds.parse_results(results)

    def val(key: str) -> str:
        return g.get(key, (0.0, "(missing)"))[1]

    def at(key: str) -> str:
        return f"[{g[key][0]:6.1f} s]" if key in g else "[   -   ]"

    checks: list[tuple[str, bool]] = []
    print("\n--- dom0 (bridge.serve) ---")
    for line in serve_log.splitlines():
        if line.startswith("["):
            print("  " + line)
    print("--- the guest (times are guest uptime) ---")
    print(f"{at('found-by')} PCI devices (found at {val('found-by')}):")
    for line in val("lspci").splitlines():
        mark = "  <- xdev" if " 0000:00:05.0 " in f" {line} " or " 0000:00:06.0 " in \
            f" {line} " else ""
        print(f"             {line}{mark}")
    print(f"{at('ahci-driver')} 00:05.0 driver: {val('ahci-driver')}, interrupts: "
          f"{val('ahci-irq')}")
    checks.append(("ahci driver bound", val("ahci-driver") == "ahci"))
    print(f"{at('disk')} disk: {val('disk')}")
    cd_ok = val("cdrom-sha") == ds.cd_sha256()
    checks.append(("CD drive read", cd_ok))
    print(f"{at('cdrom')} CD drive: {val('cdrom')}; its 1 MiB: "
          f"{'matches the ISO' if cd_ok else 'WRONG ' + val('cdrom-sha')}")
    pattern_ok = val("pattern") == ds.pattern_sha256()
    checks.append(("pattern read", pattern_ok))
    print(f"{at('pattern')} read dom0's 1 MiB pattern at {ds.PATTERN_MB} MiB: "
          f"{'matches' if pattern_ok else 'WRONG ' + val('pattern')}")
    wrote = val("wrote")
    back_ok = wrote == val("readback") and len(wrote) == 64
    checks.append(("write/read back", back_ok))
    print(f"{at('readback')} wrote 1 MiB at {ds.GUEST_WRITE_MB} MiB and read it back (O_DIRECT): "
          f"{'same' if back_ok else 'DIFFERENT'}")
    if "mkfs" in g:
        files = val("files").split()
        fs_ok = val("mkfs").startswith("0") and val("mount") == "0" and \
            val("fsck").startswith("0") and len(files) == 2 and files[0] == files[1]
        checks.append(("ext4", fs_ok))
        print(f"{at('fsck')} mkfs.ext4, mount, 21 files, umount, remount, fsck -n: "
              f"{'clean' if fs_ok else 'FAILED'} (fsck: {val('fsck')})")
    print(f"{at('e1000-driver')} 00:06.0 driver: {val('e1000-driver')}, interrupts: "
          f"{val('e1000-irq')}")
    checks.append(("e1000 driver bound", val("e1000-driver") == "e1000"))
    print(f"{at('link')} link: {val('link')}")
    ping = val("ping")
    checks.append(("ping", " 0% packet loss" in ping))
    print(f"{at('ping')} ping {ds.DOM0_IP}: {ping}")
    up_ok = r.get("up-received", "").split()[:1] == val("up-sha").split()[:1]
    down_ok = r.get("down-sent", "").split()[:1] == val("down-sha").split()[:1]
    checks += [("TCP upload", up_ok), ("TCP download", down_ok)]
    print(f"{at('up-sent')} 1 MiB guest -> dom0 over TCP: "
          f"{'checksums match' if up_ok else 'MISMATCH'}")
    print(f"{at('down-sha')} 1 MiB dom0 -> guest over TCP: "
          f"{'checksums match' if down_ok else 'MISMATCH'}")
    print("--- dom0 after the guest ---")
    image_ok = r.get("image-write") == val("wrote") and \
        r.get("image-pattern") == ds.pattern_sha256()
    checks.append(("image on dom0", image_ok))
    print(f"  image holds the guest's 1 MiB and the pattern: {'yes' if image_ok else 'NO'}")
    if "mkfs" in g:
        fsck_ok = r.get("image-fsck") == "0" and "hello from the xdev guest" in \
            r.get("image-hello", "")
        checks.append(("dom0 e2fsck", fsck_ok))
        print(f"  e2fsck -n on the image: status {r.get('image-fsck')}; /hello.txt: "
              f"{r.get('image-hello', '')!r}")
        files_ok = r.get("image-files") == "ok"
        checks.append(("files in the image", files_ok))
        print(f"  the guest's {ds.FILES} files, block by block: {r.get('image-files', '?')}")
    failed = [name for name, good in checks if not good]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return not failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xdev-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path,
                    help="on a Xen host: the guest to serve (TOML, docs/xdev-demo.md)")
    ap.add_argument("--report", type=Path, help="with --config: step timings as JSON")
    ap.add_argument("--emulated", action="store_true",
                    help="use the emulated Xen host even on a Xen host")
    ap.add_argument("--launcher", choices=["systemd", "process"], default="systemd",
                    help="emulated host: start the daemons as systemd units (default) "
                         "or as plain processes")
    ap.add_argument("--nomsi", action="store_true",
                    help="emulated host: boot the guest with pci=nomsi (INTx only)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds the guest may take (default 900)")
    args = ap.parse_args(argv)
    if args.config is not None:
        if not xen_host_present():
            print("xdev-demo: --config needs a Xen dom0 with xl; without one, run xdev-demo "
                  "without --config for the emulated host", file=sys.stderr)
            return 2
        extra = ["--report", str(args.report)] if args.report else []
        return serve.main(["--config", str(args.config), *extra])
    if xen_host_present() and not args.emulated:
        print("xdev-demo: this is a Xen dom0: give --config FILE (docs/xdev-demo.md), "
              "or --emulated", file=sys.stderr)
        return 2
    return run_emulated(args)


if __name__ == "__main__":
    sys.exit(main())
