/* Shared option parsing and serving loop of the C examples. */
#ifndef UBLK_EXAMPLE_COMMON_H
#define UBLK_EXAMPLE_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_DIRECT */
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <ublk.h>

struct example_opts {
    uint64_t size;      /* -s bytes (K/M/G suffix) */
    int queues;         /* -q */
    int depth;          /* -d */
    const char *file;   /* -f backing file (loop); comma-separated list (mirror, stripe) */
    uint64_t chunk;     /* -c chunk size (stripe) */
    int threads;        /* -t worker threads (threadpool); 0 when not given */
    int threads_given;  /* -t was given */
    uint32_t data_mode; /* -z auto|auto-buf-reg|register|user-copy|copy */
    uint32_t recovery;  /* -r none|reissue|fail|wait */
    int recover_id;     /* -R ID: take over device ID after its server died (-1: no) */
    int batch;          /* -b: requests in batches (handle_batch), where the example has it */
};

static inline uint32_t example_parse_recovery(const char *s)
{
    static const char *names[] = { "none", "reissue", "fail", "wait" };
    static const uint32_t policies[] = { UBLK_RECOVERY_NONE, UBLK_RECOVERY_REISSUE, UBLK_RECOVERY_FAIL,
                                         UBLK_RECOVERY_WAIT };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i]) == 0)
            return policies[i];
    fprintf(stderr, "bad recovery policy %s (none, reissue, fail or wait)\n", s);
    exit(2);
}

static inline uint32_t example_parse_mode(const char *s)
{
    static const char *names[] = { "auto", "auto-buf-reg", "register", "user-copy", "copy" };
    static const uint32_t modes[] = { UBLK_DATA_AUTO, UBLK_DATA_AUTO_BUF_REG, UBLK_DATA_REGISTER,
                                      UBLK_DATA_USER_COPY, UBLK_DATA_COPY };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i]) == 0)
            return modes[i];
    fprintf(stderr, "bad data mode %s (auto, auto-buf-reg, register, user-copy or copy)\n", s);
    exit(2);
}

static inline uint64_t example_parse_size(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    switch (*end) {
    case 'K': case 'k': v <<= 10; break;
    case 'M': case 'm': v <<= 20; break;
    case 'G': case 'g': v <<= 30; break;
    case 0: break;
    default: fprintf(stderr, "bad size %s\n", s); exit(2);
    }
    return v;
}

static inline void example_parse(int argc, char **argv, struct example_opts *o)
{
    int c;
    o->size = 256ULL << 20;
    o->queues = 1;
    o->depth = 128;
    o->file = NULL;
    o->threads = 0;
    o->threads_given = 0;
    o->data_mode = UBLK_DATA_AUTO;
    o->chunk = 64 << 10;
    o->recovery = UBLK_RECOVERY_NONE;
    o->recover_id = -1;
    o->batch = 0;
    while ((c = getopt(argc, argv, "s:q:d:f:t:z:c:r:R:b")) != -1) {
        switch (c) {
        case 's': o->size = example_parse_size(optarg); break;
        case 'q': o->queues = atoi(optarg); break;
        case 'd': o->depth = atoi(optarg); break;
        case 'f': o->file = optarg; break;
        case 't': o->threads = atoi(optarg); o->threads_given = 1; break;
        case 'z': o->data_mode = example_parse_mode(optarg); break;
        case 'c': o->chunk = example_parse_size(optarg); break;
        case 'r': o->recovery = example_parse_recovery(optarg); break;
        case 'R': o->recover_id = atoi(optarg); break;
        case 'b': o->batch = 1; break;
        default:
            fprintf(stderr, "usage: %s [-s size] [-q queues] [-d depth] [-f file[,file...]] [-t threads] [-z mode] [-c chunk]"
                            " [-r recovery] [-R id] [-b]\n", argv[0]);
            exit(2);
        }
    }
}

/* The defaults, then what the options say: size, queues, depth, data mode. */
static inline void example_config(struct ublk_dev_config *cfg, const struct example_opts *o, uint64_t size,
                                  const char *target_name)
{
    ublk_dev_config_init(cfg);
    cfg->size = size;
    cfg->nr_queues = (uint16_t)o->queues;
    cfg->queue_depth = (uint16_t)o->depth;
    cfg->data_mode = o->data_mode;
    cfg->recovery = o->recovery;
    cfg->target_name = target_name;
}

/* Opens the comma-separated files of -f (O_DIRECT when the file system takes
 * it) into fds[], at most max; returns how many, and the smallest size. */
