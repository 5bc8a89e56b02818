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
#include <limits.h>

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
    struct ublk_io_desc d; /* op, offset, length in one call */
    uint64_t off;
    uint32_t len;
    int r;

    ublk_io_get_desc(io, &d);
    off = d.offset;
    len = d.len;
    example_register_fds(io, ublk_io_queue_data(io), &lo->fd, 1);

    switch (d.op) {
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

/* -b: the requests of one pass over the queue ring in one call. READ and
 * WRITE are lent whole to the file by the engine after the call (lease_fd);
 * the others take the path of handle_io. */
static void handle_batch(void *user, struct ublk_io_batch_entry *e, uint32_t n)
{
    struct loop *lo = user;

    example_register_fds(e[0].io, ublk_io_queue_data(e[0].io), &lo->fd, 1);
    for (uint32_t i = 0; i < n; i++) {
        if (e[i].desc.op == UBLK_OP_READ || e[i].desc.op == UBLK_OP_WRITE) {
            e[i].lease_fd = lo->fd;
            e[i].lease_file_off = e[i].desc.offset;
        } else {
            handle_io(user, e[i].io);
        }
    }
}

/* The backing file, O_DIRECT when its file system takes it. */
static int open_backing(const char *path, struct loop *lo, struct stat *st)
{
    lo->fd = open(path, O_RDWR | O_DIRECT);
    if (lo->fd < 0)
        lo->fd = open(path, O_RDWR);
    if (lo->fd < 0 || fstat(lo->fd, st) < 0) {
        perror(path);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = {
        .handle_io = handle_io, .queue_init = queue_init, .queue_deinit = example_queue_free,
    };
    struct loop lo = { .fd = -1, .zero_range = 1 };
    struct stat st;
    char args[PATH_MAX + 8];
    int r;

    example_parse(argc, argv, &o);
    if (o.batch) {
        ops.handle_io = NULL;
        ops.handle_batch = handle_batch;
    }
    if (o.recover_id >= 0) {
        /* -R ID: the device's file is the one its state file recorded */
        ublk_dev *dev = NULL;
        const char *a;
        r = ublk_dev_recover((uint32_t)o.recover_id, NULL, &ops, &lo, &dev);
        if (r == 0 && ((a = ublk_dev_target_args(dev)) == NULL || strncmp(a, "file=", 5) != 0)) {
            fprintf(stderr, "loop: device %d was not made by c-loop (target args: %s)\n", o.recover_id, a ? a : "none");
            r = -EINVAL;
        }
        if (r == 0 && open_backing(ublk_dev_target_args(dev) + 5, &lo, &st) < 0)
            r = -errno;
        r = example_serve("loop", dev, r, &lo, NULL);
        if (lo.fd >= 0)
            close(lo.fd);
        return r;
    }
    if (!o.file) {
        fprintf(stderr, "loop: -f FILE is required\n");
        return 2;
    }
    if (open_backing(o.file, &lo, &st) < 0)
        return 2;
    example_config(&cfg, &o, st.st_size & ~4095ULL, "c-loop");
    cfg.volatile_cache = 1;
    cfg.discard = 1;
    /* recorded in the state file, for -R */
    strcpy(args, "file=");
    if (!realpath(o.file, args + 5)) {
        perror(o.file);
        return 2;
    }
    cfg.target_args = args;
    r = example_run("loop", &cfg, &ops, &lo, NULL);
    close(lo.fd);
    return r;
}
