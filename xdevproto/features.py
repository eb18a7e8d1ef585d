"""DEVICE_FEATURE on the server side (vfio-user spec, "DEVICE_FEATURE";
migration v2 and DMA dirty-page logging).

A device that cannot migrate (``migration_flags == 0``) answers ENOTSUP to
every feature, PROBE included, so a client can tell absent from broken.
"""

from __future__ import annotations

import errno

from . import wire
from .connection import Request
from .device import Device
from .errors import DeviceError, PeerProtocolError
from .wire import Feature, FeatureFlags

#: The operations each feature supports (spec table; GET/SET/PROBE).
SUPPORTED_OPS: dict[int, int] = {
    Feature.MIGRATION: FeatureFlags.GET | FeatureFlags.PROBE,
    Feature.MIG_DEVICE_STATE: FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE,
    Feature.DMA_LOGGING_START: FeatureFlags.SET | FeatureFlags.PROBE,
    Feature.DMA_LOGGING_STOP: FeatureFlags.SET | FeatureFlags.PROBE,
    Feature.DMA_LOGGING_REPORT: FeatureFlags.GET | FeatureFlags.PROBE,
}

#: Bound on a dirty bitmap we build in one reply.
MAX_BITMAP_BYTES = 1 << 20


def handle_feature(device: Device, req: Request) -> tuple[wire.Payload, list[int]]:
    p = req.payload
    assert isinstance(p, wire.DeviceFeature)
    feature = p.feature
    ops = p.flags & (FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE)
    if feature not in SUPPORTED_OPS or not device.migration_flags:
        raise DeviceError(f"feature {feature} not supported", errno.ENOTSUP)
    if ops & ~SUPPORTED_OPS[feature]:
        raise DeviceError(f"feature {feature} does not support flags {ops:#x}", errno.EINVAL)
    if ops & FeatureFlags.PROBE:
        return wire.DeviceFeature(p.argsz, p.flags, p.data), []
    try:
        if feature == Feature.MIGRATION:
            data = wire.FeatMigration(int(device.migration_flags)).encode()
        elif feature == Feature.MIG_DEVICE_STATE:
            data = _mig_state(device, p, ops)
        elif feature == Feature.DMA_LOGGING_START:
            log = wire.FeatDmaLogging.decode(p.data)
            _check_page_size(log.page_size)
            device.dma_logging_start(log.page_size, log.ranges)
            data = p.data
        elif feature == Feature.DMA_LOGGING_STOP:
            device.dma_logging_stop()
            data = p.data
        else:
            data = _report(device, p)
    except PeerProtocolError as exc:
        raise DeviceError(str(exc), exc.errno) from None
    size = wire.DeviceFeature.SIZE + len(data)
    if ops & FeatureFlags.GET and p.argsz < size:
        raise DeviceError(f"argsz {p.argsz} too small for {size}", errno.EINVAL)
    return wire.DeviceFeature(size, p.flags, data), []


def _mig_state(device: Device, p: wire.DeviceFeature, ops: int) -> bytes:
    if ops & FeatureFlags.SET:
        want = wire.FeatMigState.decode(p.data)
        try:
            state = wire.MigState(want.device_state)
        except ValueError:
            raise DeviceError(f"no device state {want.device_state}", errno.EINVAL) from None
        device.set_mig_state(state)
    return wire.FeatMigState(int(device.mig_state()), -1).encode()


def _check_page_size(page_size: int) -> None:
    if page_size < 512 or page_size & (page_size - 1):
        raise DeviceError(f"bad dirty-logging page size {page_size}", errno.EINVAL)


def _report(device: Device, p: wire.DeviceFeature) -> bytes:
    rep = wire.FeatDmaLoggingReport.decode(p.data)
    _check_page_size(rep.page_size)
    if rep.length == 0 or rep.iova + rep.length > 1 << 64 or rep.iova % rep.page_size:
        raise DeviceError("bad dirty-logging report range", errno.EINVAL)
    pages = -(-rep.length // rep.page_size)
    nbytes = -(-pages // 64) * 8
    if nbytes > MAX_BITMAP_BYTES:
        raise DeviceError("dirty bitmap too large", errno.E2BIG)
    bitmap = device.dma_logging_report(rep.iova, rep.length, rep.page_size)
    if len(bitmap) != nbytes:
        raise DeviceError("device returned a bitmap of the wrong size", errno.EIO)
    return wire.FeatDmaLoggingReport(rep.iova, rep.length, rep.page_size, bitmap).encode()
