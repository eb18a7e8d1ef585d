/* Layout probe for bridge/xen/abi.py, compiled by test_abi_probe.py against
 * Xen's own public header.  Prints "name value" lines: sizes, offsets, and
 * the bytes of structures in which exactly one field was set to all ones. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <xen/hvm/ioreq.h>

static void dump(const char *name, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s ", name);
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

#define NUM(name, v) printf("%s %lu\n", name, (unsigned long)(v))
#define IOREQ_FIELD(f) do { ioreq_t r; memset(&r, 0, sizeof r); r.f = ~0ULL; \
    dump("ioreq." #f, &r, sizeof r); } while (0)
#define BUF_FIELD(f) do { buf_ioreq_t r; memset(&r, 0, sizeof r); r.f = ~0ULL; \
    dump("buf_ioreq." #f, &r, sizeof r); } while (0)

int main(void)
{
    NUM("sizeof.ioreq", sizeof(ioreq_t));
    NUM("sizeof.shared_iopage", sizeof(shared_iopage_t));
    NUM("sizeof.buf_ioreq", sizeof(buf_ioreq_t));
    NUM("sizeof.buffered_iopage", sizeof(buffered_iopage_t));
    NUM("offsetof.ioreq.addr", offsetof(ioreq_t, addr));
    NUM("offsetof.ioreq.data", offsetof(ioreq_t, data));
    NUM("offsetof.ioreq.count", offsetof(ioreq_t, count));
    NUM("offsetof.ioreq.size", offsetof(ioreq_t, size));
    NUM("offsetof.ioreq.vp_eport", offsetof(ioreq_t, vp_eport));
    NUM("offsetof.ioreq.type", offsetof(ioreq_t, type));
    NUM("offsetof.shared_iopage.vcpu_ioreq1", offsetof(shared_iopage_t, vcpu_ioreq[1]));
    NUM("offsetof.buf_ioreq.type", offsetof(buf_ioreq_t, type));
    NUM("offsetof.buf_ioreq.data", offsetof(buf_ioreq_t, data));
    NUM("offsetof.buffered_iopage.read_pointer", offsetof(buffered_iopage_t, read_pointer));
    NUM("offsetof.buffered_iopage.write_pointer", offsetof(buffered_iopage_t, write_pointer));
    NUM("offsetof.buffered_iopage.buf_ioreq", offsetof(buffered_iopage_t, buf_ioreq));
    NUM("offsetof.buffered_iopage.buf_ioreq1", offsetof(buffered_iopage_t, buf_ioreq[1]));
    NUM("const.IOREQ_BUFFER_SLOT_NUM", IOREQ_BUFFER_SLOT_NUM);
    NUM("const.IOREQ_READ", IOREQ_READ);
    NUM("const.IOREQ_WRITE", IOREQ_WRITE);
    NUM("const.STATE_IOREQ_NONE", STATE_IOREQ_NONE);
    NUM("const.STATE_IOREQ_READY", STATE_IOREQ_READY);
    NUM("const.STATE_IOREQ_INPROCESS", STATE_IOREQ_INPROCESS);
    NUM("const.STATE_IORESP_READY", STATE_IORESP_READY);
    NUM("const.IOREQ_TYPE_PIO", IOREQ_TYPE_PIO);
    NUM("const.IOREQ_TYPE_COPY", IOREQ_TYPE_COPY);
    NUM("const.IOREQ_TYPE_PCI_CONFIG", IOREQ_TYPE_PCI_CONFIG);
    NUM("const.IOREQ_TYPE_TIMEOFFSET", IOREQ_TYPE_TIMEOFFSET);
    NUM("const.IOREQ_TYPE_INVALIDATE", IOREQ_TYPE_INVALIDATE);
    IOREQ_FIELD(addr);
    IOREQ_FIELD(data);
    IOREQ_FIELD(count);
    IOREQ_FIELD(size);
    IOREQ_FIELD(vp_eport);
    IOREQ_FIELD(_pad0);
    IOREQ_FIELD(state);
    IOREQ_FIELD(data_is_ptr);
    IOREQ_FIELD(dir);
    IOREQ_FIELD(df);
    IOREQ_FIELD(_pad1);
    IOREQ_FIELD(type);
    BUF_FIELD(type);
    BUF_FIELD(pad);
    BUF_FIELD(dir);
    BUF_FIELD(size);
    BUF_FIELD(addr);
    BUF_FIELD(data);
    {
        ioreq_t r;
        memset(&r, 0, sizeof r);
        r.addr = 0x1122334455667788ULL;
        r.data = 0x99aabbccddeeff00ULL;
        r.count = 3;
        r.size = 4;
        r.vp_eport = 0x55;
        r.state = STATE_IOREQ_READY;
        r.data_is_ptr = 1;
        r.dir = IOREQ_READ;
        r.df = 1;
        r.type = IOREQ_TYPE_COPY;
        dump("mixed.ioreq", &r, sizeof r);
    }
    {
        buf_ioreq_t r;
        memset(&r, 0, sizeof r);
        r.type = IOREQ_TYPE_COPY;
        r.dir = IOREQ_WRITE;
        r.size = 2;
        r.addr = 0xabcde;
        r.data = 0x12345678;
        dump("mixed.buf_ioreq", &r, sizeof r);
    }
    return 0;
}
