"""Documented divergences of widely used peers.

A failure listed here for the peer selected with ``--peer`` is reported as
a *divergence* (still in the report, with the explanation) rather than an
unexplained failure. An entry applies only when the failure message contains
one of its ``match`` strings, so the same check failing for another reason
(a crash, a timeout) stays a failure.

The libvfio-user entries were observed by running the suite against its
samples at commit efd091b (the ``server`` sample built with a 16 KiB BAR1:
as shipped, its 12 KiB BAR1 is refused by the library and it does not start),
and agree with the project's reference notes. Entries marked "sample defect"
explain crashes of sample code, not of the library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    explanation: str
    #: substrings of the failure message this entry explains (any one)
    match: tuple[str, ...]


def _d(explanation: str, *match: str) -> Divergence:
    return Divergence(explanation, match)


NO_DMA = ("on a device without DMA set up (the null sample), libvfio-user answers every "
          "DMA_MAP and DMA_UNMAP with success and does nothing")
GPIO_MIG = ("sample defect: gpio-pci-idio-16 asserts that MIG_DATA_READ asks for exactly "
            "the size of its state, 64 bytes (samples/gpio-pci-idio-16.c, "
            "migration_read_data: size == sizeof(pin)) and aborts otherwise; the library "
            "passes the client's size through")
SERVER_MIG = ("sample defect: the server sample asserts, on entering RUNNING (or STOP from "
              "STOP_COPY), that its whole state was transferred, even when no migration "
              "took place (samples/server.c, migration_device_state_transition)")
SERVER_TIMER = ("sample defect: the server sample re-arms its timer on entering RUNNING from "
                "the BAR0 timestamp, which is 0 unless the client wrote one; setitimer "
                "refuses the negative interval and the transition fails with EINVAL")

LIBVFIO_USER: dict[str, tuple[Divergence, ...]] = {
    "dma.remap-identical": (_d(
        "libvfio-user never answers EEXIST: a re-map of a mapped range with the same fd, "
        "offset and protection succeeds silently, and with another fd it fails with EINVAL",
        "error EINVAL, the spec requires EEXIST", "the server accepted it"),),
    "dma.overlap": (_d("libvfio-user refuses an overlapping DMA_MAP with EINVAL, not EEXIST",
                       "error EINVAL, the spec requires EEXIST"),
                    _d(NO_DMA, "the server accepted it")),
    "dma.map-unmap": (_d(NO_DMA + "; its DMA_UNMAP reply has an empty payload instead of "
                         "echoing the request", "DMA_UNMAP reply payload (empty)"),),
    "dma.unmap-inexact": (_d(NO_DMA, "the server accepted it"),),
    "dma.unmap-all": (_d(NO_DMA, "the server accepted it"),),
    "dma.unmap-all-args": (_d(NO_DMA, "the server accepted it"),),
    "dma.bad-argsz": (_d(NO_DMA, "the server accepted it"),),
    "dma.bad-flags": (_d(NO_DMA, "the server accepted it"),),
    "header.error-reply": (_d(
        "when a region callback fails, libvfio-user's error reply still carries the "
        "prepared payload", "it must only include the header"),),
    "header.error-bit-command": (_d(
        "libvfio-user looks only at the type bits of a command's flags: a command with "
        "the Error bit set is executed", "a command carrying the Error bit was executed"),),
    "fds.respects-client-max": (_d(
        "libvfio-user records the client's max_msg_fds but still attaches a mappable "
        "region's fd to DEVICE_GET_REGION_INFO when it is 0 (lib/tran.c notes it as a FIXME)",
        "fds to a client whose max_msg_fds is 0"),),
    "irq.bad-argsz": (_d("libvfio-user accepts a SET_IRQS whose argsz exceeds the request",
                         "the server accepted it"),),
}
for _check in ("mig.stop-run", "mig.save", "mig.resume", "mig.combined-arcs", "mig.precopy",
               "mig.no-stopcopy-to-precopy", "mig.no-error-state", "mig.bad-state",
               "mig.data-outside-saving"):
    LIBVFIO_USER[_check] = (
        _d(GPIO_MIG, "migration_read_data: Assertion"),
        _d(SERVER_MIG, "migration_device_state_transition: Assertion"),
        _d(SERVER_TIMER, "SET MIG_DEVICE_STATE RUNNING failed with EINVAL"),
    )

PEERS: dict[str, dict[str, tuple[Divergence, ...]]] = {
    "libvfio-user": LIBVFIO_USER,
}


def divergence(peer: str | None, check_id: str, message: str = "") -> str:
    """The documented explanation of this failure, or "" if it is unexplained."""
    if not peer:
        return ""
    for entry in PEERS.get(peer, {}).get(check_id, ()):
        if any(m in message for m in entry.match):
            return entry.explanation
    return ""
