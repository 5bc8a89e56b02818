/* Shared option parsing and serving loop of the C examples. */
#ifndef UBLK_EXAMPLE_COMMON_H
#define UBLK_EXAMPLE_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <ublk.h>

struct example_opts {
    uint64_t size;      /* -s bytes (K/M/G suffix) */
    int queues;         /* -q */
    int depth;          /* -d */
    const char *file;   /* -f backing file (loop) */
    int threads;        /* -t worker threads (threadpool) */
};

static uint64_t example_parse_size(const char *s)
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

static void example_parse(int argc, char **argv, struct example_opts *o)
{
    int c;
    o->size = 256ULL << 20;
    o->queues = 1;
    o->depth = 128;
    o->file = NULL;
    o->threads = 4;
    while ((c = getopt(argc, argv, "s:q:d:f:t:")) != -1) {
        switch (c) {
        case 's': o->size = example_parse_size(optarg); break;
        case 'q': o->queues = atoi(optarg); break;
        case 'd': o->depth = atoi(optarg); break;
        case 'f': o->file = optarg; break;
        case 't': o->threads = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-s size] [-q queues] [-d depth] [-f file] [-t threads]\n", argv[0]);
            exit(2);
        }
    }
}

/* Creates the device, prints "<id> <path>" once /dev/ublkbN exists, serves
 * until SIGINT/SIGTERM or `ublk del`, calls before_free (if any: the last
 * moment request handles may still be used), then deletes the device. */
static int example_run(const char *name, struct ublk_dev_config *cfg,
                       const struct ublk_target_ops *ops, void *user,
                       void (*before_free)(void *user))
{
    ublk_dev *dev = NULL;
    char msg[512];
    int r = ublk_dev_new(cfg, ops, user, &dev);
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
    if (before_free)
        before_free(user);
    ublk_dev_free(dev);
    return r < 0;
}

#endif