static inline int example_open_files(const char *list, int *fds, int max, uint64_t *min_size)
{
    char *copy = strdup(list), *save = NULL, *name;
    int n = 0;

    *min_size = UINT64_MAX;
    for (name = strtok_r(copy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        off_t size;
        if (n == max) {
            fprintf(stderr, "too many files (at most %d)\n", max);
            exit(2);
        }
        fds[n] = open(name, O_RDWR | O_DIRECT);
        if (fds[n] < 0)
            fds[n] = open(name, O_RDWR);
        if (fds[n] < 0 || (size = lseek(fds[n], 0, SEEK_END)) < 0) {
            perror(name);
            exit(2);
        }
        if ((uint64_t)size < *min_size)
            *min_size = (uint64_t)size;
        n++;
    }
    free(copy);
    return n;
}

/* Per-request fan-out state (FLUSH on every leg): how many callbacks are
 * still due and the first error. One per tag, kept in the queue data. */
struct fanout {
    int left;
    int err;
};

/* Counts one leg's result; the last one completes the request. */
static inline void fanout_done(void *user, ublk_io *io, int res)
{
    struct fanout *f = (struct fanout *)user + ublk_io_tag(io);

    if (res < 0 && f->err == 0)
        f->err = res;
    if (--f->left == 0)
        ublk_io_complete(io, f->err);
}

/* fdatasync of every fd on the queue ring, completing io when all are done. */
static inline int fanout_fsync(ublk_io *io, const int *fds, int n)
{
    struct fanout *f = (struct fanout *)ublk_io_queue_data(io) + ublk_io_tag(io);

    f->left = n;
    f->err = 0;
    for (int i = 0; i < n; i++) {
        int r = ublk_io_fsync(io, fds[i], 1, fanout_done, ublk_io_queue_data(io));
        if (r < 0) {
            /* the legs submitted still call back (later, on the ring); this
             * one and the ones never submitted count as failed now */
            f->err = f->err ? f->err : r;
            f->left -= n - i;
            if (f->left == 0)
                ublk_io_complete(io, f->err);
            return 0;
        }
    }
    return 0;
}

/* queue_init / queue_deinit of the examples that fan out: a struct fanout per
 * tag. `user` must point to a struct whose first member is the int depth. */
static inline int fanout_queue_init(void *user, uint16_t queue_id, void **queue_data)
{
    int depth = *(int *)user;
    (void)queue_id;
    /* one more: its `left` says the queue registered its files */
    *queue_data = calloc((size_t)depth + 1, sizeof(struct fanout));
    return *queue_data ? 0 : -ENOMEM;
}

/* On a queue's first request (*registered still 0): fds[0..n) into the
 * queue ring's file table (ublk_io_register_fd; the IO works the same where
 * that fails). `registered` lives in the queue data. */
static inline void example_register_fds(ublk_io *io, int *registered, const int *fds, int n)
{
    if (*registered)
        return;
    *registered = 1;
    for (int i = 0; i < n; i++)
        ublk_io_register_fd(io, fds[i]);
}

/* The same for the fan-out examples: the flag is the slot past the depth. */
static inline void fanout_register_fds(ublk_io *io, int depth, const int *fds, int n)
{
    example_register_fds(io, &((struct fanout *)ublk_io_queue_data(io) + depth)->left, fds, n);
}

/* queue_deinit of the examples whose queue_init allocates their queue data. */
static inline void example_queue_free(void *user, uint16_t queue_id, void *queue_data)
{
    (void)user;
    (void)queue_id;
    free(queue_data);
}

/* One stderr line with the data mode and the counters summed over queues. */
static inline void example_log_stats(const char *name, ublk_dev *dev)
{
    struct ublk_dev_info info;
    struct ublk_queue_stats s, t = { 0 };

    if (ublk_dev_get_info(dev, &info) < 0)
        return;
    for (int q = 0; q < info.nr_queues; q++) {
        if (ublk_dev_queue_stats(dev, q, &s) < 0)
            continue;
        t.ios += s.ios;
        t.bytes += s.bytes;
        t.errors += s.errors;
        t.copied_bytes += s.copied_bytes;
        t.lease_ops += s.lease_ops;
    }
    fprintf(stderr, "%s: device %u stopped: mode=%s ios=%llu bytes=%llu errors=%llu copied_bytes=%llu lease_ops=%llu\n",
            name, info.dev_id, ublk_data_mode_name(info.data_mode), (unsigned long long)t.ios,
            (unsigned long long)t.bytes, (unsigned long long)t.errors,
            (unsigned long long)t.copied_bytes, (unsigned long long)t.lease_ops);
}

/* Starts `dev` (made by ublk_dev_new or ublk_dev_recover: r is that call's
 * result), prints "<id> <path>" once /dev/ublkbN exists, serves until
 * SIGINT/SIGTERM or `ublk del`, calls before_free (if any: the last moment
 * request handles may still be used), then deletes the device. */
static inline int example_serve(const char *name, ublk_dev *dev, int r, void *user,
                                void (*before_free)(void *user))
{
    char msg[512];
    if (r == 0)
        r = ublk_dev_start(dev);
    if (r < 0) {
        ublk_last_error_message(msg, sizeof(msg));
        fprintf(stderr, "%s: %s (%s)\n", name, ublk_strerror(r), msg);
        if (before_free)
            before_free(user);
        ublk_dev_free(dev);
        return 1;
    }
    printf("%d %s\n", ublk_dev_id(dev), ublk_dev_path(dev));
    fflush(stdout);
    r = ublk_dev_serve(dev);
    if (r < 0)
        fprintf(stderr, "%s: serve: %s\n", name, ublk_strerror(r));
    example_log_stats(name, dev);
    if (before_free)
        before_free(user);
    ublk_dev_free(dev);
    return r < 0;
}

/* Creates the device from cfg, then as example_serve. */
static inline int example_run(const char *name, struct ublk_dev_config *cfg,
                              const struct ublk_target_ops *ops, void *user,
                              void (*before_free)(void *user))
{
    ublk_dev *dev = NULL;
    int r = ublk_dev_new(cfg, ops, user, &dev);
    return example_serve(name, dev, r, user, before_free);
}

#endif
