package ublk

/*
#include "bridge.h"
*/
import "C"

import (
	"fmt"
	"math"
	"runtime/cgo"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Op is a request's operation.
type Op int

const (
	OpRead        Op = C.UBLK_OP_READ
	OpWrite       Op = C.UBLK_OP_WRITE
	OpFlush       Op = C.UBLK_OP_FLUSH
	OpDiscard     Op = C.UBLK_OP_DISCARD
	OpWriteZeroes Op = C.UBLK_OP_WRITE_ZEROES
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "READ"
	case OpWrite:
		return "WRITE"
	case OpFlush:
		return "FLUSH"
	case OpDiscard:
		return "DISCARD"
	case OpWriteZeroes:
		return "WRITE_ZEROES"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// Request flag bits (Request.Flags).
const (
	FlagFUA     = C.UBLK_FLAG_FUA     // force unit access: the write must be durable when completed
	FlagNoUnmap = C.UBLK_FLAG_NOUNMAP // WRITE_ZEROES must not deallocate
)

// Request is one IO request of a device. Its accessors may be used from any
// goroutine until it is completed; complete it exactly once.
type Request struct {
	dev   *Device
	io    *C.ublk_io // a C handle, owned by the device
	op    Op
	flags uint32
	off   int64
	n     int
	queue int
	tag   int
	buf   unsafe.Pointer // C memory (copy mode) or nil
	done  atomic.Uint32  // notDone, doneCompleted or doneByLeases
	// result: the batch entry's result field (C memory) while the binding's
	// own backend serves the request inside the batch callback; nil otherwise
	result *C.int32_t
	// written on the request's queue thread only (after a lease call
	// succeeded, which it does only there); atomic for the race detector,
	// which cannot tell that two callbacks run on one thread
	leasesCB atomic.Int32 // lease operations with an OnDone callback in flight
	manual   atomic.Bool  // Lease.Manual: the engine does not complete the request
}

// Request.done: whether the request may still be completed with Complete.
const (
	notDone       uint32 = iota
	doneCompleted        // Complete was called, or the engine completes it (backing op without callback, after the last lease callback)
	doneByLeases         // a lease without OnDone: the engine completes it when its last operation is over (Manual undoes it)
)

func (r *Request) Op() Op          { return r.op }
func (r *Request) Flags() uint32   { return r.flags }
func (r *Request) FUA() bool       { return r.flags&FlagFUA != 0 }
func (r *Request) Offset() int64   { return r.off }
func (r *Request) Len() int        { return r.n }
func (r *Request) Queue() int      { return r.queue }
func (r *Request) Tag() int        { return r.tag }
func (r *Request) Device() *Device { return r.dev }
func (r *Request) String() string {
	return fmt.Sprintf("%v %d@%d (queue %d tag %d)", r.op, r.n, r.off, r.queue, r.tag)
}
func (r *Request) NoUnmap() bool { return r.flags&FlagNoUnmap != 0 }

// Data is the request's data buffer in copy mode (READ: fill it; WRITE: read
// it): engine memory, valid until the request is completed — do not keep it
// (or slices of it) beyond that, nor beyond Close. nil for requests without
// data, after completion (also once a lease without OnDone or a backing
// operation completes it), after Close, and in the other data modes (use
// Lease there).
func (r *Request) Data() []byte {
	if r.buf == nil || r.done.Load() != notDone || r.dev.freed.Load() {
		return nil
	}
	return unsafe.Slice((*byte)(r.buf), r.n)
}

// Complete completes the request, from any goroutine: result is the bytes
// done for READ/WRITE (at most Len), 0 for other ops, or a negative errno
// (-int(syscall.EIO)). Errors: EALREADY (completed before), EINVAL (result >
// Len: the request then fails with EIO), ESHUTDOWN (the device stopped),
// ErrClosed (the device was closed).
func (r *Request) Complete(result int) error {
	if !r.done.CompareAndSwap(notDone, doneCompleted) {
		return &Error{Op: "complete", Errno: syscall.EALREADY, Detail: "request already completed"}
	}
	if result > math.MaxInt32 {
		result = math.MaxInt32 // more than any request: refused, the request fails with EIO
	} else if result < -4095 {
		result = -int(syscall.EIO)
	}
	if r.result != nil { // inside the batch callback: the engine completes it on return
		*r.result = C.int32_t(result)
		return nil
	}
	d := r.dev
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.dev == nil {
		return ErrClosed
	}
	return errno("complete", C.ublk_io_complete(r.io, C.int(result)))
}

// Fail completes the request with the error err (Errno(err): its
// syscall.Errno, else EIO), or successfully (Len bytes) when err is nil.
func (r *Request) Fail(err error) error {
	if err == nil {
		if r.op == OpRead || r.op == OpWrite {
			return r.Complete(r.n)
		}
		return r.Complete(0)
	}
	return r.Complete(Errno(err))
}

// OpFunc is called on the queue thread when a lease or backing operation is
// over: res is its syscall-style result (bytes, 0, or a negative errno). It
// may submit more operations or complete r.
type OpFunc func(r *Request, res int)

type opCallback struct {
	r     *Request
	fn    OpFunc
	lease bool // of a lease operation (else a backing one: Fsync, Fallocate)
}

// run calls the callback; it returns a recovered panic to report.
func (c *opCallback) run(res int) (rep error) {
	defer func() {
		if p := recover(); p != nil {
			rep = recovered(c.r, p, c.lease)
		}
	}()
	c.fn(c.r, res)
	return nil
}

//export goUblkOpDone
func goUblkOpDone(cb C.uintptr_t, io *C.ublk_io, res C.int) {
	h := cgo.Handle(cb)
	c := h.Value().(*opCallback)
	h.Delete()
	err := c.run(int(res))
	r := c.r
	if c.lease {
		// after the last lease callback the engine completes a request
		// nobody completed (unless Manual): a later Complete must not reach
		// the tag's next request
		if r.leasesCB.Add(-1) == 0 && !r.manual.Load() {
			r.done.CompareAndSwap(notDone, doneCompleted)
		}
	}
	if err != nil {
		r.dev.report(err)
	}
}

// submit runs a call that takes an optional callback handle (lease: of a
// lease operation).
func (r *Request) submit(name string, fn OpFunc, lease bool, f func(cb C.uintptr_t) C.int) error {
	var h cgo.Handle
	var cb C.uintptr_t
	if fn != nil {
		h = cgo.NewHandle(&opCallback{r: r, fn: fn, lease: lease})
		cb = C.uintptr_t(h)
	}
	d := r.dev
	d.mu.RLock()
	defer d.mu.RUnlock()
	err := ErrClosed
	if d.dev != nil {
		err = call(name, func() C.int { return f(cb) })
	}
	if err != nil && fn != nil {
		h.Delete()
	}
	return err
}

// fdErr refuses an fd that is not a C int >= 0 (EBADF), rather than pass
// a truncated one.
func fdErr(name string, fd int) error {
	if fd < 0 || fd > math.MaxInt32 {
		return &Error{Op: name, Errno: syscall.EBADF, Detail: fmt.Sprintf("bad file descriptor %d", fd)}
	}
	return nil
}

func rangeErr(name string, what string, v ...int64) error {
	for _, x := range v {
		if x < 0 || x > math.MaxUint32 {
			return &Error{Op: name, Errno: syscall.EINVAL, Detail: what + " out of range"}
		}
	}
	return nil
}

// Fsync runs fsync (fdatasync if datasync) of fd on the queue's ring, only
// from HandleIO or an OpFunc. With done nil its result completes the request
// (which counts as completed from the call on); otherwise done runs when it
// is over. fd must stay open until then (EBADF for an fd outside 0..2^31-1).
func (r *Request) Fsync(fd int, datasync bool, done OpFunc) error {
	if err := fdErr("fsync", fd); err != nil {
		return err
	}
	ds := C.int(0)
	if datasync {
		ds = 1
	}
	err := r.submit("fsync", done, false, func(cb C.uintptr_t) C.int { return C.ublkgo_fsync(r.io, C.int(fd), ds, cb) })
	if err == nil && done == nil {
		r.done.Store(doneCompleted)
	}
	return err
}

// Fallocate runs fallocate(fd, mode, off, n) on the queue's ring (e.g.
// FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE for DISCARD); as Fsync.
func (r *Request) Fallocate(fd int, mode uint32, off, n int64, done OpFunc) error {
	if err := fdErr("fallocate", fd); err != nil {
		return err
	}
	if off < 0 || n < 0 {
		return &Error{Op: "fallocate", Errno: syscall.EINVAL, Detail: "negative range"}
	}
	err := r.submit("fallocate", done, false, func(cb C.uintptr_t) C.int {
		return C.ublkgo_fallocate(r.io, C.int(fd), C.int(mode), C.uint64_t(off), C.uint64_t(n), cb)
	})
	if err == nil && done == nil {
		r.done.Store(doneCompleted)
	}
	return err
}

// Lease lends the request's buffer to IO on files and sockets, run on the
// queue's io_uring: zero copy where the data mode allows, so the data never
// passes through Go. Only from HandleIO or an OpFunc of the request (EXDEV
// otherwise). Direction is enforced: ReadInto and Recv fill a READ request,
// WriteFrom and Send drain a WRITE request (EPERM otherwise). Ranges (off, n)
// are inside the request (EINVAL otherwise); several may be in flight at once.
// Without OnDone the request completes by itself when its last operation is
// over, with the total bytes or the first error: the request counts as
// completed from the call on (Complete gives EALREADY, Data nil), unless
// Manual. With OnDone it completes by itself too after the last callback
// returns, if that did not complete it (and not Manual); from then on it
// counts as completed.
type Lease struct {
	r    *Request
	done OpFunc
}

// Lease returns the request's lease.
func (r *Request) Lease() Lease { return Lease{r: r} }

// OnDone returns a lease whose next operations call fn when they are over.
func (l Lease) OnDone(fn OpFunc) Lease {
	l.done = fn
	return l
}

func (l Lease) op(kind C.int, name string, fd int, fileOff int64, off, n int) error {
	if err := rangeErr(name, "offset or length", int64(off), int64(n)); err != nil {
		return err
	}
	if fileOff < 0 {
		return &Error{Op: name, Errno: syscall.EINVAL, Detail: "negative file offset"}
	}
	if err := fdErr(name, fd); err != nil {
		return err
	}
	r := l.r
	err := r.submit(name, l.done, true, func(cb C.uintptr_t) C.int {
		return C.ublkgo_lease(kind, r.io, C.int(fd), C.uint64_t(fileOff), C.uint32_t(off), C.uint32_t(n), cb)
	})
	if err != nil {
		return err
	}
	// accepted: so on the request's queue thread, which owns these fields
	if l.done != nil {
		r.leasesCB.Add(1)
	} else if !r.manual.Load() {
		// the engine completes the request when its last operation is over
		r.done.CompareAndSwap(notDone, doneByLeases)
	}
	return nil
}

// ReadInto fills [off, off+n) of a READ request from fd at fileOff (zeroes
// past the end of the file).
func (l Lease) ReadInto(fd int, fileOff int64, off, n int) error {
	return l.op(C.UBLKGO_LEASE_READ, "lease.read_into", fd, fileOff, off, n)
}

// WriteFrom writes [off, off+n) of a WRITE request to fd at fileOff
// (RWF_DSYNC when the request has FUA).
func (l Lease) WriteFrom(fd int, fileOff int64, off, n int) error {
	return l.op(C.UBLKGO_LEASE_WRITE, "lease.write_from", fd, fileOff, off, n)
}

// Send sends [off, off+n) of a WRITE request on the stream socket sock.
func (l Lease) Send(sock int, off, n int) error {
	return l.op(C.UBLKGO_LEASE_SEND, "lease.send", sock, 0, off, n)
}

// Recv receives exactly n bytes from the stream socket sock into [off,
// off+n) of a READ request (ECONNRESET if the peer closes first).
func (l Lease) Recv(sock int, off, n int) error {
	return l.op(C.UBLKGO_LEASE_RECV, "lease.recv", sock, 0, off, n)
}

// RegisterFd registers fd in the file table of the request's queue ring, so
// that the operations the queue submits on it (leases, Fsync, Fallocate) skip
// a file lookup each: what a loop backend does once per queue for its backing
// file. Only from HandleIO or an OpFunc, on the queue thread (EXDEV
// otherwise); fd must stay open while the device serves. Registering twice is
// a no-op; EOPNOTSUPP on kernels without sparse file tables (IO on fd works
// the same); EBADF for an fd outside 0..2^31-1; ErrClosed after Close.
func (r *Request) RegisterFd(fd int) error {
	if err := fdErr("register_fd", fd); err != nil {
		return err
	}
	return r.submit("register_fd", nil, false, func(C.uintptr_t) C.int { return C.ublk_io_register_fd(r.io, C.int(fd)) })
}

// Manual turns off the automatic completion: the request is completed with
// Request.Complete (held back until the operations in flight are over), also
// after a lease without OnDone.
func (l Lease) Manual() error {
	r := l.r
	err := r.submit("lease.manual", nil, false, func(C.uintptr_t) C.int { return C.ublk_io_lease_manual(r.io) })
	if err != nil {
		return err
	}
	r.manual.Store(true)
	// not completed by the engine after all: Complete is up to the caller again
	r.done.CompareAndSwap(doneByLeases, notDone)
	return nil
}
