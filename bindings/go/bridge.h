/* C side of the Go bindings: the callbacks libublk calls, forwarding to the
 * exported Go functions with a cgo.Handle value as the user pointer, so that C
 * never holds a Go pointer. */
#ifndef UBLKGO_BRIDGE_H
#define UBLKGO_BRIDGE_H

#include <stdint.h>
#include <ublk.h>

enum { UBLKGO_LEASE_READ, UBLKGO_LEASE_WRITE, UBLKGO_LEASE_SEND, UBLKGO_LEASE_RECV };

/* ublk_dev_new with the bridge's ops; `handle` is the device's cgo.Handle. */
int ublkgo_dev_new(const struct ublk_dev_config *cfg, uintptr_t handle, ublk_dev **out);
/* ublk_dev_recover with the bridge's ops. */
int ublkgo_dev_recover(uint32_t dev_id, const char *state_dir, uintptr_t handle, ublk_dev **out);

/* A lease operation; `cb` is a cgo.Handle of the Go callback, or 0 for none
 * (the request then completes in aggregate). */
int ublkgo_lease(int kind, ublk_io *io, int fd, uint64_t file_off, uint32_t buf_off, uint32_t len,
                 uintptr_t cb);

/* Non-zero on a queue thread inside a callback into Go (HandleIO, a lease
 * callback): a call that waits for the queue threads would wait for itself. */
int ublkgo_on_queue_thread(void);

/* Backing IO on the queue ring; `cb` 0: the result completes the request. */
int ublkgo_fsync(ublk_io *io, int fd, int datasync, uintptr_t cb);
int ublkgo_fallocate(ublk_io *io, int fd, int mode, uint64_t off, uint64_t len, uintptr_t cb);

#endif
