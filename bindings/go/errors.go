package ublk

/*
#include <ublk.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"
	"unsafe"
)

// ErrClosed is returned by calls on a device after Close, and by
// Request.Complete for a request of a closed device.
var ErrClosed = errors.New("ublk: device closed")

// Error is a failed libublk call (or a configuration refused before one).
// It unwraps to its syscall.Errno: errors.Is(err, syscall.EINVAL) works.
type Error struct {
	Op     string        // what failed: "new", "start", "lease.read_into", "complete"…
	Errno  syscall.Errno // the error number (positive)
	Detail string        // the engine's message for this failure, if any
}

func (e *Error) Error() string {
	s := "ublk: " + e.Op + ": " + strerror(e.Errno)
	if e.Detail != "" {
		s += " (" + e.Detail + ")"
	}
	return s
}

func (e *Error) Unwrap() error { return e.Errno }

// strerror names an errno the way libublk does: "EINVAL: Invalid argument".
func strerror(e syscall.Errno) string {
	return C.GoString(C.ublk_strerror(C.int(-int(e))))
}

func lastMessage() string {
	var buf [512]byte
	if C.ublk_last_error_message((*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf))) <= 0 {
		return ""
	}
	return C.GoString((*C.char)(unsafe.Pointer(&buf[0])))
}

// call runs a libublk call returning 0 / -errno on one OS thread, so the
// thread-local message read after a failure is the one of this call.
func call(op string, f func() C.int) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if r := f(); r < 0 {
		return &Error{Op: op, Errno: syscall.Errno(-r), Detail: lastMessage()}
	}
	return nil
}

func errno(op string, r C.int) error {
	if r < 0 {
		return &Error{Op: op, Errno: syscall.Errno(-r)}
	}
	return nil
}

func invalid(format string, a ...any) error {
	return &Error{Op: "config", Errno: syscall.EINVAL, Detail: fmt.Sprintf(format, a...)}
}

// Errno is the negative errno result that fails a request with err: the
// syscall.Errno inside err (errors.As), else EIO. nil gives 0.
func Errno(err error) int {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return -int(e)
	}
	return -int(syscall.EIO)
}

// PanicError is a panic in a backend, a Handler or a lease callback, recovered
// by the bindings: the request it was serving failed with EIO, the device goes
// on serving. It is passed to Config.OnError (by default logged).
type PanicError struct {
	Op     Op
	Offset int64
	Len    int
	Value  any    // what was passed to panic
	Stack  []byte // the panicking goroutine's stack
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("ublk: panic serving %v %d@%d (request failed with EIO): %v", e.Op, e.Len, e.Offset, e.Value)
}

// IOError is an error a ReaderAt/WriterAt backend returned: the request failed
// with Errno(Err). It is passed to Config.OnError (by default logged).
type IOError struct {
	Op     Op
	Offset int64
	Len    int
	Err    error
}

func (e *IOError) Error() string {
	return fmt.Sprintf("ublk: backend failed %v %d@%d: %v", e.Op, e.Len, e.Offset, e.Err)
}

func (e *IOError) Unwrap() error { return e.Err }
