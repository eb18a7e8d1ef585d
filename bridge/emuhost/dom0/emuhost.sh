# Shell helpers for run scripts in dom0 of the emulated Xen host.
# Source it: . "$XDEV_LIB". Guests are prepared on the host side
# (bridge.emuhost.guest.HvmGuest); their files are in $XDEV_RUN/guests/.

# xdev_guest_start NAME [XL-CREATE-OPTIONS...]: create the guest from its
# prepared xl config; e.g. "-p" creates it paused (attach an ioreq server,
# then "xl unpause NAME").
xdev_guest_start() {
    _name=$1
    shift
    : >"$XDEV_RUN/guests/$_name.serial"
    date +%s >"$XDEV_RUN/guests/$_name.created"
    xl create "$@" "$XDEV_RUN/guests/$_name.cfg"
}

# xdev_guest_wait NAME MARKER [TIMEOUT_S]: wait until MARKER (a fixed string)
# appears in the guest's serial log. Returns 1 on timeout, 2 if the guest
# died without printing it.
xdev_guest_wait() {
    _serial="$XDEV_RUN/guests/$1.serial"
    _deadline=$(( $(date +%s) + ${3:-120} ))
    _missing=0
    while [ "$(date +%s)" -lt "$_deadline" ]; do
        # Through a pipe: GNU grep reading the 9p file itself was seen spinning
        # for minutes (state R) after the marker had arrived.
        if cat "$_serial" 2>/dev/null | grep -qF -- "$2"; then
            _since=$(cat "$XDEV_RUN/guests/$1.created" 2>/dev/null || date +%s)
            echo "xdev_guest_wait: $1 printed '$2' $(( $(date +%s) - _since )) s after xl create" >&2
            return 0
        fi
        # xl can fail transiently when dom0 is starved; believe "gone" after three misses in a row.
        if xl list "$1" >/dev/null 2>&1; then
            _missing=0
        else
            _missing=$((_missing + 1))
        fi
        if [ "$_missing" -ge 3 ]; then
            cat "$_serial" 2>/dev/null | grep -qF -- "$2" && return 0
            echo "xdev_guest_wait: guest $1 is gone without printing '$2'; xl dmesg tail:" >&2
            xl dmesg 2>&1 | grep -v ' save: ' | tail -n 15 >&2
            return 2
        fi
        sleep 1
    done
    echo "xdev_guest_wait: no '$2' from guest $1 within ${3:-120} s; xl list:" >&2
    xl list >&2 2>&1
    return 1
}

# xdev_guest_destroy NAME: stop the guest if it is still there.
xdev_guest_destroy() {
    xl destroy "$1" 2>/dev/null || true
}

# xdev_guest_run NAME MARKER [TIMEOUT_S]: start, wait for MARKER, destroy.
xdev_guest_run() {
    xdev_guest_start "$1" || return 3
    xdev_guest_wait "$1" "$2" "${3:-120}"
    _rc=$?
    xdev_guest_destroy "$1"
    return $_rc
}

# xdev_bridge_start GUEST LOG DEVICE...: start xdev-bridge for GUEST with one
# --device per DEVICE ("BB:DD.F=unix:PATH"), stderr appended to LOG, and wait
# until it publishes state "running" in xenstore. Python has been seen to die
# at start-up under TCG, so up to three attempts. Sets XDEV_BRIDGE_PID;
# returns 1 if no attempt got there.
xdev_bridge_start() {
    _guest=$1
    _log=$2
    shift 2
    _devs=
    for _d in "$@"; do _devs="$_devs --device $_d"; done
    for _attempt in 1 2 3; do
        python3 -m bridge.cli --domain "$_guest" $_devs 2>> "$_log" &
        XDEV_BRIDGE_PID=$!
        _i=0
        while [ $_i -lt 240 ]; do
            _xdev_bridge_running && return 0
            kill -0 $XDEV_BRIDGE_PID 2>/dev/null || break
            sleep 0.5
            _i=$((_i + 1))
        done
        _xdev_bridge_running && return 0
        kill $XDEV_BRIDGE_PID 2>/dev/null
        echo "xdev_bridge_start: attempt $_attempt failed" >&2
    done
    return 1
}

_xdev_bridge_running() {
    xenstore-ls /local/domain/0/xdev 2>/dev/null | grep -q 'state = "running"'
}
