/* RAID-0 over N files with a chunk size: -f f0,f1,...  -c CHUNK (default 64K).
 *
 * Device chunk k lives on file k % N at file offset (k / N) * CHUNK. A request
 * spanning chunks issues one lease operation per piece, each on its own
 * sub-range of the one request buffer, all in flight at once; the request
 * completes by itself when the last piece is over (first error wins). */
#define _GNU_SOURCE
#include "common.h"

#define MAX_FILES 16

struct stripe {
    int depth; /* first: read by fanout_queue_init */
    int n;
    int fds[MAX_FILES];
    uint64_t chunk;
};

static int rw_pieces(struct stripe *s, ublk_io *io, int write)
{
    uint64_t off = ublk_io_offset(io);
    uint32_t len = ublk_io_len(io), done = 0;
    int submitted = 0;

    while (done < len) {
        uint64_t k = (off + done) / s->chunk, in = (off + done) % s->chunk;
        uint32_t piece = (uint32_t)(s->chunk - in < len - done ? s->chunk - in : len - done);
        int fd = s->fds[k % (uint64_t)s->n];
        uint64_t file_off = k / (uint64_t)s->n * s->chunk + in;
        int r = write ? ublk_io_lease_write(io, fd, file_off, done, piece, NULL, NULL)
                      : ublk_io_lease_read(io, fd, file_off, done, piece, NULL, NULL);
        if (r < 0) {
            if (submitted) {
                /* pieces are in flight: the engine holds this completion back
                 * until they are over */
                ublk_io_lease_manual(io);
                ublk_io_complete(io, r);
                return 0;
            }
            return r;
        }
        submitted++;
        done += piece;
    }
    return 0;
}

static void handle_io(void *user, ublk_io *io)
{
    struct stripe *s = user;
    int r;

    fanout_register_fds(io, s->depth, s->fds, s->n);
    switch (ublk_io_op(io)) {
    case UBLK_OP_READ:
        r = rw_pieces(s, io, 0);
        break;
    case UBLK_OP_WRITE:
        r = rw_pieces(s, io, 1);
        break;
    case UBLK_OP_FLUSH:
        r = fanout_fsync(io, s->fds, s->n);
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
    struct stripe s = { 0 };
    uint64_t min_size;
    int r;

    example_parse(argc, argv, &o);
    if (!o.file || (s.n = example_open_files(o.file, s.fds, MAX_FILES, &min_size)) < 1) {
        fprintf(stderr, "stripe: -f FILE[,FILE...] is required\n");
        return 2;
    }
    if (o.chunk < 4096 || (o.chunk & (o.chunk - 1))) {
        fprintf(stderr, "stripe: -c %llu: the chunk size must be a power of two >= 4K\n",
                (unsigned long long)o.chunk);
        return 2;
    }
    s.depth = o.depth;
    s.chunk = o.chunk;
    example_config(&cfg, &o, min_size / s.chunk * s.chunk * (uint64_t)s.n, "c-stripe");
    cfg.volatile_cache = 1;
    r = example_run("stripe", &cfg, &ops, &s, NULL);
    for (int i = 0; i < s.n; i++)
        close(s.fds[i]);
    return r;
}
