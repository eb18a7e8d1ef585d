"""Xen front end of the xdev bridge: ioreq server, guest memory, interrupts, xenstore."""
