"""Documented divergences of widely used peers.

A failure listed here for the peer selected with ``--peer`` is reported as
a *divergence* (still in the report, with the explanation) rather than an
unexplained failure. Entries come from the project's reference notes on
libvfio-user (efd091b, each behaviour observed against its samples); each
says what the peer does instead. A failure not listed here stays a failure.
"""

from __future__ import annotations

LIBVFIO_USER: dict[str, str] = {
    "dma.remap-identical": "libvfio-user accepts a DMA_MAP identical to an existing mapping "
                           "(same range, offset, file and protection) and replies success "
                           "instead of EEXIST",
    "dma.overlap": "libvfio-user refuses an overlapping, non-identical DMA_MAP with EINVAL, "
                   "not EEXIST",
    "dma.map-unmap": "on a device without DMA set up (the null sample) libvfio-user replies to "
                     "DMA_UNMAP with an empty payload instead of echoing the request",
    "dma.unmap-inexact": "on a device without DMA set up (the null sample), DMA_MAP and "
                         "DMA_UNMAP succeed and do nothing",
    "dma.unmap-all": "on a device without DMA set up (the null sample), DMA_MAP and "
                     "DMA_UNMAP succeed and do nothing",
    "dma.unmap-all-args": "on a device without DMA set up (the null sample), DMA_UNMAP "
                          "succeeds whatever its arguments",
    "header.error-reply": "when a region callback fails, libvfio-user's error reply still "
                          "carries the prepared payload",
    "write-multi.negotiated": "libvfio-user does not implement REGION_WRITE_MULTI "
                              "(EINVAL, 'bad command') and never offers write_multiple",
}

PEERS: dict[str, dict[str, str]] = {
    "libvfio-user": LIBVFIO_USER,
}


def divergence(peer: str | None, check_id: str) -> str:
    """The documented explanation, or "" when the failure is unexplained."""
    if not peer:
        return ""
    return PEERS.get(peer, {}).get(check_id, "")
