#!/bin/sh
# Per-run boot script, copied into the run share by bridge.emuhost.host for
# every run (so it changes without an image rebuild). Runs as root in dom0
# from xdev-emuhost.service. Writes, in the run share:
#   boot.log       this script's own trace
#   output.log     stdout+stderr of run.sh
#   xl-dmesg.txt, journal.txt, xen-logs/   for debugging
#   exit_status    run.sh's exit status, written last (the host waits for it)
R=/xdev/run
exec >"$R/boot.log" 2>&1
set -u
echo "boot.sh: started at dom0 uptime $(cut -d' ' -f1 /proc/uptime) s"
. "$R/env"

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
echo "boot.sh: xl ready at dom0 uptime $(cut -d' ' -f1 /proc/uptime) s"
cut -d' ' -f1 /proc/uptime > "$R/dom0-ready-uptime"

cd "$R"
timeout -k 5 "$XDEV_SCRIPT_TIMEOUT" /bin/sh "$R/run.sh" >"$R/output.log" 2>&1
status=$?
echo "boot.sh: run.sh exited with status $status at uptime $(cut -d' ' -f1 /proc/uptime) s"

xl dmesg >"$R/xl-dmesg.txt" 2>&1
journalctl -b --no-pager >"$R/journal.txt" 2>&1
mkdir -p "$R/xen-logs" && cp -r /var/log/xen/. "$R/xen-logs/" 2>/dev/null
echo "$status" >"$R/exit_status.tmp" && mv "$R/exit_status.tmp" "$R/exit_status"
sync
[ "${XDEV_POWEROFF:-1}" = 1 ] && poweroff -f
