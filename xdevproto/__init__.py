"""xdevproto: vfio-user protocol, transports, client, server runtime, PCI device framework."""
