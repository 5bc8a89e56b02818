/* Error paths of the C API: each misuse returns its documented error.
 * Host part: NULL handles and configs, invalid values. Kernel part (when
 * /dev/ublk-control exists): double completion, result > length, backing IO
 * from a foreign thread, use after stop. Run under valgrind by `make test`.
 * Prints "N passed, N failed, N skipped" and exits non-zero on a failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <ublk.h>

static int passed, failed, skipped;

#define CHECK(cond, ...) do { \
    if (cond) { passed++; } else { failed++; printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        printf(__VA_ARGS__); printf("\n"); } } while (0)
#define EXPECT(call, want) do { long _r = (long)(call); \
    CHECK(_r == (long)(want), "%s = %ld (%s), want %ld", #call, _r, ublk_strerror((int)_r), (long)(want)); } while (0)

static void nop_io(void *user, ublk_io *io) { (void)user; ublk_io_complete(io, 0); }

static void host_checks(void)
{
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = { .handle_io = nop_io };
    struct ublk_target_ops no_ops = { 0 };
    ublk_dev *dev = (ublk_dev *)0x1;
    char junk[256] = { 0 };
    char msg[256];

    EXPECT(ublk_dev_config_init(NULL), -EINVAL);
    EXPECT(ublk_dev_config_init(&cfg), 0);
    cfg.size = 1 << 20;
    EXPECT(ublk_dev_new(NULL, &ops, NULL, &dev), -EINVAL);
    EXPECT(ublk_dev_new(&cfg, NULL, NULL, &dev), -EINVAL);
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, NULL), -EINVAL);
    EXPECT(ublk_dev_new(&cfg, &no_ops, NULL, &dev), -EINVAL);
    CHECK(dev == (ublk_dev *)0x1, "out written on failure");
    CHECK(ublk_last_error_message(msg, sizeof(msg)) > 0 && strstr(msg, "handle_io"), "message: %s", msg);

    ublk_dev_config_init(&cfg);
    cfg.size = 0;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.size = 1000; /* not a multiple of 512 */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.size = 1 << 20;
    cfg.queue_depth = 0;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.queue_depth = 4097;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.queue_depth = 64;
    cfg.nr_queues = 0;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.nr_queues = 1;
    cfg.logical_block_size = 1000;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.logical_block_size = 512;
    cfg.max_io_bytes = 100;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.max_io_bytes = 1 << 20;
    cfg.dev_id = -5;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.dev_id = -1;
    cfg.data_mode = 9;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.data_mode = UBLK_DATA_AUTO;
    cfg.flags = 1ULL << 7; /* UBLK_F_USER_COPY: chosen with data_mode, not flags */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.flags = 0;
    cfg.reserved[3] = 1;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.reserved[3] = 0;
    cfg.cpu_affinity = 2; /* not a UBLK_AFFINITY_* value */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.cpu_affinity = UBLK_AFFINITY_SINGLE;
    cfg.recovery = 4; /* not a UBLK_RECOVERY_* value */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.recovery = UBLK_RECOVERY_REISSUE;
    cfg.flags = 1ULL << 3; /* UBLK_F_USER_RECOVERY: chosen with recovery, not flags */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.flags = 1ULL << 5; /* UBLK_F_UNPRIVILEGED_DEV: no recovery for those */
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);
    cfg.flags = 0;
    cfg.recovery = UBLK_RECOVERY_NONE;
    cfg.timeout_ms = 0;
    EXPECT(ublk_dev_new(&cfg, &ops, NULL, &dev), -EINVAL);

    /* recovery: bad arguments, and a device that has no state file */
    EXPECT(ublk_dev_recover(0, NULL, NULL, NULL, &dev), -EINVAL);
    EXPECT(ublk_dev_recover(0, NULL, &ops, NULL, NULL), -EINVAL);
    EXPECT(ublk_dev_recover(0, NULL, &no_ops, NULL, &dev), -EINVAL);
    EXPECT(ublk_dev_recover(123456, "/nonexistent/ublk-state", &ops, NULL, &dev), -ENOENT);
    CHECK(ublk_last_error_message(msg, sizeof(msg)) > 0 && strstr(msg, "state file"), "message: %s", msg);
    CHECK(dev == (ublk_dev *)0x1, "out written on failure");
    CHECK(ublk_dev_target_name(NULL) == NULL && ublk_dev_target_args(NULL) == NULL, "target name/args of NULL");

    EXPECT(ublk_dev_start(NULL), -EINVAL);
    EXPECT(ublk_dev_serve(NULL), -EINVAL);
    EXPECT(ublk_dev_stop(NULL), -EINVAL);
    EXPECT(ublk_dev_wait(NULL, 0), -EINVAL);
    EXPECT(ublk_dev_id(NULL), -EINVAL);
    CHECK(ublk_dev_path(NULL) == NULL, "path of NULL");
    EXPECT(ublk_dev_get_info(NULL, NULL), -EINVAL);
    EXPECT(ublk_dev_queue_stats(NULL, 0, NULL), -EINVAL);
    ublk_dev_free(NULL);
    EXPECT(ublk_features(NULL), -EINVAL);

    EXPECT(ublk_io_complete(NULL, 0), -EINVAL);
    EXPECT(ublk_io_complete((ublk_io *)junk, 0), -EINVAL); /* not a handle */
    {
        ublk_io *ios[2] = { NULL, (ublk_io *)junk };
        int res[2] = { 0, 0 }, st[2] = { 1, 1 };
        EXPECT(ublk_io_complete_batch(NULL, res, 1, NULL), -EINVAL);
        EXPECT(ublk_io_complete_batch(ios, NULL, 1, NULL), -EINVAL);
        EXPECT(ublk_io_complete_batch(NULL, NULL, 0, NULL), 0); /* nothing to do */
        EXPECT(ublk_io_complete_batch(ios, res, 2, st), -EINVAL);
        EXPECT(st[0], -EINVAL);
        EXPECT(st[1], -EINVAL);
    }
    EXPECT(ublk_io_op(NULL), -EINVAL);
    EXPECT(ublk_io_len(NULL), 0);
    CHECK(ublk_io_buf(NULL) == NULL, "buf of NULL");
    EXPECT(ublk_io_lease_read(NULL, 0, 0, 0, 512, NULL, NULL), -EINVAL);
    EXPECT(ublk_io_lease_write((ublk_io *)junk, 0, 0, 0, 512, NULL, NULL), -EINVAL);
    EXPECT(ublk_io_lease_manual(NULL), -EINVAL);
    EXPECT(ublk_io_fsync(NULL, 0, 0, NULL, NULL), -EINVAL);
    EXPECT(ublk_io_register_fd(NULL, 0), -EINVAL);
    CHECK(strcmp(ublk_data_mode_name(UBLK_DATA_AUTO_BUF_REG), "auto-buf-reg") == 0, "mode name");
    CHECK(strcmp(ublk_data_mode_name(77), "unknown") == 0, "unknown mode name");

    CHECK(strstr(ublk_strerror(-EINVAL), "EINVAL") != NULL, "strerror: %s", ublk_strerror(-EINVAL));
    CHECK(strstr(ublk_strerror(-ENOTRECOVERABLE), "panic") != NULL, "strerror panic");
    CHECK(strcmp(ublk_feature_name(7), "USER_COPY") == 0, "feature name 7");
    CHECK(ublk_feature_name(63) == NULL, "unknown feature name");

    /* the built-in NBD client: configuration errors and an unreachable server
     * (port 1 of the loopback) are refused before any device exists */
    struct ublk_nbd_config nbd;
    EXPECT(ublk_nbd_config_init(NULL), -EINVAL);
    EXPECT(ublk_nbd_config_init(&nbd), 0);
    CHECK(nbd.port == 10809 && nbd.connections == 1 && nbd.timeout_ms == 30000, "nbd defaults");
    EXPECT(ublk_nbd_dev_new(NULL, NULL, &dev), -EINVAL);
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, &dev), -EINVAL); /* no host */
    CHECK(ublk_last_error_message(msg, sizeof(msg)) > 0 && strstr(msg, "host"), "message: %s", msg);
    nbd.host = "127.0.0.1";
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, NULL), -EINVAL);
    nbd.connections = 0;
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, &dev), -EINVAL);
    nbd.connections = 1;
    nbd.timeout_ms = 10;
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, &dev), -EINVAL);
    nbd.timeout_ms = 5000;
    nbd.reserved[1] = 1;
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, &dev), -EINVAL);
    nbd.reserved[1] = 0;
    ublk_dev_config_init(&cfg);
    cfg.size = 1 << 20;
    EXPECT(ublk_nbd_dev_new(&cfg, &nbd, &dev), -EINVAL); /* the size is the export's */
    nbd.port = 1;
    EXPECT(ublk_nbd_dev_new(NULL, &nbd, &dev), -ECONNREFUSED);
    CHECK(dev == (ublk_dev *)0x1, "out written on failure");
}

