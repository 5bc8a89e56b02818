/* RAID-1 over two files: -f leg0,leg1.
 *
 * A WRITE lends its buffer to both legs at once: two lease operations in
 * flight on one request, no link chain; the request completes by itself when
 * both are over (with the first error if a leg failed, so a leg's error fails
 * the IO). READs alternate between the legs. FLUSH is fdatasync on both. */
#define _GNU_SOURCE
#include "common.h"

struct mirror {
    int depth; /* first: read by fanout_queue_init */
    int fds[2];
    unsigned next_leg; /* per device; only a hint, races between queues are harmless */
};

static void handle_io(void *user, ublk_io *io)
{
    struct mirror *m = user;
    uint64_t off = ublk_io_offset(io);
    uint32_t len = ublk_io_len(io);
    int r = 0;

    fanout_register_fds(io, m->depth, m->fds, 2);
    switch (ublk_io_op(io)) {
    case UBLK_OP_READ:
        r = ublk_io_lease_read(io, m->fds[__atomic_fetch_add(&m->next_leg, 1, __ATOMIC_RELAXED) & 1],
                               off, 0, len, NULL, NULL);
        break;
    case UBLK_OP_WRITE:
        r = ublk_io_lease_write(io, m->fds[0], off, 0, len, NULL, NULL);
        if (r == 0) {
            r = ublk_io_lease_write(io, m->fds[1], off, 0, len, NULL, NULL);
            if (r < 0) {
                /* leg 0 is in flight: complete with the error, which the
                 * engine holds back until leg 0's write is over */
                ublk_io_lease_manual(io);
            }
        }
        break;
    case UBLK_OP_FLUSH:
        r = fanout_fsync(io, m->fds, 2);
        break;
    default:
        r = -EOPNOTSUPP;
    }
    if (r < 0)
        ublk_io_complete(io, r);
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = {
        .handle_io = handle_io,
        .queue_init = fanout_queue_init,
        .queue_deinit = example_queue_free,
    };
    struct mirror m = { 0 };
    uint64_t size;
    int r;

    example_parse(argc, argv, &o);
    if (!o.file || example_open_files(o.file, m.fds, 2, &size) != 2) {
        fprintf(stderr, "mirror: -f LEG0,LEG1 (two files) is required\n");
        return 2;
    }
    m.depth = o.depth;
    example_config(&cfg, &o, size & ~4095ULL, "c-mirror");
    cfg.volatile_cache = 1;
    r = example_run("mirror", &cfg, &ops, &m, NULL);
    close(m.fds[0]);
    close(m.fds[1]);
    return r;
}
