/* A RAM disk that completes every request inside the callback (with -b:
 * the requests of a batch in one callback, completed by their results). */
#include "common.h"
#include <sys/mman.h>

struct ramdisk {
    unsigned char *mem;
    uint64_t size;
};

/* The result of one request, served from memory. */
static int serve(struct ramdisk *rd, const struct ublk_io_desc *d, void *buf)
{
    if (d->offset + d->len > rd->size)
        return -EIO;
    switch (d->op) {
    case UBLK_OP_READ:
        memcpy(buf, rd->mem + d->offset, d->len);
        return (int)d->len;
    case UBLK_OP_WRITE:
        memcpy(rd->mem + d->offset, buf, d->len);
        return (int)d->len;
    case UBLK_OP_FLUSH:
        return 0;
    case UBLK_OP_DISCARD:
    case UBLK_OP_WRITE_ZEROES:
        memset(rd->mem + d->offset, 0, d->len);
        return 0;
    }
    return -EOPNOTSUPP;
}

static void handle_io(void *user, ublk_io *io)
{
    struct ublk_io_desc d;

    ublk_io_get_desc(io, &d);
    ublk_io_complete(io, serve(user, &d, ublk_io_buf(io)));
}

/* -b: the requests of one pass over the queue ring in one call; each result
 * completes its request when this returns. */
static void handle_batch(void *user, struct ublk_io_batch_entry *e, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        e[i].result = serve(user, &e[i].desc, e[i].buf);
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = { .handle_io = handle_io };
    struct ramdisk rd;
    int r;

    example_parse(argc, argv, &o);
    if (o.batch) {
        ops.handle_io = NULL;
        ops.handle_batch = handle_batch;
    }
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