/* ---- kernel part ---------------------------------------------------------- */

enum mode { M_DOUBLE, M_OVERSIZE, M_HOLD, M_LEASE, M_OK };
struct state {
    enum mode mode;
    int r1, r2, backing;
    int zero_fd;             /* /dev/zero: what M_LEASE reads */
    int l_dir, l_range, l_empty, l_badfd, l_ok; /* M_LEASE results */
    int reg_bad, reg_ok, reg_again, reg_foreign; /* ublk_io_register_fd results */
    ublk_io *held;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int got;
};

static void backing_done(void *user, ublk_io *io, int res) { (void)user; ublk_io_complete(io, res); }

static void *foreign_backing(void *arg)
{
    struct state *s = arg;
    char msg[256];
    s->backing = ublk_io_fsync(s->held, 0, 0, backing_done, NULL);
    s->reg_foreign = ublk_io_register_fd(s->held, s->zero_fd);
    if (s->backing != -EXDEV && ublk_last_error_message(msg, sizeof(msg)) > 0)
        printf("foreign backing IO: %s\n", msg);
    return NULL;
}

/* Only the test's own reads (at PROBE_OFF) get the mode's treatment: udev and
 * the partition scan read the device too, at other offsets. */
#define PROBE_OFF (8 << 20)

static void k_handle(void *user, ublk_io *io)
{
    struct state *s = user;
    int len = (int)ublk_io_len(io);
    enum mode mode = ublk_io_offset(io) == PROBE_OFF ? s->mode : M_OK;

    switch (mode) {
    case M_DOUBLE:
        s->r1 = ublk_io_complete(io, len);
        s->r2 = ublk_io_complete(io, len);
        break;
    case M_OVERSIZE:
        s->r1 = ublk_io_complete(io, len + 1);
        s->r2 = ublk_io_complete(io, len); /* already failed with EIO */
        break;
    case M_HOLD: /* keep it; the test thread completes it */
        s->held = io;
        break;
    case M_LEASE: /* direction and range violations, then a good lease */
        if (ublk_io_op(io) == UBLK_OP_READ) {
            s->l_dir = ublk_io_lease_write(io, s->zero_fd, 0, 0, (uint32_t)len, NULL, NULL);
            /* the read below then goes through the ring's fixed file */
            s->reg_bad = ublk_io_register_fd(io, -1);
            s->reg_ok = ublk_io_register_fd(io, s->zero_fd);
            s->reg_again = ublk_io_register_fd(io, s->zero_fd);
            s->l_ok = ublk_io_lease_read(io, s->zero_fd, 0, 0, (uint32_t)len, NULL, NULL);
        } else {
            s->l_dir = ublk_io_lease_read(io, s->zero_fd, 0, 0, (uint32_t)len, NULL, NULL);
            s->l_ok = ublk_io_complete(io, len);
        }
        s->l_range = ublk_io_lease_read(io, s->zero_fd, 0, (uint32_t)len - 96, 200, NULL, NULL);
        s->l_empty = ublk_io_lease_read(io, s->zero_fd, 0, 0, 0, NULL, NULL);
        s->l_badfd = ublk_io_lease_send(io, -1, 0, 512, NULL, NULL);
        /* completing while the lease is in flight waits for it */
        s->r1 = ublk_io_complete(io, len);
        break;
    case M_OK:
        ublk_io_complete(io, len);
        return;
    }
    pthread_mutex_lock(&s->lock);
    s->got = 1;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

struct reader { const char *path; ssize_t res; int err; int write; int check_zero; };

static void *do_read(void *arg)
{
    struct reader *r = arg;
    void *buf = NULL;
    int fd = open(r->path, O_RDONLY | O_DIRECT);
    if (r->write) {
        if (fd >= 0)
            close(fd);
        fd = open(r->path, O_WRONLY | O_DIRECT);
    }
    if (fd < 0 || posix_memalign(&buf, 4096, 4096)) {
        r->res = -1;
        r->err = errno;
    } else if (r->write) {
        memset(buf, 0x5a, 4096);
        r->res = pwrite(fd, buf, 4096, PROBE_OFF);
        r->err = r->res < 0 ? errno : 0;
    } else {
        memset(buf, 0xa5, 4096);
        r->res = pread(fd, buf, 4096, PROBE_OFF);
        for (int i = 0; r->check_zero && r->res == 4096 && i < 4096; i++)
            if (((unsigned char *)buf)[i] != 0) {
                r->res = -2; /* M_LEASE reads /dev/zero: anything else is wrong */
                break;
            }
        r->err = r->res < 0 ? errno : 0;
    }
    if (fd >= 0)
        close(fd);
    free(buf);
    return NULL;
}

static void wait_got(struct state *s)
{
    pthread_mutex_lock(&s->lock);
    while (!s->got)
        pthread_cond_wait(&s->cond, &s->lock);
    s->got = 0;
    pthread_mutex_unlock(&s->lock);
}

static void kernel_checks(void)
{
    struct state s = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
    struct ublk_target_ops ops = { .handle_io = k_handle };
    struct ublk_dev_config cfg;
    struct ublk_dev_info info;
    struct ublk_queue_stats st;
    struct reader rd;
    pthread_t t;
    ublk_dev *dev = NULL;
    int r;

    ublk_dev_config_init(&cfg);
    cfg.size = 16 << 20;
    cfg.queue_depth = 4;
    cfg.target_name = "c-errors";
    r = ublk_dev_new(&cfg, &ops, &s, &dev);
    CHECK(r == 0, "ublk_dev_new: %s", ublk_strerror(r));
    if (r)
        return;
    EXPECT(ublk_dev_stop(dev), -EALREADY); /* never started */
    EXPECT(ublk_dev_queue_stats(dev, 0, &st), -EAGAIN);
    s.mode = M_OK; /* partition scan reads at start */
    EXPECT(ublk_dev_start(dev), 0);
    EXPECT(ublk_dev_start(dev), -EALREADY);
    EXPECT(ublk_dev_get_info(dev, &info), 0);
    CHECK(info.queue_depth == 4 && info.size == 16 << 20 && info.data_mode != UBLK_DATA_AUTO, "info");
    printf("data mode: %s\n", ublk_data_mode_name(info.data_mode));
    rd.path = ublk_dev_path(dev);
    rd.write = 0;
    s.zero_fd = open("/dev/zero", O_RDONLY);
    CHECK(s.zero_fd >= 0, "open /dev/zero");

    s.mode = M_LEASE;
    rd.check_zero = 1;
    pthread_create(&t, NULL, do_read, &rd);
    wait_got(&s);
    pthread_join(t, NULL);
    EXPECT(s.l_dir, -EPERM);   /* a READ request's buffer is a destination only */
    EXPECT(s.reg_bad, -EBADF);
    EXPECT(s.reg_ok, 0);       /* every kernel with ublk has sparse file tables */
    EXPECT(s.reg_again, 0);    /* a no-op */
    EXPECT(s.l_ok, 0);
    EXPECT(s.l_range, -EINVAL);
    EXPECT(s.l_empty, -EINVAL);
    EXPECT(s.l_badfd, -EPERM); /* send is a source: direction is checked first */
    EXPECT(s.r1, 0);
    EXPECT(rd.res, 4096);      /* and the data is /dev/zero's */
    rd.write = 1;
    pthread_create(&t, NULL, do_read, &rd);
    wait_got(&s);
    pthread_join(t, NULL);
    EXPECT(s.l_dir, -EPERM);   /* a WRITE request's buffer is a source only */
    EXPECT(s.l_ok, 0);
    EXPECT(s.r1, -EALREADY);
    EXPECT(s.l_range, -EALREADY);
    EXPECT(rd.res, 4096);
    rd.write = 0;
    rd.check_zero = 0;

    s.mode = M_DOUBLE;
    pthread_create(&t, NULL, do_read, &rd);
    wait_got(&s);
    pthread_join(t, NULL);
    EXPECT(s.r1, 0);
    EXPECT(s.r2, -EALREADY);
    EXPECT(rd.res, 4096);

    s.mode = M_OVERSIZE;
    pthread_create(&t, NULL, do_read, &rd);
    wait_got(&s);
    pthread_join(t, NULL);
    EXPECT(s.r1, -EINVAL);
    EXPECT(s.r2, -EALREADY);
    CHECK(rd.res < 0 && rd.err == EIO, "oversized result fails the read with EIO: res %zd errno %d", rd.res, rd.err);

    s.mode = M_HOLD;
    pthread_create(&t, NULL, do_read, &rd);
    wait_got(&s);
    {
        pthread_t f;
        pthread_create(&f, NULL, foreign_backing, &s);
        pthread_join(f, NULL);
        EXPECT(s.backing, -EXDEV);
        EXPECT(s.reg_foreign, -EXDEV);
    }
    {
        /* from this (non-queue) thread, in a batch that also holds it twice
         * and one result too large: the first completes it, the others are
         * refused each with its own error */
        ublk_io *ios[3] = { s.held, s.held, s.held };
        int res[3] = { 4096, 4096, 8192 }, st[3] = { 1, 1, 1 };
        EXPECT(ublk_io_complete_batch(ios, res, 3, st), -EALREADY);
        EXPECT(st[0], 0);
        EXPECT(st[1], -EALREADY);
        EXPECT(st[2], -EALREADY);
    }
    pthread_join(t, NULL);
    EXPECT(rd.res, 4096);
    EXPECT(ublk_io_complete(s.held, 4096), -EALREADY);

    EXPECT(ublk_dev_queue_stats(dev, 0, &st), 0);
    CHECK(st.ios >= 3 && st.errors >= 1 && st.in_flight == 0, "stats ios %llu errors %llu in_flight %llu",
          (unsigned long long)st.ios, (unsigned long long)st.errors, (unsigned long long)st.in_flight);
    EXPECT(ublk_dev_queue_stats(dev, 9, &st), -EINVAL);

    /* route table: bad input refused with a clear errno, nothing mapped */
    {
        uint64_t size = 0;
        struct ublk_dev_info di;
        EXPECT(ublk_dev_get_info(dev, &di), 0);
        size = di.size;
        EXPECT(ublk_dev_map(NULL, 0, 4096, 0, 0, UBLK_MAP_READ), -EINVAL);
        EXPECT(ublk_dev_map(dev, 0, 0, 0, 0, UBLK_MAP_READ), -EINVAL);          /* empty */
        EXPECT(ublk_dev_map(dev, 100, 4096, 0, 0, UBLK_MAP_READ), -EINVAL);     /* not block-aligned */
        EXPECT(ublk_dev_map(dev, 0, size + 4096, 0, 0, UBLK_MAP_READ), -EINVAL); /* past the end */
        EXPECT(ublk_dev_map(dev, size - 4096, UINT64_MAX - 511, 0, 0, UBLK_MAP_READ), -EINVAL); /* wraps */
        EXPECT(ublk_dev_map(dev, 0, 4096, -1, 0, UBLK_MAP_READ), -EBADF);
        EXPECT(ublk_dev_map(dev, 0, 4096, 0, 0, 0), -EINVAL);                   /* no direction */
        EXPECT(ublk_dev_map(dev, 0, 4096, 0, 0, 4), -EINVAL);                   /* unknown flag */
        EXPECT(ublk_dev_map(dev, 0, 4096, 0, UINT64_MAX, UBLK_MAP_READ), -EINVAL); /* file offset wraps */
        EXPECT(ublk_dev_unmap(dev, 0, size + 4096), -EINVAL);
        EXPECT(ublk_dev_unmap(dev, 0, size), 0);                                /* nothing mapped: fine */
    }

    s.mode = M_OK;
    EXPECT(ublk_dev_stop(dev), 0);
    EXPECT(ublk_dev_wait(dev, 10000), 0);
    EXPECT(ublk_io_complete(s.held, 4096), -ESHUTDOWN); /* use after stop */
    EXPECT(ublk_dev_start(dev), -EALREADY);
    r = ublk_dev_stop(dev); /* a second stop: done already, no harm */
    CHECK(r == 0 || r == -ENODEV, "second stop: %s", ublk_strerror(r));
    {
        /* a device without recovery cannot be taken over, even stopped */
        ublk_dev *again = (ublk_dev *)0x1;
        r = ublk_dev_recover((uint32_t)ublk_dev_id(dev), NULL, &ops, &s, &again);
        CHECK(r == -EINVAL || r == -ENODEV, "recover of a device without recovery: %s", ublk_strerror(r));
        CHECK(again == (ublk_dev *)0x1, "out written on failure");
    }
    {
        /* stale id: after free, the id names no device and no state file */
        uint32_t id = (uint32_t)ublk_dev_id(dev);
        ublk_dev *again = (ublk_dev *)0x1;
        ublk_dev_free(dev);
        EXPECT(ublk_dev_recover(id, NULL, &ops, &s, &again), -ENOENT);
    }
    ublk_dev_config_init(&cfg);
    cfg.size = 16 << 20;
    cfg.dev_id = 1 << 20; /* ids stop below 2^20 */
    dev = NULL;
    r = ublk_dev_new(&cfg, &ops, &s, &dev);
    CHECK(r == -EINVAL && dev == NULL, "dev_id 2^20: %s", ublk_strerror(r));
    close(s.zero_fd);
}

/* Calls that wait for the queue threads, made on one (a callback), and a
 * start that fails in queue_init. */
struct cbstate { ublk_dev *dev; int wait, serve, stop, done; pthread_mutex_t lock; pthread_cond_t cond; };

static void cb_handle(void *user, ublk_io *io)
{
    struct cbstate *c = user;
    int len = (int)ublk_io_len(io);
    if (ublk_io_offset(io) != PROBE_OFF) {
        ublk_io_complete(io, ublk_io_op(io) == UBLK_OP_READ || ublk_io_op(io) == UBLK_OP_WRITE ? len : 0);
        return;
    }
    c->wait = ublk_dev_wait(c->dev, -1);  /* would wait for itself forever */
    c->serve = ublk_dev_serve(c->dev);
    ublk_dev_free(c->dev);                 /* refused (on stderr): dev stays valid */
    ublk_io_complete(io, len);
    c->stop = ublk_dev_stop(c->dev);       /* done on a thread of its own */
    pthread_mutex_lock(&c->lock);
    c->done = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static int failing_init(void *user, uint16_t q, void **data) { (void)user; (void)q; (void)data; return -ENOMEM; }

static void callback_checks(void)
{
    struct cbstate c = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
    struct ublk_target_ops ops = { .handle_io = cb_handle };
    struct ublk_dev_config cfg;
    struct reader rd = { 0 };
    pthread_t t;
    char path[64];
    int r, id, i;

    ublk_dev_config_init(&cfg);
    cfg.size = 16 << 20;
    cfg.queue_depth = 4;
    r = ublk_dev_new(&cfg, &ops, &c, &c.dev);
    CHECK(r == 0, "ublk_dev_new: %s", ublk_strerror(r));
    if (r)
        return;
    EXPECT(ublk_dev_start(c.dev), 0);
    rd.path = ublk_dev_path(c.dev);
    pthread_create(&t, NULL, do_read, &rd);
    pthread_join(t, NULL);
    pthread_mutex_lock(&c.lock);
    while (!c.done)
        pthread_cond_wait(&c.cond, &c.lock);
    pthread_mutex_unlock(&c.lock);
    CHECK(rd.res == 4096, "the read during the callback checks: %zd (errno %d)", rd.res, rd.err);
    CHECK(c.wait == -EDEADLK, "ublk_dev_wait on a queue thread: %s", ublk_strerror(c.wait));
    CHECK(c.serve == -EDEADLK, "ublk_dev_serve on a queue thread: %s", ublk_strerror(c.serve));
    CHECK(c.stop == 0, "ublk_dev_stop on a queue thread: %s", ublk_strerror(c.stop));
    EXPECT(ublk_dev_wait(c.dev, 20000), 0); /* the stop from the callback took effect */
    ublk_dev_free(c.dev);

    /* queue_init fails: start gives its error, the device cannot start
     * again, serve says so too, and free deletes it */
    ops.queue_init = failing_init;
    c.dev = NULL;
    r = ublk_dev_new(&cfg, &ops, &c, &c.dev);
    CHECK(r == 0, "ublk_dev_new: %s", ublk_strerror(r));
    if (r)
        return;
    id = ublk_dev_id(c.dev);
    EXPECT(ublk_dev_start(c.dev), -ENOMEM);
    EXPECT(ublk_dev_start(c.dev), -EINVAL);
    EXPECT(ublk_dev_serve(c.dev), -EINVAL);
    EXPECT(ublk_dev_stop(c.dev), -EALREADY);
    ublk_dev_free(c.dev);
    snprintf(path, sizeof(path), "/dev/ublkc%d", id);
    for (i = 0; i < 100 && access(path, F_OK) == 0; i++)
        usleep(50000);
    CHECK(access(path, F_OK) != 0, "%s still there after free of a device whose start failed", path);
}

int main(void)
{
    host_checks();
    if (access("/dev/ublk-control", F_OK) == 0) {
        kernel_checks();
        callback_checks();
    }
    else {
        printf("SKIP: kernel checks: /dev/ublk-control missing\n");
        skipped++;
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed != 0;
}
