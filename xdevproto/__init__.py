"""xdevproto: the vfio-user protocol, transports, client, server runtime and PCI device framework."""
