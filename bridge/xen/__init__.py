"""Xen front end of the xdev bridge: ioreq server, guest memory, interrupts, xenstore.

Modules (each cites the Xen public header it implements):

``abi``          byte layouts of ioreq_t / buf_ioreq_t / the two pages; decoding
                 that validates every field (XSA-199); ``Sbdf``.
``handler``      ``IoHandler``: the seven methods the bridge core implements.
``backend``      ``XenBackend``: the calls we make to Xen, one small interface.
``libs``         ``XenLibs``: the real backend, cffi ABI mode over libxen*.so.
``fake``         ``FakeXen``: an in-memory backend plus the hypervisor's side, for tests.
``ioreq_server`` ``IoreqServer``: life cycle, claims, request loop, buffered ring.
``dispatch``     one validated request -> handler calls (rep strings included).
``guestmem``     ``GuestMemory``: foreign mappings of guest RAM, 1 MiB LRU buckets.
``irq``          ``Interrupts``: INTx levels and MSI injection.
``xenstore``     ``XenStore``/``DomainWatcher``: lookup, vCPUs, @releaseDomain, publishing.
``privileges``   ``restrict_to_domain`` and ``drop_root``.
``errors``       typed errors; guest errors never escape the request loop.

How the bridge core runs one guest::

    xs = xenstore.connect()                       # before dropping root
    store = xenstore.XenStore(xs)
    domid = store.resolve_domain("guest")
    xen = libs.XenLibs()                          # XenUnavailable / XenPermissionError
    memory = guestmem.GuestMemory(xen, domid)     # also serves DMA_READ/DMA_WRITE
    irqs = irq.Interrupts(xen, domid)
    server = ioreq_server.IoreqServer(xen, domid, core, memory=memory)
    server.start()
    server.claim_pci(abi.Sbdf(0, 0, 5, 0))        # config space of 00:05.0
    server.claim_range(True, bar_start, bar_end)  # MMIO BAR, end inclusive
    store.publish_bridge(domid, "running", server.id)
    stop = threading.Event()
    xenstore.DomainWatcher(xs, domid, lambda: (stop.set(), server.wake())).start()
    privileges.restrict_to_domain(xen, domid)
    privileges.drop_root(privileges.lookup_user("xdev"))
    server.run(stop)                              # or: select on server.fileno(),
                                                  # handle_events(), poll_buffered()
    store.close(domid)

``core`` implements :class:`bridge.xen.handler.IoHandler`; when the guest
moves a BAR it calls ``release_range`` / ``claim_range``.  All of these
calls must come from the thread that runs the loop.
"""
