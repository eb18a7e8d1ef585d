#!/bin/sh
# Per-boot script, copied into the run share by bridge.emuhost.host at every
# boot (so it changes without an image rebuild). Runs as root in dom0 from
# xdev-emuhost.service and serves jobs until the host asks it to stop:
#
#   $R/jobs/NNN/ready     the host finished writing job NNN (000, 001, ...)
#   $R/shutdown           no more jobs: collect logs and power off
#
# For each job it writes into the job directory:
#   output.log            stdout+stderr of run.sh
#   xl-dmesg.txt, journal.txt, xen-logs/   for debugging
#   exit_status           run.sh's exit status, written last
R=/xdev/run
exec >"$R/boot.log" 2>&1
set -u
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "boot.sh: started at dom0 uptime $(uptime_s) s"

# Other shares: one "TAG MOUNTPOINT ro|rw" per line.
while read -r tag point mode; do
    [ -n "$tag" ] || continue
    mkdir -p "$point"
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$mode" "$tag" "$point" \
        || echo "boot.sh: mounting share $tag at $point failed"
done < "$R/shares"

# xenstored and xenconsoled come from the xen init script; wait until xl works.
tries=0
until xl info >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then echo "boot.sh: xl info still failing"; break; fi
    sleep 1
done
echo "boot.sh: xl ready at dom0 uptime $(uptime_s) s"
uptime_s > "$R/dom0-ready-uptime"

run_job() {
    J=$1
    echo "boot.sh: job $J started at uptime $(uptime_s) s"
    # A subshell, so that one job's environment and cwd do not leak into the next.
    (
        . "$J/env"
        cd "$J" && exec timeout -k 5 "$XDEV_SCRIPT_TIMEOUT" /bin/sh "$J/run.sh"
    ) >"$J/output.log" 2>&1 </dev/null
    status=$?
    echo "boot.sh: job $J exited with status $status at uptime $(uptime_s) s"
    # Guests a job left behind would clash with the next job's names.
    xl list 2>/dev/null | awk 'NR > 2 { print $1 }' | while read -r dom; do
        xl destroy "$dom" || true
    done
    xl dmesg >"$J/xl-dmesg.txt" 2>&1
    journalctl -b --no-pager >"$J/journal.txt" 2>&1
    mkdir -p "$J/xen-logs" && cp -r /var/log/xen/. "$J/xen-logs/" 2>/dev/null
    echo "$status" >"$J/exit_status.tmp" && mv "$J/exit_status.tmp" "$J/exit_status"
    sync
}

n=0
while :; do
    J=$(printf '%s/jobs/%03d' "$R" "$n")
    if [ -f "$J/ready" ]; then
        run_job "$J"
        n=$((n + 1))
        continue
    fi
    [ -f "$R/shutdown" ] && break
    sleep 0.3
done
echo "boot.sh: shutting down at uptime $(uptime_s) s"
sync
poweroff -f
