// Package ublk serves Linux ublk block devices (/dev/ublkbN) from Go, over
// libublk.so (include/ublk.h) through cgo.
//
//	dev, err := ublk.New(ublk.Config{Size: 1 << 30, Queues: 2}, backend)
//	if err != nil { ... }
//	fmt.Println(dev.Path())   // /dev/ublkb0, ready for IO
//	err = dev.Serve(ctx)      // until ctx is done or `ublk del`; then removes it
//
// # Backends
//
// A backend is either
//
//   - an io.ReaderAt and io.WriterAt (e.g. *os.File, or a []byte type), with
//     optional Flush() error (or Sync() error), Discard(off, n int64) error and
//     WriteZeroes(off, n int64) error. Its methods get the request's data
//     buffer (engine memory, copy mode). By default they run inline on the
//     engine's queue thread that received the request (one queue serves one
//     request at a time: right for memory, fine for page-cache files); with
//     Config.Async each request runs in its own goroutine, which completes it
//     (a slow backend then serves many requests of a queue at once). A read
//     that ends early (io.EOF) leaves zeroes; an error fails the request with
//     its syscall.Errno (else EIO) and goes to Config.OnError.
//   - a Handler: HandleIO(r *Request) runs on the queue thread and completes
//     r with r.Complete now or later from any goroutine, or lends r's buffer
//     to IO on files and sockets with r.Lease() (zero copy where the kernel
//     allows: the data never passes through Go), r.Fsync, r.Fallocate.
//
// A panic in a backend, a Handler or a lease callback is recovered: that
// request fails with EIO, a *PanicError goes to Config.OnError (default: the
// log package) and the device keeps serving.
//
// # Life cycle
//
// New creates the device and starts its queue threads; it returns once Path
// exists. Stop stops serving (Done is closed), Close stops, deletes and frees
// the device (idempotent; on a queue thread — HandleIO, a lease callback,
// Config.OnError called there — it only starts that and returns, a goroutine
// finishes it). NewContext also closes the
// device when its context is cancelled; Serve blocks until the context is
// done or the device is stopped from outside (`ublk del`), then closes it.
//
// A device created with a Config.Recovery policy outlives its process dying
// (even kill -9): Recover in a new process takes it over.
//
// # cgo
//
// C never holds a Go pointer: the device is passed to libublk as the value of
// a runtime/cgo.Handle (through a small C bridge, bridge.c), and so is each
// lease callback. Request data buffers and request handles are C memory.
//
// # Building
//
// By default the package links against the library of this repository:
// build it first (`make build`, or `cargo build --release`); binaries find
// it at run time through an rpath to target/release. To use an installed
// libublk (make install PREFIX=…), build with `-tags ublk_pkgconfig`
// (pkg-config ublk; set PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig), or set
// CGO_CFLAGS / CGO_LDFLAGS. Go 1.21 or newer, cgo, no other dependencies.
//
// The device tests need root and /dev/ublk-control; elsewhere they skip
// (tests/device/t_go.sh runs them in the VM, where a skip is a failure).
package ublk
