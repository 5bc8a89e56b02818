package ublk

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
)

type nothing struct{}

// readerOnly is an io.ReaderAt without WriteAt.
type readerOnly struct{}

func (readerOnly) ReadAt(p []byte, off int64) (int, error) { return len(p), nil }

// Bad configurations and backends are refused with EINVAL and a message
// naming the problem, before the kernel is asked (these run on any host).
func TestBadConfig(t *testing.T) {
	mem := bytes.NewReader(make([]byte, 1<<20))
	cases := []struct {
		name    string
		cfg     Config
		backend any
		want    string // in the message
	}{
		{"zero size", Config{}, mem, "Size 0"},
		{"negative size", Config{Size: -4096}, mem, "Size -4096"},
		{"size not a multiple of the block size", Config{Size: 1000}, mem, "multiple"},
		{"size not a multiple of a 4K block", Config{Size: 1 << 20, LogicalBlockSize: 4096 + 512}, mem, "logical block size"},
		{"negative queues", Config{Size: 1 << 20, Queues: -1}, mem, "Queues -1"},
		{"too many queues", Config{Size: 1 << 20, Queues: 70000}, mem, "Queues 70000"},
		{"negative depth", Config{Size: 1 << 20, Depth: -5}, mem, "Depth -5"},
		{"depth too large", Config{Size: 1 << 20, Depth: 4097}, mem, "Depth 4097"},
		{"logical block size not a power of two", Config{Size: 1 << 20, LogicalBlockSize: 1000}, mem, "1000"},
		{"logical block size too small", Config{Size: 1 << 20, LogicalBlockSize: 256}, mem, "256"},
		{"physical < logical", Config{Size: 1 << 20, LogicalBlockSize: 4096, PhysicalBlockSize: 512}, mem, "physical block size"},
		{"max IO too small", Config{Size: 1 << 20, MaxIOBytes: 100}, mem, "max IO size"},
		{"max IO too large", Config{Size: 1 << 20, MaxIOBytes: 64 << 20}, mem, "max IO size"},
		{"negative max IO", Config{Size: 1 << 20, MaxIOBytes: -1}, mem, "MaxIOBytes -1"},
		{"unknown data mode", Config{Size: 1 << 20, DataMode: 9}, mem, "DataMode 9"},
		{"unknown recovery policy", Config{Size: 1 << 20, Recovery: 4}, mem, "Recovery 4"},
		{"NUL in TargetArgs", Config{Size: 1 << 20, TargetArgs: "file=a\x00b"}, mem, "TargetArgs"},
		{"negative timeout", Config{Size: 1 << 20, Timeout: -1}, mem, "Timeout"},
		{"negative id", Config{Size: 1 << 20, FixedID: true, ID: -3}, mem, "ID -3"},
		{"data-mode flag bits", Config{Size: 1 << 20, Flags: 1 << 7}, mem, "data mode"},
		{"zero copy for a ReaderAt backend", Config{Size: 1 << 20, DataMode: DataRegister}, mem, "copy mode"},
		{"nil backend", Config{Size: 1 << 20}, nil, "nil"},
		{"backend without ReadAt or HandleIO", Config{Size: 1 << 20}, nothing{}, "neither"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dev, err := New(c.cfg, c.backend)
			if err == nil {
				dev.Close()
				t.Fatalf("New(%+v) succeeded", c.cfg)
			}
			if !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("error %v: want EINVAL", err)
			}
			var e *Error
			if !errors.As(err, &e) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q: want an *Error mentioning %q", err, c.want)
			}
		})
	}
}

// Without ublk_drv a valid config fails cleanly (ENOENT), never half-made.
func TestNoDriver(t *testing.T) {
	if _, err := os.Stat("/dev/ublk-control"); err == nil {
		t.Skip("this host has ublk_drv")
	}
	_, err := New(Config{Size: 1 << 20}, readerOnly{})
	if err == nil || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("New without ublk_drv: %v, want ENOENT", err)
	}
}

func TestDataModes(t *testing.T) {
	for _, m := range []DataMode{DataAuto, DataAutoBufReg, DataRegister, DataUserCopy, DataCopy} {
		p, err := ParseDataMode(m.String())
		if err != nil || p != m {
			t.Errorf("ParseDataMode(%q) = %v, %v", m.String(), p, err)
		}
	}
	if _, err := ParseDataMode("zero"); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("ParseDataMode(zero): %v", err)
	}
	if DataUserCopy.String() != "user-copy" || DataMode(42).String() != "DataMode(42)" {
		t.Errorf("names: %v %v", DataUserCopy, DataMode(42))
	}
}

func TestRecoveryNames(t *testing.T) {
	for _, r := range []Recovery{RecoveryNone, RecoveryReissue, RecoveryFail, RecoveryWait} {
		p, err := ParseRecovery(r.String())
		if err != nil || p != r {
			t.Errorf("ParseRecovery(%q) = %v, %v", r.String(), p, err)
		}
	}
	if _, err := ParseRecovery("later"); !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "reissue") {
		t.Errorf("ParseRecovery(later): %v", err)
	}
	if RecoveryWait.String() != "wait" || Recovery(7).String() != "Recovery(7)" {
		t.Errorf("names: %v %v", RecoveryWait, Recovery(7))
	}
}

// Recover refuses before the kernel is asked: no backend, a bad state
// directory, and a device without a state file (ENOENT, on any host).
func TestRecoverErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name    string
		backend any
		opts    RecoverOptions
		want    syscall.Errno
		msg     string
	}{
		{"nil backend", nil, RecoverOptions{StateDir: dir}, syscall.EINVAL, "nil"},
		{"backend without ReadAt or HandleIO", nothing{}, RecoverOptions{StateDir: dir}, syscall.EINVAL, "neither"},
		{"NUL in StateDir", readerOnly{}, RecoverOptions{StateDir: "a\x00b"}, syscall.EINVAL, "StateDir"},
		{"no state file", readerOnly{}, RecoverOptions{StateDir: dir}, syscall.ENOENT, "state file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			prepared := false
			c.opts.Prepare = func(*Device) error { prepared = true; return nil }
			d, err := Recover(4242, c.backend, c.opts)
			if err == nil {
				d.Close()
				t.Fatal("Recover succeeded")
			}
			var e *Error
			if !errors.Is(err, c.want) || !errors.As(err, &e) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %q: want an *Error with %v mentioning %q", err, c.want, c.msg)
			}
			if prepared {
				t.Error("Prepare ran although Recover failed")
			}
		})
	}
}

func TestErrors(t *testing.T) {
	if Errno(nil) != 0 || Errno(syscall.ENOSPC) != -int(syscall.ENOSPC) || Errno(errors.New("x")) != -int(syscall.EIO) {
		t.Errorf("Errno: %d %d %d", Errno(nil), Errno(syscall.ENOSPC), Errno(errors.New("x")))
	}
	wrapped := &IOError{Op: OpWrite, Err: &os.PathError{Op: "write", Path: "f", Err: syscall.ENOSPC}}
	if Errno(wrapped) != -int(syscall.ENOSPC) {
		t.Errorf("Errno(wrapped ENOSPC) = %d", Errno(wrapped))
	}
	e := &Error{Op: "start", Errno: syscall.EPERM, Detail: "why"}
	if e.Error() != "ublk: start: EPERM: Operation not permitted (why)" || !errors.Is(e, syscall.EPERM) {
		t.Errorf("Error() = %q", e.Error())
	}
	if OpWriteZeroes.String() != "WRITE_ZEROES" || Op(9).String() != "Op(9)" {
		t.Errorf("op names: %v %v", OpWriteZeroes, Op(9))
	}
}
