"""Does the emulated Xen host keep its programs' memory intact, without xdev?

    python -m bridge.emuhost.selfcheck [--seconds S] [--workers N] [--guest]
                                       [--json OUT]

Boots the emulated host and runs, in dom0, ``--workers`` Python processes
that check their own work for ``--seconds``: each round compresses and
decompresses a MiB of pseudo-random bytes and compares it, hashes it
twice, and builds and sums a dictionary. Nothing of xdev runs. With
``--guest`` an HVM guest runs meanwhile, with only QEMU's own AHCI disk,
writing 16 MiB of random data to it, reading it back and comparing, in a
loop.

A sound host gives every worker thousands of clean rounds. A worker that
finds a mismatch, or dies (a segmentation fault in zlib, say), shows memory
corruption that has nothing to do with xdev; failures of the Xen tier on
such a host say little about xdev. Exit status 0 when every worker and the
guest ran clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.emuhost.guest import HvmGuest, resolve_modules
from bridge.emuhost.host import EmuHost

#: One dom0 worker: rounds of self-checked work until the stop file appears.
WORKER = r'''
import hashlib, os, random, sys, zlib
stop, n, bad = sys.argv[1], 0, 0
while not os.path.exists(stop):
    data = random.Random(n).randbytes(1 << 20)
    digest = hashlib.sha256(data).digest()
    try:
        back = zlib.decompress(zlib.compress(data, 1))
    except zlib.error as exc:
        back = None
        print("SELFCHECK-BAD", n, "zlib", exc, flush=True)
    if back is not None and (back != data or hashlib.sha256(back).digest() != digest):
        print("SELFCHECK-BAD", n, "round trip differs", flush=True)
        bad += 1
    elif back is None:
        bad += 1
    if hashlib.sha256(data).digest() != digest:
        print("SELFCHECK-BAD", n, "hash of unchanged data changed", flush=True)
        bad += 1
    table = {str(i): i for i in range(50000)}
    if sum(int(k) for k in table) != 1249975000 or sum(table.values()) != 1249975000:
        print("SELFCHECK-BAD", n, "dictionary sums differ", flush=True)
        bad += 1
    n += 1
print("SELFCHECK-DONE rounds", n, "bad", bad, flush=True)
'''

#: The guest's loop: random data to QEMU's AHCI disk and back.
GUEST = r"""
for m in /sc/mod/*.ko; do insmod $m || echo "SELFCHECK-GUEST-ERROR insmod $m"; done
i=0
while [ $i -lt 60 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i+1)); done
[ -b /dev/sda ] || { echo "SELFCHECK-GUEST-ERROR no disk"; echo SELFCHECK-GUEST-END; exit 1; }
i=0; bad=0
while [ $i -lt ROUNDS ]; do
  off=$(( (i * 16) % 224 ))
  dd if=/dev/urandom of=/tmp/w bs=1M count=16 2>/dev/null
  want=$(md5sum < /tmp/w)
  dd if=/tmp/w of=/dev/sda bs=1M seek=$off conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/sda of=/tmp/r bs=1M skip=$off count=16 2>/dev/null
  got=$(md5sum < /tmp/r)
  again=$(md5sum < /tmp/w)
  if [ "$want" != "$got" ] || [ "$want" != "$again" ]; then
    bad=$((bad+1)); echo "SELFCHECK-GUEST-BAD $i"
  fi
  rm -f /tmp/r
  i=$((i+1))
done
echo "SELFCHECK-GUEST-DONE rounds $i bad $bad"
echo SELFCHECK-GUEST-END
"""

DOM0 = r"""
. "$XDEV_LIB"
D=/var/tmp/selfcheck
mkdir -p $D && rm -f $D/stop $D/disk.img
cat > $D/worker.py <<'PYEOF'
__WORKER__
PYEOF
pids=
i=0
while [ $i -lt "$SC_WORKERS" ]; do
    python3 $D/worker.py $D/stop > "$XDEV_RUN/worker$i.txt" 2>&1 &
    pids="$pids $!"
    i=$((i+1))
done
if [ -n "$SC_GUEST" ]; then
    truncate -s 256M $D/disk.img
    xdev_guest_run selfcheck SELFCHECK-GUEST-END "$SC_GUEST_TIMEOUT"
    echo "guest $?" >> "$XDEV_RUN/status"
else
    sleep "$SC_SECONDS"
fi
touch $D/stop
i=0
for pid in $pids; do
    wait $pid
    echo "worker$i $?" >> "$XDEV_RUN/status"
    i=$((i+1))
done
dmesg | grep -E 'segfault|general protection|trap ' | tail -n 20 > "$XDEV_RUN/dom0-faults.txt"
rm -f $D/disk.img
""".replace("__WORKER__", WORKER)


@dataclass
class Verdict:
    """What one self-check run found."""

    workers: dict[str, dict[str, object]] = field(default_factory=dict)
    guest: dict[str, object] | None = None
    dom0_faults: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        guest_ok = self.guest is None or (self.guest.get("done") is True
                                          and self.guest.get("bad") == 0)
        return guest_ok and all(w["exit"] == 0 and w["bad"] == 0 and w["done"]
                                for w in self.workers.values())


def parse(status: str, outputs: dict[str, str], serial: str | None,
          faults: str) -> Verdict:
    """The verdict from dom0's status file, each worker's output, the guest's
    serial log (None without a guest) and dom0's kernel fault lines."""
    verdict = Verdict(dom0_faults=[line for line in faults.splitlines() if line.strip()])
    exits = dict(re.findall(r"^(worker\d+) (\d+)$", status, re.M))
    for name, text in sorted(outputs.items()):
        done = re.search(r"^SELFCHECK-DONE rounds (\d+) bad (\d+)$", text, re.M)
        bad_lines = re.findall(r"^SELFCHECK-BAD .*$", text, re.M)
        verdict.workers[name] = {
            "exit": int(exits[name]) if name in exits else None,
            "done": done is not None,
            "rounds": int(done.group(1)) if done else None,
            "bad": int(done.group(2)) if done else len(bad_lines) or None,
            "findings": bad_lines[:10] + ([text.strip().splitlines()[-1]]
                                          if not done and text.strip() else []),
        }
    if serial is not None:
        done = re.search(r"^SELFCHECK-GUEST-DONE rounds (\d+) bad (\d+)", serial, re.M)
        verdict.guest = {
            "done": done is not None,
            "rounds": int(done.group(1)) if done else None,
            "bad": int(done.group(2)) if done else None,
            "errors": re.findall(r"^SELFCHECK-GUEST-(?:ERROR|BAD) .*$", serial, re.M),
        }
    return verdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bridge.emuhost.selfcheck",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=int, default=200,
                    help="how long the workers run without a guest (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="dom0 worker processes (default 2)")
    ap.add_argument("--guest", action="store_true",
                    help="an HVM guest with QEMU's AHCI disk works meanwhile")
    ap.add_argument("--guest-rounds", type=int, default=24,
                    help="the guest's 16 MiB write/read-back rounds (default 24)")
    ap.add_argument("--guest-xl", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra line of the guest's xl config, e.g. hap=0 (shadow "
                         "paging instead of the emulated CPU's nested paging); repeatable")
    ap.add_argument("--json", help="write the verdict to this file")
    args = ap.parse_args(argv)
    extra_xl = []
    for item in args.guest_xl:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            ap.error(f"--guest-xl takes KEY=VALUE, not {item!r}")
        extra_xl.append((key.strip(), value.strip()))
    if args.seconds < 1 or not 1 <= args.workers <= 8 or args.guest_rounds < 1:
        ap.error("--seconds >= 1, --workers 1..8 and --guest-rounds >= 1 please")
    host = EmuHost()
    image = host.ensure_image()
    env = {"SC_WORKERS": str(args.workers), "SC_SECONDS": str(args.seconds)}
    guests: list[HvmGuest] = []
    with tempfile.TemporaryDirectory(prefix="xdev-selfcheck-") as tmp:
        if args.guest:
            files = []
            for index, (stem, data) in enumerate(resolve_modules(image.modules_dir,
                                                                 ["ahci", "sd_mod"])):
                path = Path(tmp) / f"{index:03d}-{stem}.ko"
                path.write_bytes(data)
                files.append((f"sc/mod/{path.name}", str(path)))
            guests.append(HvmGuest(
                name="selfcheck", memory_mb=256, files=tuple(files),
                init_script=GUEST.replace("ROUNDS", str(args.guest_rounds)),
                disks=("/var/tmp/selfcheck/disk.img,raw,hda,rw",),
                extra=(("hdtype", '"ahci"'), *extra_xl)))
            env["SC_GUEST"] = "1"
            env["SC_GUEST_TIMEOUT"] = str(300 + 20 * args.guest_rounds)
        started = time.monotonic()
        result = host.run(DOM0, guests=guests, env=env,
                          timeout=args.seconds + 300 + 30 * args.guest_rounds)
        elapsed = time.monotonic() - started
    outputs = {f"worker{i}": result.file(f"worker{i}.txt") for i in range(args.workers)}
    verdict = parse(result.file("status"), outputs,
                    result.guest_serial("selfcheck") if args.guest else None,
                    result.file("dom0-faults.txt"))
    report = {"clean": verdict.clean, "seconds": round(elapsed), "guest": verdict.guest,
              "guest_xl": dict(extra_xl),
              "workers": verdict.workers, "dom0_faults": verdict.dom0_faults,
              "results": str(result.results_dir)}
    print(json.dumps(report, indent=2))
    print("emulated host: " + ("no corruption seen" if verdict.clean else
                               "CORRUPTION or crashes in programs that share nothing with xdev"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if verdict.clean else 1


if __name__ == "__main__":
    sys.exit(main())
