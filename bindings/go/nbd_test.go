package ublk

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// qemuNBD serves a fresh raw file of size bytes with qemu-nbd on a free
// loopback port; it returns the port and the file.
func qemuNBD(t *testing.T, size int64) (int, string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Fatalf("qemu-nbd is missing (package qemu-utils: tests/vm/setup): %v", err)
	}
	img, err := os.CreateTemp("", "ublk-nbd-*.img")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(img.Name()) })
	if err := img.Truncate(size); err != nil {
		t.Fatal(err)
	}
	img.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-t", "-e", "8", "-b", "127.0.0.1", "-p", fmt.Sprint(port), img.Name())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			break
		}
		if i == 150 {
			t.Fatalf("qemu-nbd did not listen on %d: %v", port, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return port, img.Name()
}

// NewNBD against qemu-nbd: the size comes from the export, data written
// through the device is in the served file and reads back, Map is refused,
// bad configurations are refused with EINVAL and an unreachable server with
// ECONNREFUSED.
func TestNBD(t *testing.T) {
	requireDevice(t)
	const size = 16 << 20
	port, img := qemuNBD(t, size)
	for _, c := range []struct {
		cfg  Config
		nbd  NBDConfig
		want syscall.Errno
	}{
		{Config{}, NBDConfig{}, syscall.EINVAL},
		{Config{Size: 4096}, NBDConfig{Host: "127.0.0.1", Port: port}, syscall.EINVAL},
		{Config{}, NBDConfig{Host: "127.0.0.1", Port: 70000}, syscall.EINVAL},
		{Config{}, NBDConfig{Host: "127.0.0.1", Port: port, Connections: 17}, syscall.EINVAL},
		{Config{}, NBDConfig{Host: "127.0.0.1", Port: 1}, syscall.ECONNREFUSED},
	} {
		var e *Error
		if d, err := NewNBD(c.cfg, c.nbd); !errors.As(err, &e) || e.Errno != c.want {
			if d != nil {
				d.Close()
			}
			t.Errorf("NewNBD(%+v, %+v) = %v, want %v", c.cfg, c.nbd, err, c.want)
		}
	}
	d, err := NewNBD(Config{Queues: 2, Depth: 32, Timeout: 20 * time.Second}, NBDConfig{Host: "127.0.0.1", Port: port, Connections: 2})
	if err != nil {
		t.Fatalf("NewNBD: %v", err)
	}
	defer d.Close()
	if d.Info().Size != size || d.TargetName() != "nbd" {
		t.Fatalf("size %d target %q, want %d and nbd", d.Info().Size, d.TargetName(), size)
	}
	var e *Error
	if err := d.Map(0, 4096, 0, 0, MapRead); !errors.As(err, &e) || e.Errno != syscall.EOPNOTSUPP {
		t.Errorf("Map on an NBD device = %v, want EOPNOTSUPP", err)
	}
	f := openDev(t, d)
	written := writeRead(t, f, []int64{0, 262144, size - 131072}, 131072, 11)
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	file, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	got := make([]byte, 131072)
	for _, off := range []int64{0, 262144, size - 131072} {
		if _, err := file.ReadAt(got, off); err != nil || !bytes.Equal(got, written[off]) {
			t.Fatalf("the export's file at %d is not what was written through the device (%v)", off, err)
		}
	}
	st, err := d.Stats()
	if err != nil || st.Total.IOs == 0 {
		t.Fatalf("stats %+v, %v: want IOs", st, err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}
