/* A RAM disk that completes every request inside the callback. */
#include "common.h"
#include <sys/mman.h>

struct ramdisk {
    unsigned char *mem;
    uint64_t size;
};

static void handle_io(void *user, ublk_io *io)
{
    struct ramdisk *rd = user;
    uint64_t off = ublk_io_offset(io);
    uint32_t len = ublk_io_len(io);
    int res = 0;

    if (off + len > rd->size) {
        ublk_io_complete(io, -EIO);
        return;
    }
    switch (ublk_io_op(io)) {
    case UBLK_OP_READ:
        memcpy(ublk_io_buf(io), rd->mem + off, len);
        res = (int)len;
        break;
    case UBLK_OP_WRITE:
        memcpy(rd->mem + off, ublk_io_buf(io), len);
        res = (int)len;
        break;
    case UBLK_OP_FLUSH:
        break;
    case UBLK_OP_DISCARD:
    case UBLK_OP_WRITE_ZEROES:
        memset(rd->mem + off, 0, len);
        break;
    default:
        res = -EOPNOTSUPP;
    }
    ublk_io_complete(io, res);
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = { .handle_io = handle_io };
    struct ramdisk rd;
    int r;

    example_parse(argc, argv, &o);
    rd.size = o.size;
    rd.mem = mmap(NULL, rd.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    /* small pages: random first writes would otherwise zero whole huge pages */
    if (rd.mem != MAP_FAILED)
        madvise(rd.mem, rd.size, MADV_NOHUGEPAGE);
    if (rd.mem == MAP_FAILED) {
        perror("ramdisk: mmap");
        return 1;
    }
    example_config(&cfg, &o, o.size, "c-ramdisk");
    cfg.needs_buffer = 1; /* serves from memory through ublk_io_buf() */
    cfg.discard = 1;
    r = example_run("ramdisk", &cfg, &ops, &rd, NULL);
    munmap(rd.mem, rd.size);
    return r;
}
