"""What a client sees differently on the libvfio-user engine, beyond failures.

:mod:`xdevproto.conformance.divergences` explains the conformance checks
libvfio-user *fails*; a check can also change outcome without failing (it
becomes not applicable because the library answers an information request
differently). Those cases are listed here, with the reason, so the
engine-comparison test and docs/libvfio-user-engine.md explain every
difference between the two engines. Observed at libvfio-user efd091b.
"""

from __future__ import annotations

#: conformance check id -> why it is not applicable on the libvfio-user engine
NOT_APPLICABLE: dict[str, str] = {
    "irq.mask": (
        "libvfio-user's DEVICE_GET_IRQ_INFO answers flags EVENTFD only, never MASKABLE "
        "(lib/irq.c, handle_device_get_irq_info), so the check finds no maskable index; "
        "the library still accepts SET_IRQS MASK/UNMASK and the engine passes them on to "
        "the device"),
}
