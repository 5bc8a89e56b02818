package ublk

/*
#include <stdlib.h>
#include "bridge.h"
*/
import "C"

import (
	"context"
	"fmt"
	"io"
	"log"
	"math"
	"runtime"
	"runtime/cgo"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Handler serves requests itself: HandleIO runs on the engine's queue thread
// for each request (Config.Async does not change that) and must not block
// for long. It completes the request with Request.Complete (now, or later
// from any goroutine), or lends its buffer to IO on files and sockets with
// Request.Lease (only here or in a lease callback). A panic fails the
// request with EIO. Every request must be completed: stopping the device
// waits (up to Config.Timeout) for the requests in flight.
type Handler interface {
	HandleIO(r *Request)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(r *Request)

// HandleIO calls f(r).
func (f HandlerFunc) HandleIO(r *Request) { f(r) }

// Optional methods of an io.ReaderAt / io.WriterAt backend.
type (
	// Flusher makes written data durable: FLUSH requests, and after FUA
	// writes. A backend with Flush (or Sync, as *os.File) gets a device with
	// a volatile write cache.
	Flusher interface{ Flush() error }
	// Discarder drops a range (DISCARD). Without it DISCARD succeeds and
	// does nothing.
	Discarder interface{ Discard(off, n int64) error }
	// WriteZeroer zeroes a range (WRITE_ZEROES). Without it, zeroes are
	// written with WriteAt.
	WriteZeroer interface {
		WriteZeroes(off, n int64) error
	}
	syncer interface{ Sync() error }
)

// Info describes a created device.
type Info struct {
	ID         int
	Size       int64
	Queues     int
	Depth      int
	MaxIOBytes int
	DataMode   DataMode // the mode in use (never DataAuto)
	Flags      uint64   // UBLK_F_* bits negotiated with the kernel
	Recovery   Recovery // what happens when the server dies
}

// QueueStats are one queue's counters.
type QueueStats struct {
	IOs         uint64 // requests completed
	Bytes       uint64 // bytes of successful READ/WRITE requests
	Errors      uint64 // requests completed with an error
	InFlight    uint64 // requests handed to the backend and not completed
	CopiedBytes uint64 // data bytes copied (copy and user-copy modes; 0 with zero-copy leases)
	LeaseOps    uint64 // lease operations submitted
}

// Stats are the counters of every queue and their sum.
type Stats struct {
	Queues []QueueStats
	Total  QueueStats
}

// Device is a ublk block device served by this process.
type Device struct {
	handle  cgo.Handle
	rw      *rwBackend // the io.ReaderAt backend, or nil
	handler Handler    // the Handler backend, or nil
	async   bool       // rw serves each request in a goroutine of its own (Config.Async)
	inline  bool       // rw serves each request on the queue thread, completing it before it returns
	onError func(error)
	info    Info
	path    string

	targetName, targetArgs string

	mu    sync.RWMutex // held (read) around calls that use dev; Close frees it under the write lock
	dev   *C.ublk_dev  // nil once freed
	freed atomic.Bool  // dev was freed (set with dev = nil): for Request.Data without the lock
	last  Stats        // the counters just before the device was freed

	done       chan struct{} // closed when the device stopped serving
	closed     chan struct{} // closed when Close has finished
	closeOnce  sync.Once
	closeLater sync.Once // Close from a queue thread: the goroutine that finishes it
	closeErr   error
	wg         sync.WaitGroup // Async backend goroutines (until their request is completed)
}

// New creates a device and starts serving it; it returns once Path exists.
// backend is either a Handler (which takes precedence), or an io.ReaderAt — with io.WriterAt unless
// the device is read-only, and optionally Flush() error (or Sync() error),
// Discard(off, n int64) error and WriteZeroes(off, n int64) error — whose
// methods are called with the request's data buffer in copy mode (see
// Config.Async for where they run). Close the device when done.
func New(cfg Config, backend any) (*Device, error) {
	var c C.struct_ublk_dev_config
	if err := cfg.cConfig(&c); err != nil {
		return nil, err
	}
	d := newDevice(cfg.Async, cfg.OnError)
	rw, err := d.bind(backend)
	if err != nil {
		return nil, err
	}
	if rw == nil { // a Handler
		c.volatile_cache = 1
	} else {
		if rw.w == nil {
			c.read_only = 1
		}
		c.volatile_cache = cbool(rw.flush != nil)
		c.discard = cbool(rw.discard != nil || rw.zero != nil || cfg.Discard)
		if cfg.DataMode != DataAuto && cfg.DataMode != DataCopy {
			return nil, invalid("DataMode %v: an io.ReaderAt backend reads and writes the data itself, which needs copy mode (DataAuto or DataCopy; for zero copy, implement Handler and use leases)", cfg.DataMode)
		}
		c.needs_buffer = 1
	}
	name := cfg.Name
	if name == "" {
		name = "go"
	}
	c.target_name = C.CString(name)
	defer C.free(unsafe.Pointer(c.target_name))
	c.state_dir = optCString(cfg.StateDir)
	defer C.free(unsafe.Pointer(c.state_dir))
	c.target_args = optCString(cfg.TargetArgs)
	defer C.free(unsafe.Pointer(c.target_args))
	err = d.open("new", rw != nil, nil, func(h C.uintptr_t, out **C.ublk_dev) C.int {
		return C.ublkgo_dev_new(&c, h, out)
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// NewContext is New, and cancelling ctx stops the device and removes it (as
// Close; an error of that Close goes to Config.OnError).
func NewContext(ctx context.Context, cfg Config, backend any) (*Device, error) {
	d, err := New(cfg, backend)
	if err != nil {
		return nil, err
	}
	d.closeWhenDone(ctx)
	return d, nil
}

// RecoverOptions are Recover's settings; the device's own configuration
// (size, queues, data mode, target name and arguments…) is the one recorded
// in its state file when it was created.
type RecoverOptions struct {
	// StateDir: the directory of the device's state file, as in
	// Config.StateDir ("": $UBLK_STATE_DIR, else /run/ublk).
	StateDir string
	// Async and OnError: as in Config.
	Async   bool
	OnError func(error)
	// Prepare, if set, runs once the device is taken over and before it
	// serves again: Info, TargetName and TargetArgs are valid, so it can
	// set up the backend from them (e.g. open the file TargetArgs names).
	// An error (returned by Recover as it is) gives the takeover up: the
	// device stays as it was, for another try. It must not call Stop or
	// Close.
	Prepare func(d *Device) error
}

// Recover takes over device id after its server process died (even with
// kill -9): the device must have been created with a Config.Recovery policy
// (by New, libublk's C API or `ublk add --recovery`). Its configuration comes
// from its state file. backend is as for New, but the device keeps what it
// was created with: an io.ReaderAt backend needs a device in copy mode (made
// from an io.ReaderAt backend or with DataCopy), and without WriteAt its
// writes fail with EROFS. Recover waits, up to the recorded Config.Timeout,
// for the old server to be gone, and returns once the device serves again
// (RecoveryReissue: the requests the dead server held go to backend); it is
// then a Device like any other (Close removes it). Errors: ENOENT (no state
// file), ENODEV (no such device, or it was stopped), EINVAL (created without
// recovery, or a mode backend cannot serve), EBUSY (a live server still
// serves it); the device is then left as it was, for another try.
func Recover(id uint32, backend any, opts RecoverOptions) (*Device, error) {
	d := newDevice(opts.Async, opts.OnError)
	rw, err := d.bind(backend)
	if err != nil {
		return nil, err
	}
	if strings.IndexByte(opts.StateDir, 0) >= 0 {
		return nil, invalid("StateDir %q: contains a NUL byte", opts.StateDir)
	}
	dir := optCString(opts.StateDir)
	defer C.free(unsafe.Pointer(dir))
	err = d.open("recover", rw != nil, opts.Prepare, func(h C.uintptr_t, out **C.ublk_dev) C.int {
		return C.ublkgo_dev_recover(C.uint32_t(id), dir, h, out)
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// RecoverContext is Recover, and cancelling ctx stops the device and removes
// it (as Close; an error of that Close goes to RecoverOptions.OnError).
func RecoverContext(ctx context.Context, id uint32, backend any, opts RecoverOptions) (*Device, error) {
	d, err := Recover(id, backend, opts)
	if err != nil {
		return nil, err
	}
	d.closeWhenDone(ctx)
	return d, nil
}

func newDevice(async bool, onError func(error)) *Device {
	return &Device{async: async, onError: onError, done: make(chan struct{}), closed: make(chan struct{})}
}

// bind makes backend serve d's requests: the *rwBackend of an io.ReaderAt
// backend (whose capabilities shape a new device's config), nil for a Handler.
// Config.Async applies to an io.ReaderAt backend only: a Handler's HandleIO
// always runs on the queue thread (where leases, Fsync and RegisterFd work).
func (d *Device) bind(backend any) (*rwBackend, error) {
	async := d.async
	d.async = false
	switch b := backend.(type) {
	case nil:
		return nil, invalid("backend is nil")
	case Handler:
		d.handler = b
		return nil, nil
	case io.ReaderAt:
		rw := &rwBackend{r: b}
		rw.w, _ = backend.(io.WriterAt)
		if f, ok := backend.(Flusher); ok {
			rw.flush = f.Flush
		} else if f, ok := backend.(syncer); ok {
			rw.flush = f.Sync
		}
		if f, ok := backend.(Discarder); ok {
			rw.discard = f.Discard
		}
		if f, ok := backend.(WriteZeroer); ok {
			rw.zero = f.WriteZeroes
		}
		d.rw = rw
		d.async, d.inline = async, !async
		return rw, nil
	}
	return nil, invalid("backend %T implements neither ublk.Handler nor io.ReaderAt", backend)
}

// open makes the C device with create (ublk_dev_new or ublk_dev_recover
// through the bridge, given d's handle), reads its facts, runs prepare and
// starts it. On any failure (or a panic in prepare) the C device is freed
// again and the handle deleted.
func (d *Device) open(op string, needsCopy bool, prepare func(*Device) error, create func(h C.uintptr_t, out **C.ublk_dev) C.int) error {
	d.handle = cgo.NewHandle(d)
	var dev *C.ublk_dev
	if err := call(op, func() C.int { return create(C.uintptr_t(d.handle), &dev) }); err != nil {
		d.handle.Delete()
		return err
	}
	started := false
	defer func() {
		if !started {
			d.dev = nil
			C.ublk_dev_free(dev)
			d.handle.Delete()
		}
	}()
	info, err := devInfo(dev)
	if err != nil {
		return err
	}
	d.info = info
	d.path = C.GoString(C.ublk_dev_path(dev))
	d.targetName = C.GoString(C.ublk_dev_target_name(dev))
	if a := C.ublk_dev_target_args(dev); a != nil {
		d.targetArgs = C.GoString(a)
	}
	d.dev = dev
	if needsCopy && d.info.DataMode != DataCopy {
		return &Error{Op: op, Errno: syscall.EINVAL, Detail: fmt.Sprintf("device %d runs in %v mode: an io.ReaderAt backend needs copy mode (a Handler with leases serves every mode)", d.info.ID, d.info.DataMode)}
	}
	if prepare != nil {
		if err := prepare(d); err != nil {
			return err
		}
	}
	if err := call("start", func() C.int { return C.ublk_dev_start(dev) }); err != nil {
		return err
	}
	started = true
	go func() {
		C.ublk_dev_wait(dev, -1) // until the queue threads have exited
		close(d.done)
	}()
	return nil
}

// devInfo reads the device facts of dev.
func devInfo(dev *C.ublk_dev) (Info, error) {
	var info C.struct_ublk_dev_info
	if err := call("info", func() C.int { return C.ublk_dev_get_info(dev, &info) }); err != nil {
		return Info{}, err
	}
	return Info{ID: int(info.dev_id), Size: int64(info.size), Queues: int(info.nr_queues), Depth: int(info.queue_depth),
		MaxIOBytes: int(info.max_io_bytes), DataMode: DataMode(info.data_mode), Flags: uint64(info.flags),
		Recovery: Recovery(info.recovery)}, nil
}

// closeWhenDone closes d (reporting Close's error) once ctx is done.
func (d *Device) closeWhenDone(ctx context.Context) {
	if ctx.Done() == nil {
		return
	}
	go func() {
		select {
		case <-ctx.Done():
			if err := d.Close(); err != nil {
				d.report(err)
			}
		case <-d.closed:
		}
	}()
}

// optCString is a C copy of s (free it), NULL for "".
func optCString(s string) *C.char {
	if s == "" {
		return nil
	}
	return C.CString(s)
}

// Path is the block device, "/dev/ublkbN".
func (d *Device) Path() string { return d.path }

// ID is the device id N of /dev/ublkbN.
func (d *Device) ID() int { return d.info.ID }

// Info describes the device (size, queues, depth, data mode…).
func (d *Device) Info() Info { return d.info }

// Recovery is the device's recovery policy (Config.Recovery; after Recover,
// the one it was created with).
func (d *Device) Recovery() Recovery { return d.info.Recovery }

// TargetName is the target name recorded for the device (Config.Name, "go"
// by default; after Recover, the name it was created with).
func (d *Device) TargetName() string { return d.targetName }

// TargetArgs are the target arguments recorded for the device
// (Config.TargetArgs; after Recover, as its state file holds them); "" when
// none.
func (d *Device) TargetArgs() string { return d.targetArgs }

// Done is closed when the device has stopped serving: Stop, Close, context
// cancellation, or `ublk del` from outside.
func (d *Device) Done() <-chan struct{} { return d.done }

// Serve blocks until ctx is done or the device stops serving (e.g. `ublk
// del`), then closes the device and returns Close's error.
func (d *Device) Serve(ctx context.Context) error {
	select {
	case <-ctx.Done():
	case <-d.done:
	case <-d.closed:
	}
	return d.Close()
}

// MapFlags say which requests a mapped extent serves (Device.Map).
type MapFlags uint32

const (
	// MapRead: READ requests in the extent are filled from the file.
	MapRead MapFlags = C.UBLK_MAP_READ
	// MapWrite: WRITE requests in the extent go to the file (FUA: RWF_DSYNC).
	MapWrite MapFlags = C.UBLK_MAP_WRITE
)

// Map routes READ (MapRead) and/or WRITE (MapWrite) requests that fall
// entirely inside device bytes [offset, offset+length) to IO on fd at
// fileOffset + (request offset - offset): the engine lends each such request
// to that IO and completes it, without calling the backend at all. Other
// requests reach the backend as usual. A new extent replaces what it
// overlaps; requests started after the call see the change. Keep fd open
// while it is mapped. Any goroutine, before or while serving. Errors:
// EINVAL (range outside the device or not block-aligned, no flags), EBADF,
// ENOSPC (65536 extents).
func (d *Device) Map(offset, length uint64, fd int, fileOffset uint64, flags MapFlags) error {
	if fd < 0 || fd > math.MaxInt32 {
		return &Error{Op: "map", Errno: syscall.EBADF, Detail: fmt.Sprintf("bad fd %d", fd)}
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.dev == nil {
		return ErrClosed
	}
	return call("map", func() C.int {
		return C.ublk_dev_map(d.dev, C.uint64_t(offset), C.uint64_t(length), C.int(fd), C.uint64_t(fileOffset), C.uint32_t(flags))
	})
}

// Unmap removes device bytes [offset, offset+length) from the routes of Map:
// requests there reach the backend again.
func (d *Device) Unmap(offset, length uint64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.dev == nil {
		return ErrClosed
	}
	return call("unmap", func() C.int { return C.ublk_dev_unmap(d.dev, C.uint64_t(offset), C.uint64_t(length)) })
}

// Stop stops serving (any goroutine): requests in flight fail, the queue
// threads exit, Done is closed. The device stays until Close.
func (d *Device) Stop() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.dev == nil {
		return ErrClosed
	}
	err := call("stop", func() C.int { return C.ublk_dev_stop(d.dev) })
	if e, ok := err.(*Error); ok && e.Errno == syscall.EALREADY {
		return nil
	}
	return err
}

// Close stops the device, waits for the queue threads (and Async backend
// goroutines) to finish, deletes the device and frees it. Idempotent and safe
// from any goroutine. On a queue thread — inside HandleIO, a lease callback,
// or Config.OnError called from one of those or from an inline backend — it
// cannot wait for the queue threads, which wait for it to return: there it
// starts the stop and returns nil at once, and a goroutine of its own
// finishes the Close (its error goes to Config.OnError; Done is closed when
// the device stopped, and a Close from another goroutine waits for the end).
// Not from a ReaderAt/WriterAt method running with Config.Async (Close waits
// for those goroutines). Requests completed after Close get ErrClosed, and
// Request.Data gives nil: a Handler's goroutines must stop using request
// buffers before Close returns (Close does not wait for them).
// The kernel deletes the device once nobody has the block device open: Close
// waits for that up to Config.Timeout; after that the deletion is given up
// and the stopped device may remain until `ublk del` (libublk's
// ublk_dev_free reports no error, so neither can Close). A process that
// dies without Close leaves a device with a Config.Recovery policy waiting
// for Recover; without one the kernel stops it.
func (d *Device) Close() error {
	if C.ublkgo_on_queue_thread() != 0 {
		select {
		case <-d.closed:
			return d.closeErr
		default:
		}
		_ = d.Stop() // from a queue thread the engine stops the device on a thread of its own
		d.closeLater.Do(func() {
			go func() {
				if err := d.Close(); err != nil {
					d.report(err)
				}
			}()
		})
		return nil
	}
	d.closeOnce.Do(func() {
		d.closeErr = d.Stop()
		<-d.done
		d.wg.Wait()
		d.mu.Lock()
		d.last, _ = d.stats()
		dev := d.dev
		d.dev = nil
		d.freed.Store(true)
		d.mu.Unlock()
		C.ublk_dev_free(dev)
		d.handle.Delete()
		close(d.closed)
	})
	<-d.closed
	return d.closeErr
}

// Stats are the device's counters per queue; after Close, the last ones.
func (d *Device) Stats() (Stats, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.dev == nil {
		return d.last, nil
	}
	return d.stats()
}

func (d *Device) stats() (Stats, error) {
	var st Stats
	for q := 0; q < d.info.Queues; q++ {
		var c C.struct_ublk_queue_stats
		r := C.ublk_dev_queue_stats(d.dev, C.uint16_t(q), &c)
		if r == -C.int(syscall.EAGAIN) { // the queue saw no request yet
			st.Queues = append(st.Queues, QueueStats{})
			continue
		}
		if r < 0 {
			return st, errno("stats", r)
		}
		s := QueueStats{IOs: uint64(c.ios), Bytes: uint64(c.bytes), Errors: uint64(c.errors), InFlight: uint64(c.in_flight),
			CopiedBytes: uint64(c.copied_bytes), LeaseOps: uint64(c.lease_ops)}
		st.Queues = append(st.Queues, s)
		st.Total.IOs += s.IOs
		st.Total.Bytes += s.Bytes
		st.Total.Errors += s.Errors
		st.Total.InFlight += s.InFlight
		st.Total.CopiedBytes += s.CopiedBytes
		st.Total.LeaseOps += s.LeaseOps
	}
	return st, nil
}

func (d *Device) report(err error) {
	if d.onError == nil {
		log.Printf("ublk: device %d: %v", d.info.ID, err)
		return
	}
	defer func() {
		if p := recover(); p != nil {
			log.Printf("ublk: device %d: Config.OnError panicked: %v (reporting %v)", d.info.ID, p, err)
		}
	}()
	d.onError(err)
}

// recovered fails r with EIO after a panic and returns the error to report.
// inLease: the panic was in HandleIO or a lease callback of r, on the queue
// thread; there a request left to its leases is not completed yet (the
// engine completes it after the callback), and the EIO overrules them.
func recovered(r *Request, p any, inLease bool) error {
	buf := make([]byte, 16<<10)
	buf = buf[:runtime.Stack(buf, false)]
	if inLease {
		r.done.CompareAndSwap(doneByLeases, notDone)
	}
	_ = r.Complete(-int(syscall.EIO)) // (EALREADY if it was completed)
	return &PanicError{Op: r.op, Offset: r.off, Len: r.n, Value: p, Stack: buf}
}

// run serves r with the backend; it returns what to report (the backend's
// error or a recovered panic), with r completed already. The caller reports
// it: an Async goroutine only once it no longer counts in d.wg, so that
// Config.OnError may call Close.
func (d *Device) run(r *Request) (rep error) {
	defer func() {
		if p := recover(); p != nil {
			rep = recovered(r, p, d.handler != nil)
		}
	}()
	if d.rw != nil {
		return d.rw.serve(r)
	}
	d.handler.HandleIO(r)
	return nil
}

//export goUblkHandleBatch
func goUblkHandleBatch(h C.uintptr_t, e *C.ublk_io_batch_entry, n C.uint32_t) {
	d := cgo.Handle(h).Value().(*Device)
	entries := unsafe.Slice(e, int(n)) // C memory, valid during this call
	for i := range entries {
		en := &entries[i]
		r := &Request{dev: d, io: en.io, op: Op(en.desc.op), flags: uint32(en.desc.flags),
			off: int64(en.desc.offset), n: int(en.desc.len), queue: int(en.desc.queue_id),
			tag: int(en.desc.tag), buf: en.buf}
		switch {
		case d.inline:
			// the binding's own backend serves it here and now: its result
			// goes into the entry, and the engine completes the request when
			// this callback returns (no call into C per request)
			r.result = &en.result
			err := d.run(r)
			r.result = nil
			if err != nil {
				d.report(err)
			}
		case d.async:
			d.wg.Add(1)
			go func() {
				err := d.run(r)
				d.wg.Done()
				if err != nil {
					d.report(err)
				}
			}()
		default:
			// a Handler (never Async) runs here, on the queue thread; it may
			// keep the request (a goroutine, a lease) and complete it with
			// ublk_io_complete whenever it likes
			if err := d.run(r); err != nil {
				d.report(err)
			}
		}
	}
}

// KernelFeatures returns the running kernel's UBLK_F_* bits and their names.
func KernelFeatures() (uint64, []string, error) {
	var v C.uint64_t
	if err := call("features", func() C.int { return C.ublk_features(&v) }); err != nil {
		return 0, nil, err
	}
	var names []string
	for bit := 0; bit < 64; bit++ {
		if uint64(v)>>bit&1 == 0 {
			continue
		}
		if n := C.ublk_feature_name(C.uint32_t(bit)); n != nil {
			names = append(names, C.GoString(n))
		}
	}
	return uint64(v), names, nil
}
