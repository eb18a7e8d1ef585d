#!/usr/bin/env python3
"""Stands in for qemu-system-x86_64 in the session tests: plays dom0's job loop.

It reads the run share's host path from the ``-virtfs ...mount_tag=xdevrun``
argument and speaks the same file protocol as dom0's boot.sh (jobs/NNN/ready
-> run run.sh on the host -> exit_status; shutdown -> exit). FAKE_DOM0 picks a
misbehaviour: "ok", "hang" (never answers a job), "die" (exits at once),
"deaf" (ignores shutdown).
"""

import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    mode = os.environ.get("FAKE_DOM0", "ok")
    run_dir = None
    for arg in sys.argv:
        if "mount_tag=xdevrun" in arg:
            run_dir = Path(arg.split("path=", 1)[1].split(",", 1)[0])
    if run_dir is None:
        return 64
    if mode == "die":
        return 3
    (run_dir / "dom0-ready-uptime").write_text("1.0\n")
    number = 0
    while True:
        job = run_dir / "jobs" / f"{number:03d}"
        if (job / "ready").exists():
            if mode == "hang":
                time.sleep(3600)
            with open(job / "output.log", "wb") as out:
                status = subprocess.call(["sh", "run.sh"], cwd=job, stdout=out, stderr=out)
            (job / "exit_status").write_text(f"{status}\n")
            number += 1
            continue
        if (run_dir / "shutdown").exists() and mode != "deaf":
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
