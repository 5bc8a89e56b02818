// Command loop serves a file as a block device with the Go bindings.
//
//	loop -file F [-queues 1] [-depth 128] [-async] [-lease [-zero-copy MODE] [-per-request]] [-recovery POLICY]
//	loop -recover ID [-async] [-lease]
//
// By default the backend is the *os.File itself (ReadAt/WriteAt through the
// request's buffer in copy mode, Sync for FLUSH) plus fallocate for DISCARD
// and WRITE_ZEROES. With -lease a Handler lends each request's buffer to IO
// on the file (Request.Lease: zero copy where the kernel allows) and runs
// FLUSH, DISCARD and WRITE_ZEROES on the engine's io_uring: no data passes
// through Go. With -lease the whole file is also mapped once (Device.Map), so
// the engine lends READ and WRITE requests itself, without calling Go;
// -per-request leaves them to the Handler. It prints "<id> <path>" once the device exists and serves
// until SIGINT or SIGTERM (or `ublk del`), then removes the device.
//
// With -recovery reissue, fail or wait the device survives this process
// dying (kill -9): `loop -recover ID` (with -lease if the device runs in a
// zero-copy mode) takes it over and serves the file recorded as
// "file=<absolute path>" in its target arguments.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
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
// DISCARD and WRITE_ZEROES. Used as *file, set before the device serves.
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

// openBacking opens the backing file, with O_DIRECT where its file system has it.
func openBacking(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil { // a file system without O_DIRECT
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	return f, err
}

func fatal(code int, format string, a ...any) {
	fmt.Fprintf(os.Stderr, "loop: "+format+"\n", a...)
	os.Exit(code)
}

func main() {
	path := flag.String("file", "", "backing file (required, except with -recover)")
	queues := flag.Int("queues", 1, "queues")
	depth := flag.Int("depth", 128, "queue depth")
	async := flag.Bool("async", false, "copy mode: serve each request in its own goroutine")
	lease := flag.Bool("lease", false, "zero copy: lend request buffers to IO on the file (leases)")
	mode := flag.String("zero-copy", "auto", "data mode with -lease: auto, auto-buf-reg, register, user-copy or copy")
	policy := flag.String("recovery", "none", "if this process dies: none (the device goes), reissue, fail or wait (it waits for loop -recover)")
	perRequest := flag.Bool("per-request", false, "with -lease: the Handler lends each READ/WRITE (one cgo call per request) instead of mapping the whole file once (Device.Map)")
	recoverID := flag.Int("recover", -1, "take over device `ID` after its server died (serves the file it recorded; no -file)")
	flag.Parse()
	if *path == "" && *recoverID < 0 {
		fatal(2, "-file (or -recover ID) is required")
	}
	if *path != "" && *recoverID >= 0 {
		fatal(2, "-recover serves the file the device recorded: no -file")
	}
	dm, err := ublk.ParseDataMode(*mode)
	if err != nil {
		fatal(2, "%v", err)
	}
	rec, err := ublk.ParseRecovery(*policy)
	if err != nil {
		fatal(2, "%v", err)
	}

	// the backend; its file is set (use) before the device serves
	fb, lp := &file{}, &leaseLoop{}
	var backend any = fb
	if *lease {
		backend = lp
	}
	var f *os.File
	use := func(path string, queues int) error {
		var err error
		if f, err = openBacking(path); err != nil {
			return err
		}
		fb.File, lp.fd, lp.registered = f, int(f.Fd()), make([]atomic.Bool, queues)
		return nil
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var dev *ublk.Device
	if *recoverID >= 0 {
		dev, err = ublk.RecoverContext(ctx, uint32(*recoverID), backend, ublk.RecoverOptions{Async: *async,
			Prepare: func(d *ublk.Device) error {
				p, ok := strings.CutPrefix(d.TargetArgs(), "file=")
				if !ok || p == "" {
					return fmt.Errorf("device %d records no backing file (target %q, args %q): not made by loop -recovery",
						d.ID(), d.TargetName(), d.TargetArgs())
				}
				return use(p, d.Info().Queues)
			}})
		if err != nil {
			fatal(1, "%v", err)
		}
	} else {
		abs, err := filepath.Abs(*path) // recorded for -recover
		if err == nil {
			err = use(abs, *queues)
		}
		if err != nil {
			fatal(2, "%v", err)
		}
		st, err := f.Stat()
		if err != nil || st.Size() < 4096 {
			fatal(2, "%s: too small or unreadable (%v)", *path, err)
		}
		cfg := ublk.Config{Size: st.Size() &^ 4095, Queues: *queues, Depth: *depth, Async: *async, Name: "go-loop",
			Recovery: rec, TargetArgs: "file=" + abs}
		if *lease {
			cfg.Name, cfg.DataMode, cfg.Discard = "go-loop-lease", dm, true
		}
		dev, err = ublk.NewContext(ctx, cfg, backend)
		if err != nil {
			fatal(1, "%v", err)
		}
	}
	defer f.Close()
	if *lease && !*perRequest {
		// the device is the file at the same offsets: READ and WRITE never
		// reach Go (the Handler gets FLUSH, DISCARD, WRITE_ZEROES)
		if err := dev.Map(0, uint64(dev.Info().Size), int(f.Fd()), 0, ublk.MapRead|ublk.MapWrite); err != nil {
			fatal(1, "%v", err)
		}
	}
	fmt.Println(dev.ID(), dev.Path())
	err = dev.Serve(ctx)
	s, _ := dev.Stats()
	fmt.Fprintf(os.Stderr, "loop: device %d stopped: mode=%v ios=%d bytes=%d errors=%d copied_bytes=%d lease_ops=%d\n",
		dev.ID(), dev.Info().DataMode, s.Total.IOs, s.Total.Bytes, s.Total.Errors, s.Total.CopiedBytes, s.Total.LeaseOps)
	if err != nil {
		fatal(1, "%v", err)
	}
}
