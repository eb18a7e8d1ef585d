"""C declarations for libvfio-user's server API, as cffi reads them.

Written from the prototypes in ``libvfio-user.h`` at libvfio-user commit
efd091b (library version 0.2: ``LIB_VFIO_USER_MAJOR`` 0, ``MINOR`` 2). Only
what the bindings call is declared. The library has no stable ABI, so
:mod:`xdevproto.lvu.loader` checks what it can before anything is called.

Two declarations differ on purpose from the header, without changing the
ABI: ``vfu_pci_get_config_space`` returns ``uint8_t *`` (the header's packed
union starts with the 256-byte config header), and ``loff_t`` is spelled
``int64_t``.
"""

from __future__ import annotations

import enum

#: libvfio-user commit the declarations were written against.
WRITTEN_FOR = "efd091b"
#: ``LIB_VFIO_USER_MAJOR``/``MINOR`` of that header (the library exports neither).
HEADER_VERSION = (0, 2)

CDEF = """
typedef struct vfu_ctx vfu_ctx_t;
typedef struct dma_sg dma_sg_t;
typedef void *vfu_dma_addr_t;
typedef int64_t loff_t;

struct iovec { void *iov_base; size_t iov_len; };

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
} vfu_dma_info_t;

typedef struct {
    int version;
    int (*transition)(vfu_ctx_t *vfu_ctx, int state);
    ssize_t (*read_data)(vfu_ctx_t *vfu_ctx, void *buf, uint64_t count);
    ssize_t (*write_data)(vfu_ctx_t *vfu_ctx, void *buf, uint64_t count);
} vfu_migration_callbacks_t;

typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf,
                                         size_t count, loff_t offset, bool is_write);
typedef int (vfu_device_quiesce_cb_t)(vfu_ctx_t *vfu_ctx);
typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, int type);
typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dev_irq_state_cb_t)(vfu_ctx_t *vfu_ctx, uint32_t start,
                                      uint32_t count, bool mask);

size_t dma_sg_size(void);
vfu_ctx_t *vfu_create_ctx(int trans, const char *path, int flags, void *pvt, int dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t *log, int level);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_t *region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas,
                     int fd, uint64_t offset);
void vfu_setup_device_quiesce_cb(vfu_ctx_t *vfu_ctx, vfu_device_quiesce_cb_t *quiesce_cb);
int vfu_device_quiesced(vfu_ctx_t *vfu_ctx, int quiesce_errno);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t *reset);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, size_t max_regions,
                         vfu_dma_register_cb_t *dma_register,
                         vfu_dma_unregister_cb_t *dma_unregister);
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, int type, uint32_t count);
int vfu_setup_irq_state_callback(vfu_ctx_t *vfu_ctx, int type, vfu_dev_irq_state_cb_t *cb);
int vfu_setup_device_migration_callbacks(vfu_ctx_t *vfu_ctx,
                                         const vfu_migration_callbacks_t *callbacks);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);
int vfu_addr_to_sgl(vfu_ctx_t *vfu_ctx, vfu_dma_addr_t dma_addr, size_t len,
                    dma_sg_t *sgl, size_t max_nr_sgs, int prot);
int vfu_sgl_read(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
int vfu_sgl_write(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
void vfu_sgl_mark_dirty(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t cnt);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, int pci_type, int hdr_type, int revision);
void vfu_pci_set_id(vfu_ctx_t *vfu_ctx, uint16_t vid, uint16_t did,
                    uint16_t ssvid, uint16_t ssid);
void vfu_pci_set_class(vfu_ctx_t *vfu_ctx, uint8_t base, uint8_t sub, uint8_t pi);
uint8_t *vfu_pci_get_config_space(vfu_ctx_t *vfu_ctx);
ssize_t vfu_pci_add_capability(vfu_ctx_t *vfu_ctx, size_t pos, int flags, void *data);
size_t vfu_pci_find_capability(vfu_ctx_t *vfu_ctx, bool extended, int cap_id);
"""

#: Every function the bindings may call; all must resolve (dlsym) at load time.
FUNCTIONS = (
    "dma_sg_size", "vfu_create_ctx", "vfu_realize_ctx", "vfu_attach_ctx",
    "vfu_get_poll_fd", "vfu_run_ctx", "vfu_destroy_ctx", "vfu_setup_log",
    "vfu_setup_region", "vfu_setup_device_quiesce_cb", "vfu_device_quiesced",
    "vfu_setup_device_reset_cb", "vfu_setup_device_dma", "vfu_setup_device_nr_irqs",
    "vfu_setup_irq_state_callback", "vfu_setup_device_migration_callbacks",
    "vfu_irq_trigger", "vfu_addr_to_sgl", "vfu_sgl_read", "vfu_sgl_write",
    "vfu_sgl_mark_dirty",
    "vfu_pci_init", "vfu_pci_set_id", "vfu_pci_set_class", "vfu_pci_get_config_space",
    "vfu_pci_add_capability", "vfu_pci_find_capability",
)

# Constants from libvfio-user.h (efd091b). cffi ABI mode cannot read #defines.
TRANS_SOCK = 0
DEV_TYPE_PCI = 0
FLAG_ATTACH_NB = 1 << 0
MIGR_CALLBACKS_VERS = 2
MAX_DMA_REGIONS = 1000 * 1000
SGL_DIRECT_ACCESS = 1
CAP_FLAG_EXTENDED = 1 << 0
CAP_FLAG_CALLBACK = 1 << 1
CAP_FLAG_READONLY = 1 << 2
#: struct vfio_user_irq_info etc. aside, the config space the library keeps.
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000


class RegionFlag(enum.IntFlag):
    """``VFU_REGION_FLAG_*``; MEM means a memory BAR (else I/O space)."""

    READ = 1 << 0
    WRITE = 1 << 1
    RW = READ | WRITE
    MEM = 1 << 2
    ALWAYS_CB = 1 << 3
    BITS_64 = 1 << 4
    PREFETCH = 1 << 5


class IrqType(enum.IntEnum):
    """``enum vfu_dev_irq_type`` (same order as vfio-user's IRQ indexes)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class PciType(enum.IntEnum):
    """``vfu_pci_type_t``: decides the config space size (256 or 4096 bytes)."""

    CONVENTIONAL = 0
    PCI_X_1 = 1
    PCI_X_2 = 2
    EXPRESS = 3


class ResetType(enum.IntEnum):
    """``vfu_reset_type_t``: why the reset callback runs."""

    DEVICE = 0
    LOST_CONN = 1
    PCI_FLR = 2


class MigrState(enum.IntEnum):
    """``vfu_migr_state_t`` (migration v2); not the vfio-user wire numbering."""

    STOP = 0
    RUNNING = 1
    STOP_AND_COPY = 2
    PRE_COPY = 3
    RESUME = 4


class Region(enum.IntEnum):
    """``VFU_PCI_DEV_*_REGION_IDX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CFG = 7
    VGA = 8
