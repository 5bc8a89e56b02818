package ublk

// Crash recovery on real ublk devices (root and /dev/ublk-control, as in
// device_test.go): the server that dies is a child process, this test binary
// run again (TestMain), killed with SIGKILL.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	recoverChildEnv = "UBLK_GO_RECOVER_CHILD" // backing file of the child's device
	recoverDirEnv   = "UBLK_GO_RECOVER_DIR"   // its state directory
	recoverSize     = 16 << 20
)

func TestMain(m *testing.M) {
	if file := os.Getenv(recoverChildEnv); file != "" {
		os.Exit(recoverChild(file, os.Getenv(recoverDirEnv)))
	}
	os.Exit(m.Run())
}

// recoverChild serves file as a device with RecoveryReissue, prints its id
// and waits to be killed.
func recoverChild(file, dir string) int {
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	d, err := New(Config{Size: recoverSize, Queues: 2, Recovery: RecoveryReissue, Name: "go-test-child",
		TargetArgs: "file=" + file, StateDir: dir, Timeout: 20 * time.Second}, f)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(d.ID())
	<-d.Done() // the parent kills this process first
	return 1
}

// A device with RecoveryReissue outlives its server's SIGKILL: a write issued
// while no server runs waits, Recover (with Prepare reading the recorded
// target arguments) takes the device over with an *os.File backend, the
// waiting write completes, the data written before and during the outage
// reads back, and Close removes the device and its state file.
func TestRecoverAfterKill(t *testing.T) {
	requireDevice(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "backing.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, recoverSize); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), recoverChildEnv+"="+file, recoverDirEnv+"="+dir)
	child.Stderr = &stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := false
	t.Cleanup(func() {
		if !reaped {
			child.Process.Kill()
			child.Wait()
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
	}()
	var id int
	select {
	case s := <-line:
		if id, err = strconv.Atoi(strings.TrimSpace(s)); err != nil {
			child.Process.Kill()
			child.Wait()
			reaped = true
			t.Fatalf("child printed %q, not a device id; stderr: %s", s, stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the child made no device within 60 s")
	}
	path := fmt.Sprintf("/dev/ublkb%d", id)
	backing, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer backing.Close()
	recovered := false
	t.Cleanup(func() { // a failed test leaves no device behind
		if recovered {
			return
		}
		if d, err := Recover(uint32(id), backing, RecoverOptions{StateDir: dir}); err == nil {
			d.Close()
		}
	})

	dev, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	const n = 1 << 20
	a, b := alignedBuf(t, n), alignedBuf(t, n)
	fill(a, 1)
	fill(b, 2)
	if _, err := dev.WriteAt(a, 0); err != nil {
		t.Fatalf("write before the kill: %v", err)
	}

	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	reaped = true
	written := make(chan error, 1)
	go func() {
		_, err := dev.WriteAt(b, 4<<20)
		written <- err
	}()
	select {
	case err := <-written:
		t.Fatalf("a write finished while no server ran: %v", err)
	case <-time.After(time.Second):
	}

	var seen Info
	var seenArgs string
	d, err := Recover(uint32(id), backing, RecoverOptions{StateDir: dir, Prepare: func(d *Device) error {
		seen, seenArgs = d.Info(), d.TargetArgs()
		return nil
	}})
	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	recovered = true
	closed := false
	t.Cleanup(func() {
		if !closed {
			d.Close()
		}
	})
	if d.ID() != id || d.Path() != path || d.Recovery() != RecoveryReissue || d.TargetName() != "go-test-child" ||
		d.TargetArgs() != "file="+file || seenArgs != d.TargetArgs() || seen != d.Info() ||
		d.Info().Size != recoverSize || d.Info().DataMode != DataCopy {
		t.Errorf("recovered device: id %d path %s recovery %v target %q args %q (in Prepare %q) info %+v (in Prepare %+v)",
			d.ID(), d.Path(), d.Recovery(), d.TargetName(), d.TargetArgs(), seenArgs, d.Info(), seen)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Fatalf("the write issued while no server ran: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the write issued while no server ran is not done 30 s after Recover")
	}
	r := alignedBuf(t, n)
	for _, c := range []struct {
		off  int64
		want []byte
	}{{0, a}, {4 << 20, b}} {
		if _, err := dev.ReadAt(r, c.off); err != nil || !bytes.Equal(r, c.want) {
			t.Errorf("read at %d after Recover: %v, equal %v", c.off, err, bytes.Equal(r, c.want))
		}
		if _, err := backing.ReadAt(r, c.off); err != nil || !bytes.Equal(r, c.want) {
			t.Errorf("backing file at %d: %v, equal %v", c.off, err, bytes.Equal(r, c.want))
		}
	}
	dev.Close()
	if err := d.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	closed = true
	if !devGone(path) || !charGone(id) {
		t.Errorf("%s still there after Close", path)
	}
	if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("%d.state", id))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file after Close: %v", err)
	}
}

// Recover refuses a device that is still served (EBUSY, after the recorded
// Timeout) and one made without a recovery policy (EINVAL); both keep
// serving. The policy and the target name and arguments are reported.
func TestRecoverRefused(t *testing.T) {
	requireDevice(t)
	dir := t.TempDir()
	m := &mem{b: make([]byte, 4<<20)}
	d := newDev(t, Config{Size: 4 << 20, Recovery: RecoveryWait, TargetArgs: "a=1\nb=\\2", StateDir: dir, Timeout: 2 * time.Second}, m)
	if d.Recovery() != RecoveryWait || d.Info().Recovery != RecoveryWait || d.TargetName() != "go" || d.TargetArgs() != "a=1\nb=\\2" {
		t.Errorf("device: recovery %v / %v, target %q, args %q", d.Recovery(), d.Info().Recovery, d.TargetName(), d.TargetArgs())
	}
	t0 := time.Now()
	if r, err := Recover(uint32(d.ID()), m, RecoverOptions{StateDir: dir}); !errors.Is(err, syscall.EBUSY) {
		if err == nil {
			r.Close()
		}
		t.Errorf("Recover of a served device: %v, want EBUSY", err)
	} else if time.Since(t0) > 15*time.Second {
		t.Errorf("Recover of a served device took %v (Timeout 2 s)", time.Since(t0))
	}
	writeRead(t, openDev(t, d), []int64{0, 1 << 20}, 4096, 7)

	m2 := &mem{b: make([]byte, 4<<20)}
	d2 := newDev(t, Config{Size: 4 << 20, StateDir: dir, Timeout: 2 * time.Second}, m2)
	if d2.Recovery() != RecoveryNone || d2.TargetArgs() != "" {
		t.Errorf("device without a policy: recovery %v, args %q", d2.Recovery(), d2.TargetArgs())
	}
	if r, err := Recover(uint32(d2.ID()), m2, RecoverOptions{StateDir: dir}); !errors.Is(err, syscall.EINVAL) {
		if err == nil {
			r.Close()
		}
		t.Errorf("Recover of a device without recovery: %v, want EINVAL", err)
	}
	writeRead(t, openDev(t, d2), []int64{0}, 4096, 8)
}
