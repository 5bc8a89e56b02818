/* A RAM disk whose requests are completed by a pool of worker threads: the
 * pattern of embedding a ublk front end into a server with its own threads.
 * handle_io only queues the request; a worker copies the data and completes
 * its share of the queue with one ublk_io_complete_batch() call from its own
 * thread (one wake-up of the queue thread per share). With -b, handle_batch
 * queues the requests of a whole pass over the queue ring under one lock and
 * wakes the workers once; each worker takes its share of the queue at a time.
 * Workers are woken after the lock is released: on a busy CPU the woken one
 * often runs at once, and would otherwise block on the lock straight away
 * (two more context switches per wake-up). Without -t there is one worker per
 * CPU the process may run on: more workers than CPUs only take turns.
 * The queue thread puts each request's description and buffer in the pool's
 * ring with it (handle_batch has them in its entries already), so a worker
 * makes no libublk call per request but the completion. */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

/* A request waiting for a worker. */
struct job {
    ublk_io *io;
    void *buf;
    struct ublk_io_desc d;
};

struct pool {
    unsigned char *mem;
    uint64_t size;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct job *ring;   /* pending requests, a circular buffer */
    size_t cap, head, count;
    int stop;
    pthread_t *tids;
    int nthreads;
};

static void handle_io(void *user, ublk_io *io)
{
    struct pool *p = user;
    struct job j = { .io = io, .buf = ublk_io_buf(io) };

    ublk_io_get_desc(io, &j.d);
    pthread_mutex_lock(&p->lock);
    p->ring[(p->head + p->count) % p->cap] = j;
    p->count++;
    pthread_mutex_unlock(&p->lock);
    /* after the unlock (see the top of the file) */
    pthread_cond_signal(&p->cond);
}

/* -b: one lock and one wake-up for the whole batch instead of one per request. */
static void handle_batch(void *user, struct ublk_io_batch_entry *e, uint32_t n)
{
    struct pool *p = user;

    pthread_mutex_lock(&p->lock);
    for (uint32_t i = 0; i < n; i++) {
        struct job *j = &p->ring[(p->head + p->count + i) % p->cap];

        j->io = e[i].io;
        j->buf = e[i].buf;
        j->d = e[i].desc;
    }
    p->count += n;
    pthread_mutex_unlock(&p->lock);
    if (n > 1)
        pthread_cond_broadcast(&p->cond);
    else
        pthread_cond_signal(&p->cond);
}

/* Serves one request; gives its result (bytes done or a negative errno). */
static int serve_one(struct pool *p, const struct job *j)
{
    uint64_t off = j->d.offset;
    uint32_t len = j->d.len;

    if (off + len > p->size)
        return -EIO;
    if (j->d.op == UBLK_OP_READ)
        return memcpy(j->buf, p->mem + off, len), (int)len;
    if (j->d.op == UBLK_OP_WRITE)
        return memcpy(p->mem + off, j->buf, len), (int)len;
    return j->d.op == UBLK_OP_FLUSH ? 0 : -EOPNOTSUPP;
}

static void *worker(void *arg)
{
    struct pool *p = arg;

    struct job *mine = calloc(p->cap, sizeof(*mine));
    ublk_io **ios = calloc(p->cap, sizeof(*ios));
    int *res = calloc(p->cap, sizeof(*res)), *status = calloc(p->cap, sizeof(*status));

    if (!mine || !ios || !res || !status) {
        perror("threadpool: worker");
        free(mine), free(ios), free(res), free(status);
        return NULL;
    }
    for (;;) {
        size_t n, i;

        pthread_mutex_lock(&p->lock);
        while (!p->count && !p->stop)
            pthread_cond_wait(&p->cond, &p->lock);
        if (!p->count) {
            pthread_mutex_unlock(&p->lock);
            free(mine), free(ios), free(res), free(status);
            return NULL;
        }
        /* this worker's share: the others take the rest */
        n = (p->count + p->nthreads - 1) / p->nthreads;
        for (i = 0; i < n; i++) {
            mine[i] = p->ring[p->head];
            p->head = (p->head + 1) % p->cap;
        }
        p->count -= n;
        pthread_mutex_unlock(&p->lock);
        for (i = 0; i < n; i++) {
            res[i] = serve_one(p, &mine[i]);
            ios[i] = mine[i].io;
        }
        /* one wake-up of the queue thread for the whole share */
        if (ublk_io_complete_batch(ios, res, n, status) < 0)
            for (i = 0; i < n; i++)
                if (status[i] < 0) /* -ESHUTDOWN once the device stopped: expected at exit */
                    fprintf(stderr, "threadpool: complete: %s\n", ublk_strerror(status[i]));
    }
}

/* Workers may hold request handles: join them before the device is freed. */
static void stop_workers(void *user)
{
    struct pool *p = user;
    int i;

    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (i = 0; i < p->nthreads; i++)
        pthread_join(p->tids[i], NULL);
}

int main(int argc, char **argv)
{
    struct example_opts o;
    struct ublk_dev_config cfg;
    struct ublk_target_ops ops = { .handle_io = handle_io };
    struct pool p = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
    pthread_t *tids;
    int i, r;

    example_parse(argc, argv, &o);
    if (!o.threads_given) {
        cpu_set_t set;
        o.threads = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    if (o.threads < 1) {
        fprintf(stderr, "threadpool: -t %d: want at least one worker thread\n", o.threads);
        return 2;
    }
    if (o.batch) {
        ops.handle_io = NULL;
        ops.handle_batch = handle_batch;
    }
    p.size = o.size;
    p.mem = mmap(NULL, p.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    /* small pages: random first writes would otherwise zero whole huge pages */
    if (p.mem != MAP_FAILED)
        madvise(p.mem, p.size, MADV_NOHUGEPAGE);
    p.cap = (size_t)o.queues * o.depth;
    p.ring = calloc(p.cap, sizeof(*p.ring));
    tids = calloc(o.threads, sizeof(*tids));
    if (p.mem == MAP_FAILED || !p.ring || !tids) {
        perror("threadpool");
        return 1;
    }
    p.nthreads = o.threads;
    for (i = 0; i < o.threads; i++) {
        int e = pthread_create(&tids[i], NULL, worker, &p);
        if (e) { /* no device yet: nothing to undo but the process */
            fprintf(stderr, "threadpool: worker %d: %s\n", i, strerror(e));
            return 1;
        }
    }

    example_config(&cfg, &o, o.size, "c-threadpool");
    cfg.needs_buffer = 1; /* workers copy through ublk_io_buf() */
    p.tids = tids;
    r = example_run("threadpool", &cfg, &ops, &p, stop_workers);
    free(tids);
    free(p.ring);
    munmap(p.mem, p.size);
    return r;
}
