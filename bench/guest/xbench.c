/*
 * xbench: guest-side measurements for bench/xen.py (static, runs from the
 * guest's busybox initramfs).
 *
 *   xbench mmio  LABEL RESOURCE_FILE OFFSET SECONDS
 *       32-bit reads of one register through an mmap of a PCI BAR
 *       (/sys/bus/pci/devices/.../resourceN); every read is one round trip
 *       to whoever emulates the device (an ioreq to QEMU or to xdev-bridge).
 *   xbench seqread  LABEL BLOCKDEV SECONDS    1 MiB O_DIRECT reads, in order
 *   xbench seqwrite LABEL BLOCKDEV SECONDS    1 MiB O_DIRECT writes, in order
 *   xbench randread LABEL BLOCKDEV SECONDS    4 KiB O_DIRECT reads at random
 *                                             4 KiB-aligned offsets, QD1
 *
 * Each run lasts SECONDS (wrapping around the device) and prints one line:
 *   XB-RESULT LABEL ops=N bytes=N secs=S per_s=R value=0x...
 * (value: the last register value read, for mmio). Errors print
 *   XB-ERROR LABEL what: strerror
 * and exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SEQ_BLOCK (1u << 20)
#define RAND_BLOCK 4096u

static const char *label = "?";

static void fail(const char *what)
{
    printf("XB-ERROR %s %s: %s\n", label, what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void report(uint64_t ops, uint64_t bytes, double secs, uint32_t value)
{
    printf("XB-RESULT %s ops=%llu bytes=%llu secs=%.3f per_s=%.1f value=0x%08x\n", label,
           (unsigned long long)ops, (unsigned long long)bytes, secs,
           secs > 0 ? (double)ops / secs : 0.0, value);
    fflush(stdout);
}

static int mmio(const char *path, unsigned long offset, double seconds)
{
    long page = sysconf(_SC_PAGESIZE);
    unsigned long base = offset & ~(unsigned long)(page - 1);
    int fd = open(path, O_RDONLY | O_SYNC);
    if (fd < 0)
        fail("open");
    void *map = mmap(NULL, (size_t)page, PROT_READ, MAP_SHARED, fd, (off_t)base);
    if (map == MAP_FAILED)
        fail("mmap");
    volatile const uint32_t *reg =
        (volatile const uint32_t *)((char *)map + (offset - base));
    uint32_t value = 0;
    uint64_t ops = 0;
    double start = now(), end = start + seconds, t = start;
    /* The clock is read every 16 accesses: an access costs a round trip
     * through dom0, far more than clock_gettime. */
    while (t < end) {
        for (int i = 0; i < 16; i++)
            value = *reg;
        ops += 16;
        t = now();
    }
    report(ops, ops * 4, t - start, value);
    munmap(map, (size_t)page);
    close(fd);
    return 0;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
    /* xorshift64: a fixed seed, so both disks see the same offsets. */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int disk(const char *mode, const char *path, double seconds)
{
    int writing = strcmp(mode, "seqwrite") == 0;
    int random_io = strcmp(mode, "randread") == 0;
    unsigned block = random_io ? RAND_BLOCK : SEQ_BLOCK;
    int fd = open(path, (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        fail("open");
    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail("fstat");
    if (S_ISREG(st.st_mode))
        size = (uint64_t)st.st_size; /* an image file: to try it out on a host */
    else if (ioctl(fd, BLKGETSIZE64, &size) < 0)
        fail("BLKGETSIZE64");
    uint64_t blocks = size / block;
    if (blocks == 0) {
        errno = ENOSPC;
        fail("device smaller than one block");
    }
    void *buf;
    if (posix_memalign(&buf, 4096, block) != 0)
        fail("posix_memalign");
    memset(buf, 0xa5, block);
    uint64_t ops = 0, next = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        uint64_t index = random_io ? rng() % blocks : next;
        off_t at = (off_t)(index * block);
        ssize_t done = writing ? pwrite(fd, buf, block, at) : pread(fd, buf, block, at);
        if (done != (ssize_t)block) {
            if (done >= 0)
                errno = EIO;
            fail(writing ? "pwrite" : "pread");
        }
        ops++;
        next = (next + 1) % blocks;
        t = now();
    }
    if (writing && fdatasync(fd) < 0)
        fail("fdatasync");
    t = now();
    report(ops, ops * block, t - start, 0);
    free(buf);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "mmio") == 0 && argc == 6) {
        label = argv[2];
        return mmio(argv[3], strtoul(argv[4], NULL, 0), atof(argv[5]));
    }
    if (argc == 5 && (strcmp(argv[1], "seqread") == 0 || strcmp(argv[1], "seqwrite") == 0 ||
                      strcmp(argv[1], "randread") == 0)) {
        label = argv[2];
        return disk(argv[1], argv[3], atof(argv[4]));
    }
    fprintf(stderr,
            "usage: xbench mmio LABEL RESOURCE OFFSET SECONDS\n"
            "       xbench seqread|seqwrite|randread LABEL BLOCKDEV SECONDS\n");
    return 2;
}
