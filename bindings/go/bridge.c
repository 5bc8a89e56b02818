#include "bridge.h"
#include "_cgo_export.h"

/* Non-zero while this thread runs one of the callbacks below: a queue thread
 * of a device, inside Go code the queue thread waits for. */
static __thread int in_callback;

int ublkgo_on_queue_thread(void)
{
    return in_callback;
}

/* The requests of one pass over a queue ring: everything Go needs, in one
 * crossing for the whole batch (a C-to-Go call costs far more than a C call). */
static void handle_batch(void *user, struct ublk_io_batch_entry *e, uint32_t n)
{
    in_callback++;
    goUblkHandleBatch((uintptr_t)user, e, n);
    in_callback--;
}

static void op_done(void *user, ublk_io *io, int res)
{
    in_callback++;
    goUblkOpDone((uintptr_t)user, io, res);
    in_callback--;
}

static void complete_with(void *user, ublk_io *io, int res)
{
    (void)user;
    ublk_io_complete(io, res);
}

static const struct ublk_target_ops ops = { .handle_batch = handle_batch };

int ublkgo_dev_new(const struct ublk_dev_config *cfg, uintptr_t handle, ublk_dev **out)
{
    return ublk_dev_new(cfg, &ops, (void *)handle, out);
}

int ublkgo_dev_recover(uint32_t dev_id, const char *state_dir, uintptr_t handle, ublk_dev **out)
{
    return ublk_dev_recover(dev_id, state_dir, &ops, (void *)handle, out);
}

int ublkgo_lease(int kind, ublk_io *io, int fd, uint64_t file_off, uint32_t buf_off, uint32_t len,
                 uintptr_t cb)
{
    ublk_backing_cb f = cb ? op_done : NULL;
    void *u = (void *)cb;

    switch (kind) {
    case UBLKGO_LEASE_READ:
        return ublk_io_lease_read(io, fd, file_off, buf_off, len, f, u);
    case UBLKGO_LEASE_WRITE:
        return ublk_io_lease_write(io, fd, file_off, buf_off, len, f, u);
    case UBLKGO_LEASE_SEND:
        return ublk_io_lease_send(io, fd, buf_off, len, f, u);
    case UBLKGO_LEASE_RECV:
        return ublk_io_lease_recv(io, fd, buf_off, len, f, u);
    }
    return -22; /* EINVAL */
}

int ublkgo_fsync(ublk_io *io, int fd, int datasync, uintptr_t cb)
{
    return ublk_io_fsync(io, fd, datasync, cb ? op_done : complete_with, (void *)cb);
}

int ublkgo_fallocate(ublk_io *io, int fd, int mode, uint64_t off, uint64_t len, uintptr_t cb)
{
    return ublk_io_fallocate(io, fd, mode, off, len, cb ? op_done : complete_with, (void *)cb);
}
