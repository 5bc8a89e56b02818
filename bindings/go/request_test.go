package ublk

// Host-only tests of the binding's own logic (no kernel device): how a
// backend is bound, the argument checks of the Request calls, and requests
// of a closed device.

import (
	"errors"
	"math"
	"syscall"
	"testing"
	"unsafe"
)

// Config.Async applies to an io.ReaderAt backend only: a Handler always runs
// on the queue thread (leases, Fsync and RegisterFd work only there).
func TestAsyncBinding(t *testing.T) {
	for _, c := range []struct {
		name          string
		async         bool
		backend       any
		wAsync, wInl  bool
		wantHandler   bool
		wantRWBackend bool
	}{
		{"handler, Async", true, HandlerFunc(func(*Request) {}), false, false, true, false},
		{"handler", false, HandlerFunc(func(*Request) {}), false, false, true, false},
		{"ReaderAt, Async", true, readerOnly{}, true, false, false, true},
		{"ReaderAt", false, readerOnly{}, false, true, false, true},
	} {
		d := newDevice(c.async, nil)
		if _, err := d.bind(c.backend); err != nil {
			t.Fatalf("%s: bind: %v", c.name, err)
		}
		if d.async != c.wAsync || d.inline != c.wInl || (d.handler != nil) != c.wantHandler || (d.rw != nil) != c.wantRWBackend {
			t.Errorf("%s: async %v inline %v handler %v rw %v; want async %v inline %v", c.name, d.async, d.inline,
				d.handler != nil, d.rw != nil, c.wAsync, c.wInl)
		}
	}
}

func wantErrno(t *testing.T, what string, err error, want syscall.Errno) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Errno != want {
		t.Errorf("%s: %v, want an *Error with %v", what, err, want)
	}
}

// An fd that is not a C int >= 0 is refused with EBADF before anything
// else, never passed on truncated (1<<32 + 3 would be fd 3).
func TestBadFd(t *testing.T) {
	d := newDevice(false, nil)
	d.freed.Store(true) // a closed device: without the check the calls would give ErrClosed
	r := &Request{dev: d, op: OpRead, n: 4096}
	for _, fd := range []int{-1, math.MaxInt32 + 1, 1<<32 + 3} {
		wantErrno(t, "Fsync", r.Fsync(fd, true, nil), syscall.EBADF)
		wantErrno(t, "Fsync with a callback", r.Fsync(fd, false, func(*Request, int) {}), syscall.EBADF)
		wantErrno(t, "Fallocate", r.Fallocate(fd, 0, 0, 4096, nil), syscall.EBADF)
		wantErrno(t, "RegisterFd", r.RegisterFd(fd), syscall.EBADF)
		wantErrno(t, "ReadInto", r.Lease().ReadInto(fd, 0, 0, 4096), syscall.EBADF)
		wantErrno(t, "Send", r.Lease().Send(fd, 0, 4096), syscall.EBADF)
	}
	if r.done.Load() != notDone {
		t.Errorf("refused calls marked the request done (%d)", r.done.Load())
	}
}

// The requests of a closed device: Data is nil (the buffers were freed with
// the device), the calls give ErrClosed, and a refused lease leaves the
// request to Complete.
func TestRequestAfterClose(t *testing.T) {
	d := newDevice(false, nil)
	buf := make([]byte, 4096)
	r := &Request{dev: d, op: OpRead, n: len(buf), buf: unsafe.Pointer(&buf[0])}
	if got := r.Data(); len(got) != len(buf) || &got[0] != &buf[0] {
		t.Fatalf("Data of a served request: %d bytes", len(got))
	}
	d.freed.Store(true) // as Close does (with dev = nil)
	if r.Data() != nil {
		t.Errorf("Data after Close is not nil")
	}
	if err := r.RegisterFd(3); !errors.Is(err, ErrClosed) {
		t.Errorf("RegisterFd after Close: %v, want ErrClosed", err)
	}
	if err := r.Lease().ReadInto(3, 0, 0, 4096); !errors.Is(err, ErrClosed) {
		t.Errorf("lease after Close: %v, want ErrClosed", err)
	}
	if err := r.Lease().OnDone(func(*Request, int) {}).ReadInto(3, 0, 0, 4096); !errors.Is(err, ErrClosed) {
		t.Errorf("lease with a callback after Close: %v, want ErrClosed", err)
	}
	if err := r.Lease().Manual(); !errors.Is(err, ErrClosed) {
		t.Errorf("Manual after Close: %v, want ErrClosed", err)
	}
	if err := r.Fsync(3, true, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Fsync after Close: %v, want ErrClosed", err)
	}
	if r.done.Load() != notDone || r.leasesCB.Load() != 0 || r.manual.Load() {
		t.Errorf("refused calls changed the request: done %d, leases %d, manual %v", r.done.Load(), r.leasesCB.Load(), r.manual.Load())
	}
	if err := r.Complete(4096); !errors.Is(err, ErrClosed) {
		t.Errorf("Complete after Close: %v, want ErrClosed", err)
	}
	if err := r.Complete(4096); !errors.Is(err, syscall.EALREADY) {
		t.Errorf("second Complete: %v, want EALREADY", err)
	}
}

// A failing ublk_dev_get_info is an error, not zero facts.
func TestDevInfoError(t *testing.T) {
	info, err := devInfo(nil)
	wantErrno(t, "devInfo(NULL)", err, syscall.EINVAL)
	if info != (Info{}) {
		t.Errorf("devInfo(NULL) = %+v", info)
	}
}
