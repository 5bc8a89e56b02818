// Command loop serves a file as a block device with the Go bindings.
//
//	loop -file F [-queues 1] [-depth 128] [-async] [-lease [-zero-copy MODE]]
//
// By default the backend is the *os.File itself (ReadAt/WriteAt through the
// request's buffer in copy mode, Sync for FLUSH) plus fallocate for DISCARD
// and WRITE_ZEROES. With -lease a Handler lends each request's buffer to IO
// on the file (Request.Lease: zero copy where the kernel allows) and runs
// FLUSH, DISCARD and WRITE_ZEROES on the engine's io_uring: no data passes
// through Go. It prints "<id> <path>" once the device exists and serves
// until SIGINT or SIGTERM (or `ublk del`), then removes the device.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"libublk/ublk"
)

const (
	fallocKeepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
	fallocPunchHole = 0x02 // FALLOC_FL_PUNCH_HOLE
	fallocZeroRange = 0x10 // FALLOC_FL_ZERO_RANGE
)

// file: *os.File is an io.ReaderAt, io.WriterAt and has Sync (FLUSH); add
// DISCARD and WRITE_ZEROES.
type file struct{ *os.File }

func (f file) Discard(off, n int64) error {
	return syscall.Fallocate(int(f.Fd()), fallocPunchHole|fallocKeepSize, off, n)
}

func (f file) WriteZeroes(off, n int64) error {
	err := syscall.Fallocate(int(f.Fd()), fallocZeroRange|fallocKeepSize, off, n)
	if errors.Is(err, syscall.EOPNOTSUPP) { // e.g. tmpfs: a hole reads as zeroes too
		err = f.Discard(off, n)
	}
	return err
}

// leaseLoop serves with leases and backing IO on the queue ring.
type leaseLoop struct {
	fd         int
	registered []atomic.Bool // per queue: the file is in the ring's file table
}

func (l *leaseLoop) HandleIO(r *ublk.Request) {
	if q := r.Queue(); q < len(l.registered) && !l.registered[q].Swap(true) {
		_ = r.RegisterFd(l.fd) // once per queue; without it the IO works the same
	}
	var err error
	switch r.Op() {
	case ublk.OpRead: // completes by itself when the read is over (zeroes past EOF)
		err = r.Lease().ReadInto(l.fd, r.Offset(), 0, r.Len())
	case ublk.OpWrite: // FUA becomes RWF_DSYNC
		err = r.Lease().WriteFrom(l.fd, r.Offset(), 0, r.Len())
	case ublk.OpFlush: // the result completes the request
		err = r.Fsync(l.fd, true, nil)
	case ublk.OpDiscard:
		err = r.Fallocate(l.fd, fallocPunchHole|fallocKeepSize, r.Offset(), int64(r.Len()), nil)
	case ublk.OpWriteZeroes:
		err = r.Fallocate(l.fd, fallocZeroRange|fallocKeepSize, r.Offset(), int64(r.Len()), l.zeroed)
	default:
		err = syscall.EOPNOTSUPP
	}
	if err != nil {
		r.Fail(err)
	}
}

// zeroed: a file system without FALLOC_FL_ZERO_RANGE (tmpfs) punches a hole.
func (l *leaseLoop) zeroed(r *ublk.Request, res int) {
	if res == -int(syscall.EOPNOTSUPP) {
		if err := r.Fallocate(l.fd, fallocPunchHole|fallocKeepSize, r.Offset(), int64(r.Len()), nil); err == nil {
			return
		}
	}
	r.Complete(res)
}

func main() {
	path := flag.String("file", "", "backing file (required)")
	queues := flag.Int("queues", 1, "queues")
	depth := flag.Int("depth", 128, "queue depth")
	async := flag.Bool("async", false, "copy mode: serve each request in its own goroutine")
	lease := flag.Bool("lease", false, "zero copy: lend request buffers to IO on the file (leases)")
	mode := flag.String("zero-copy", "auto", "data mode with -lease: auto, auto-buf-reg, register, user-copy or copy")
	flag.Parse()
	if *path == "" {
		fmt.Fprintln(os.Stderr, "loop: -file is required")
		os.Exit(2)
	}
	dm, err := ublk.ParseDataMode(*mode)
	if err != nil {
		fmt.Fprintf(os.Stderr, "loop: %v\n", err)
		os.Exit(2)
	}
	f, err := os.OpenFile(*path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil { // a file system without O_DIRECT
		f, err = os.OpenFile(*path, os.O_RDWR, 0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "loop: %v\n", err)
		os.Exit(2)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() < 4096 {
		fmt.Fprintf(os.Stderr, "loop: %s: too small or unreadable (%v)\n", *path, err)
		os.Exit(2)
	}
	cfg := ublk.Config{Size: st.Size() &^ 4095, Queues: *queues, Depth: *depth, Async: *async, Name: "go-loop"}
	var backend any = file{f}
	if *lease {
		cfg.Name, cfg.DataMode, cfg.Discard = "go-loop-lease", dm, true
		backend = &leaseLoop{fd: int(f.Fd()), registered: make([]atomic.Bool, *queues)}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	dev, err := ublk.NewContext(ctx, cfg, backend)
	if err != nil {
		fmt.Fprintf(os.Stderr, "loop: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(dev.ID(), dev.Path())
	err = dev.Serve(ctx)
	s, _ := dev.Stats()
	fmt.Fprintf(os.Stderr, "loop: device %d stopped: mode=%v ios=%d bytes=%d errors=%d copied_bytes=%d lease_ops=%d\n",
		dev.ID(), dev.Info().DataMode, s.Total.IOs, s.Total.Bytes, s.Total.Errors, s.Total.CopiedBytes, s.Total.LeaseOps)
	if err != nil {
		fmt.Fprintf(os.Stderr, "loop: %v\n", err)
		os.Exit(1)
	}
}
