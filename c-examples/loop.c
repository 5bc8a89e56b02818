/* A loop device over a file: each request's buffer is lent to IO on the file
 * (ublk_io_lease_read / _write), zero copy where the kernel allows, on each
 * queue's own io_uring, so the server needs no threads of its own. Reads and
 * writes complete by themselves when their lease operation is over. */
#define _GNU_SOURCE
#include "common.h"
#include <fcntl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

struct loop {
    int fd;
    int zero_range; /* cleared when the file system lacks FALLOC_FL_ZERO_RANGE */
};

static void done(void *user, ublk_io *io, int res);

static int zero(struct loop *lo, ublk_io *io, int mode)
{
    return ublk_io_fallocate(io, lo->fd, mode | FALLOC_FL_KEEP_SIZE, ublk_io_offset(io),
                             ublk_io_len(io), done, lo);
}

static void done(void *user, ublk_io *io, int res)
{
    struct loop *lo = user;

    if (res == -EOPNOTSUPP && ublk_io_op(io) == UBLK_OP_WRITE_ZEROES && lo->zero_range) {
        lo->zero_range = 0; /* e.g. tmpfs: a punched hole reads as zeroes too */
        if (zero(lo, io, FALLOC_FL_PUNCH_HOLE) == 0)
            return;
    }
    ublk_io_complete(io, res);
}

/* Per queue: whether the file is in the queue ring's file table yet. */
static int queue_init(void *user, uint16_t q_id, void **queue_data)
{
    (void)user;
    (void)q_id;
    *queue_data = calloc(1, sizeof(int));
    return *queue_data ? 0 : -ENOMEM;
}

static void handle_io(void *user, ublk_io *io)
{
    struct loop *lo = user;
    uint64_t off = ublk_io_offset(io);
    uint32_t len = ublk_io_len(io);
    int r;

    example_register_fds(io, ublk_io_queue_data(io), &lo->fd, 1);

    switch (ublk_io_op(io)) {
    case UBLK_OP_READ: /* a short read (end of file) leaves zeroes */
        r = ublk_io_lease_read(io, lo->fd, off, 0, len, NULL, NULL);
        break;
    case UBLK_OP_WRITE: /* FUA becomes RWF_DSYNC */
        r = ublk_io_lease_write(io, lo->fd, off, 0, len, NULL, NULL);
        break;
    case UBLK_OP_FLUSH:
        r = ublk_io_fsync(io, lo->fd, 1, done, lo);
        break;
    case UBLK_OP_DISCARD:
        r = zero(lo, io, FALLOC_FL_PUNCH_HOLE);
        break;
    case UBLK_OP_WRITE_ZEROES:
        r = zero(lo, io, lo->zero_range ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE);
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
        .handle_io = handle_io, .queue_init = queue_init, .queue_deinit = example_queue_free,
    };
    struct loop lo = { .zero_range = 1 };
    struct stat st;
    int r;

    example_parse(argc, argv, &o);
    if (!o.file) {
        fprintf(stderr, "loop: -f FILE is required\n");
        return 2;
    }
    lo.fd = open(o.file, O_RDWR | O_DIRECT);
    if (lo.fd < 0)
        lo.fd = open(o.file, O_RDWR);
    if (lo.fd < 0 || fstat(lo.fd, &st) < 0) {
        perror(o.file);
        return 2;
    }
    example_config(&cfg, &o, st.st_size & ~4095ULL, "c-loop");
    cfg.volatile_cache = 1;
    cfg.discard = 1;
    r = example_run("loop", &cfg, &ops, &lo, NULL);
    close(lo.fd);
    return r;
}
