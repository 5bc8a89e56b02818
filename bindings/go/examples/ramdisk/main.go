// Command ramdisk serves a RAM disk: a []byte backend (io.ReaderAt,
// io.WriterAt, Discard, WriteZeroes) of the Go bindings.
//
//	ramdisk [-size 256M] [-queues 1] [-depth 128] [-async]
//
// It prints "<id> <path>" once the device exists and serves until SIGINT or
// SIGTERM (or `ublk del`), then removes the device and prints its counters.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"libublk/ublk"
)

// ramdisk is the whole device in one slice. Like a disk, it makes no promise
// about requests on overlapping ranges in flight at the same time, so the
// copies need no lock.
type ramdisk []byte

func (m ramdisk) ReadAt(p []byte, off int64) (int, error)  { return copy(p, m[off:]), nil }
func (m ramdisk) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (m ramdisk) Discard(off, n int64) error               { clear(m[off : off+n]); return nil }
func (m ramdisk) WriteZeroes(off, n int64) error           { clear(m[off : off+n]); return nil }

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	v, err := strconv.ParseInt(s, 0, 64)
	return v * mult, err
}

func main() {
	size := flag.String("size", "256M", "device size (K/M/G suffixes)")
	queues := flag.Int("queues", 1, "queues")
	depth := flag.Int("depth", 128, "queue depth")
	async := flag.Bool("async", false, "serve each request in its own goroutine (completion from goroutines)")
	flag.Parse()
	n, err := parseSize(*size)
	if err != nil || n <= 0 {
		fmt.Fprintf(os.Stderr, "ramdisk: bad -size %q\n", *size)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	dev, err := ublk.New(ublk.Config{Size: n, Queues: *queues, Depth: *depth, Async: *async, Name: "go-ramdisk"}, make(ramdisk, n))
	if err != nil {
		fmt.Fprintf(os.Stderr, "ramdisk: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(dev.ID(), dev.Path())
	err = dev.Serve(ctx) // until SIGINT/SIGTERM or `ublk del`; then removes the device
	st, _ := dev.Stats()
	fmt.Fprintf(os.Stderr, "ramdisk: device %d stopped: mode=%v ios=%d bytes=%d errors=%d copied_bytes=%d lease_ops=%d\n",
		dev.ID(), dev.Info().DataMode, st.Total.IOs, st.Total.Bytes, st.Total.Errors, st.Total.CopiedBytes, st.Total.LeaseOps)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ramdisk: %v\n", err)
		os.Exit(1)
	}
}
