package ublk

// Tests on real ublk devices: they need root and /dev/ublk-control (the VM of
// tests/vm/run; tests/device/t_go.sh runs them there with
// UBLK_GO_REQUIRE_DEVICE=1, which turns the skip into a failure).

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

func requireDevice(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/ublk-control"); err != nil || os.Geteuid() != 0 {
		if os.Getenv("UBLK_GO_REQUIRE_DEVICE") == "1" {
			t.Fatalf("needs root and /dev/ublk-control (UBLK_GO_REQUIRE_DEVICE=1): %v", err)
		}
		t.Skip("needs root and /dev/ublk-control: run in the VM (tests/vm/run)")
	}
}

// mem is a []byte backend with counters. The lock orders the test's own
// look at the bytes (get) after the kernel reported the IO done: the race
// detector cannot see that order, which goes through the kernel.
type mem struct {
	mu               sync.Mutex
	b                []byte
	flushes, discard atomic.Int64
	zeroes           atomic.Int64
}

// panickingHandler serves reads and writes from m (copy mode), panicking
// on a read at offset bad while armed says so.
func panickingHandler(m *mem, bad int64, armed func() bool) HandlerFunc {
	return HandlerFunc(func(r *Request) {
		if r.Op() == OpRead && r.Offset() == bad && armed() {
			panic("handler boom")
		}
		switch r.Op() {
		case OpRead:
			m.ReadAt(r.Data(), r.Offset())
		case OpWrite:
			m.WriteAt(r.Data(), r.Offset())
		}
		r.Fail(nil)
	})
}

func (m *mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}

func (m *mem) Flush() error { m.flushes.Add(1); return nil }

func (m *mem) Discard(off, n int64) error {
	m.discard.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}

func (m *mem) WriteZeroes(off, n int64) error {
	m.zeroes.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}

func (m *mem) get(off, n int64) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.b[off:off+n]...)
}

// alignedBuf is page-aligned memory for O_DIRECT.
func alignedBuf(t *testing.T, n int) []byte {
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Munmap(b) })
	return b
}

func openDev(t *testing.T, d *Device) *os.File {
	t.Helper()
	f, err := os.OpenFile(d.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func newDev(t *testing.T, cfg Config, backend any) *Device {
	t.Helper()
	requireDevice(t)
	if cfg.Timeout == 0 {
		cfg.Timeout = 20 * time.Second
	}
	d, err := New(cfg, backend)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

// errorLog collects what Config.OnError gets.
type errorLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errorLog) add(err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

func (l *errorLog) panics() []*PanicError {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*PanicError
	for _, e := range l.errs {
		var p *PanicError
		if errors.As(e, &p) {
			out = append(out, p)
		}
	}
	return out
}

func fill(b []byte, seed int64) {
	rand.New(rand.NewSource(seed)).Read(b)
}

// writeRead writes random blocks at offs through f, reads them back and
// compares; it returns the data written at each offset.
// within gives the first result on ch, failing the test when none comes
// within d (what: the call that should have returned).
func within(t *testing.T, ch <-chan error, d time.Duration, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
		return nil
	}
}

// syncedToBacking fsyncs the device f, then checks that the backing file
// holds data (what writeRead wrote, by offset).
func syncedToBacking(t *testing.T, f, backing *os.File, data map[int64][]byte) {
	t.Helper()
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	for off, want := range data {
		got := make([]byte, len(want))
		if _, err := backing.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("backing file at %d differs from what was written (%v)", off, err)
		}
	}
}

func writeRead(t *testing.T, f *os.File, offs []int64, size int, seed int64) map[int64][]byte {
	t.Helper()
	w, r := alignedBuf(t, size), alignedBuf(t, size)
	out := map[int64][]byte{}
	for i, off := range offs {
		fill(w, seed+int64(i))
		if n, err := f.WriteAt(w, off); err != nil || n != size {
			t.Fatalf("write %d@%d: %d, %v", size, off, n, err)
		}
		out[off] = append([]byte(nil), w...)
	}
	for _, off := range offs {
		clear(r)
		if n, err := f.ReadAt(r, off); err != nil || n != size {
			t.Fatalf("read %d@%d: %d, %v", size, off, n, err)
		}
		if !bytes.Equal(r, out[off]) {
			t.Fatalf("read %d@%d: data differs from what was written", size, off)
		}
	}
	return out
}

// A []byte backend, inline and in goroutines (Async), on two queues: data
// written through the device is in the backend and reads back; FLUSH and FUA
// reach Flush; the device shape and counters are right.
func TestReadWrite(t *testing.T) {
	for _, async := range []bool{false, true} {
		t.Run(fmt.Sprintf("async=%v", async), func(t *testing.T) {
			const size = 32 << 20
			m := &mem{b: make([]byte, size)}
			d := newDev(t, Config{Size: size, Queues: 2, Depth: 32, Async: async}, m)
			if d.Info().Size != size || d.Info().DataMode != DataCopy || !strings.HasPrefix(d.Path(), "/dev/ublkb") {
				t.Fatalf("info %+v path %s", d.Info(), d.Path())
			}
			f := openDev(t, d)
			offs := []int64{0, 1 << 20, 7<<20 + 512, size - 128<<10}
			data := writeRead(t, f, offs, 128<<10, 1)
			for off, want := range data {
				if !bytes.Equal(m.get(off, int64(len(want))), want) {
					t.Fatalf("backend at %d differs from what was written", off)
				}
			}
			// many small IOs from several goroutines at once, on distinct ranges
			var wg sync.WaitGroup
			for g := 0; g < 4; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					base := int64(16<<20 + g*(1<<20))
					offs := make([]int64, 0, 64)
					for i := int64(0); i < 64; i++ {
						offs = append(offs, base+i*16384)
					}
					writeRead(t, f, offs, 4096, int64(100*g))
				}(g)
			}
			wg.Wait()
			before := m.flushes.Load()
			if err := f.Sync(); err != nil {
				t.Fatalf("fsync: %v", err)
			}
			if m.flushes.Load() == before {
				t.Errorf("fsync of the device did not reach Flush")
			}
			st, err := d.Stats()
			if err != nil || len(st.Queues) != d.Info().Queues || st.Total.IOs < 500 || st.Total.Errors != 0 || st.Total.CopiedBytes == 0 {
				t.Errorf("stats %+v, %v", st, err)
			}
		})
	}
}

// A Handler that completes every request later from a goroutine, out of
// order; completing twice is refused.
func TestHandlerCompletesLater(t *testing.T) {
	const size = 16 << 20
	store := make([]byte, size)
	// udev's probe of the new device (reads at offset 0) may run alongside
	// the test's writes there: a real overlap, harmless here but a data race
	var storeMu sync.Mutex
	var again atomic.Int64
	// handler goroutines started and finished (second completion included)
	var started, finished atomic.Int64
	h := HandlerFunc(func(r *Request) {
		started.Add(1)
		go func() {
			defer finished.Add(1)
			time.Sleep(time.Duration(rand.Intn(300)) * time.Microsecond)
			storeMu.Lock()
			switch r.Op() {
			case OpRead:
				copy(r.Data(), store[r.Offset():])
			case OpWrite:
				copy(store[r.Offset():], r.Data())
			}
			storeMu.Unlock()
			if err := r.Fail(nil); err != nil {
				t.Errorf("complete %v: %v", r, err)
			}
			if err := r.Complete(0); errors.Is(err, syscall.EALREADY) {
				again.Add(1)
			}
			if r.Data() != nil {
				t.Errorf("Data() of a completed request is not nil")
			}
		}()
	})
	d := newDev(t, Config{Size: size, Queues: 2, Depth: 16, NeedsBuffer: true}, h)
	f := openDev(t, d)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			offs := []int64{}
			for i := int64(0); i < 32; i++ {
				offs = append(offs, int64(g)<<22+i*65536)
			}
			writeRead(t, f, offs, 65536, int64(g))
		}(g)
	}
	wg.Wait()
	// the reader returns once the first completion is in; the goroutine's
	// second attempt may still be on its way
	for deadline := time.Now().Add(10 * time.Second); finished.Load() != started.Load(); {
		if time.Now().After(deadline) {
			t.Fatalf("handler goroutines: %d started, %d finished after 10 s", started.Load(), finished.Load())
		}
		time.Sleep(time.Millisecond)
	}
	st, _ := d.Stats()
	if again.Load() == 0 || again.Load() != int64(st.Total.IOs) {
		t.Errorf("second completions refused: %d of %d requests", again.Load(), st.Total.IOs)
	}
}

type panicky struct {
	mem
	at int64
}

func (p *panicky) ReadAt(b []byte, off int64) (int, error) {
	if off == p.at {
		panic(fmt.Sprintf("boom at %d", off))
	}
	return p.mem.ReadAt(b, off)
}

// A panicking backend (inline, Async, Handler) fails that request with EIO,
// reports a *PanicError and the device keeps serving.
func TestPanickingBackend(t *testing.T) {
	const size, bad = 8 << 20, 1 << 20
	for _, kind := range []string{"inline", "async", "handler"} {
		t.Run(kind, func(t *testing.T) {
			var log errorLog
			p := &panicky{mem: mem{b: make([]byte, size)}, at: bad}
			cfg := Config{Size: size, Queues: 2, Async: kind == "async", OnError: log.add}
			var backend any = p
			if kind == "handler" {
				cfg.NeedsBuffer = true
				backend = panickingHandler(&p.mem, bad, func() bool { return true })
			}
			d := newDev(t, cfg, backend)
			f := openDev(t, d)
			buf := alignedBuf(t, 4096)
			for i := 0; i < 3; i++ {
				if _, err := f.ReadAt(buf, bad); !errors.Is(err, syscall.EIO) {
					t.Fatalf("read of the panicking block: %v, want EIO", err)
				}
				writeRead(t, f, []int64{0, bad + 4096, size - 4096}, 4096, int64(i))
			}
			ps := log.panics()
			if len(ps) != 3 || ps[0].Offset != bad || ps[0].Op != OpRead || len(ps[0].Stack) == 0 ||
				!strings.Contains(fmt.Sprint(ps[0].Value), "boom") {
				t.Fatalf("reported panics: %v", log.errs)
			}
			st, _ := d.Stats()
			if st.Total.Errors != 3 {
				t.Errorf("error counter %d, want 3", st.Total.Errors)
			}
		})
	}
}

// A Handler with leases on a file: reads in two sub-ranges with callbacks
// (aggregate completion), writes completed manually from the callback,
// FLUSH on the ring; direction (EPERM), range (EINVAL) and thread (EXDEV)
// rules; a panicking lease callback fails its request with EIO.
func TestLease(t *testing.T) {
	requireDevice(t)
	const size, bad = 16 << 20, 3 << 20
	file, err := os.CreateTemp(t.TempDir(), "lease")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := file.Truncate(size); err != nil {
		t.Fatal(err)
	}
	fd := int(file.Fd())
	var eperm, einval, exdev, halves, manual atomic.Int64
	var once sync.Once
	var log errorLog
	h := HandlerFunc(func(r *Request) {
		n := r.Len()
		switch r.Op() {
		case OpRead:
			once.Do(func() { // a lease from another goroutine is refused
				errc := make(chan error)
				go func() { errc <- r.Lease().ReadInto(fd, r.Offset(), 0, n) }()
				if err := <-errc; errors.Is(err, syscall.EXDEV) {
					exdev.Add(1)
				} else {
					t.Errorf("lease from a goroutine: %v, want EXDEV", err)
				}
			})
			if err := r.Lease().ReadInto(fd, r.Offset(), 0, n+512); errors.Is(err, syscall.EINVAL) {
				einval.Add(1)
			}
			cb := func(r *Request, res int) {
				if r.Offset() == bad {
					panic("lease callback boom")
				}
				if res > 0 {
					halves.Add(1)
				}
			}
			l := r.Lease().OnDone(cb)
			if err := l.ReadInto(fd, r.Offset(), 0, n/2); err != nil {
				r.Fail(err)
				return
			}
			if err := l.ReadInto(fd, r.Offset()+int64(n/2), n/2, n-n/2); err != nil {
				t.Errorf("second half: %v", err)
			}
		case OpWrite:
			if err := r.Lease().ReadInto(fd, r.Offset(), 0, n); errors.Is(err, syscall.EPERM) {
				eperm.Add(1)
			}
			if err := r.Lease().Manual(); err != nil {
				r.Fail(err)
				return
			}
			err := r.Lease().OnDone(func(r *Request, res int) {
				manual.Add(1)
				if err := r.Complete(res); err != nil {
					t.Errorf("complete from the callback: %v", err)
				}
			}).WriteFrom(fd, r.Offset(), 0, n)
			if err != nil {
				r.Fail(err)
			}
		case OpFlush:
			if err := r.Fsync(fd, true, nil); err != nil {
				r.Fail(err)
			}
		default:
			r.Complete(-int(syscall.EOPNOTSUPP))
		}
	})
	d := newDev(t, Config{Size: size, Queues: 2, OnError: log.add}, h)
	t.Logf("data mode %v", d.Info().DataMode)
	f := openDev(t, d)
	offs := []int64{0, 1<<20 + 8192, 5 << 20, size - 256<<10}
	syncedToBacking(t, f, file, writeRead(t, f, offs, 256<<10, 7))
	buf := alignedBuf(t, 4096)
	if _, err := f.ReadAt(buf, bad); !errors.Is(err, syscall.EIO) {
		t.Errorf("read with a panicking lease callback: %v, want EIO", err)
	}
	writeRead(t, f, []int64{bad + 4096}, 4096, 9) // still serving
	if eperm.Load() == 0 || einval.Load() == 0 || exdev.Load() != 1 || halves.Load() == 0 || manual.Load() == 0 {
		t.Errorf("EPERM %d EINVAL %d EXDEV %d halves %d manual %d", eperm.Load(), einval.Load(), exdev.Load(), halves.Load(), manual.Load())
	}
	// each half's callback panicked: two reports, one failed request
	if ps := log.panics(); len(ps) != 2 || ps[0].Offset != bad {
		t.Errorf("reported: %v", log.errs)
	}
	st, _ := d.Stats()
	if st.Total.LeaseOps == 0 {
		t.Errorf("no lease ops counted: %+v", st.Total)
	}
	if m := d.Info().DataMode; (m == DataAutoBufReg || m == DataRegister) && st.Total.CopiedBytes != 0 {
		t.Errorf("mode %v copied %d bytes", m, st.Total.CopiedBytes)
	}
}

const (
	blkDiscard = 0x1277 // BLKDISCARD
	blkZeroout = 0x127f // BLKZEROOUT
)

func ioctlRange(f *os.File, req uintptr, off, n uint64) error {
	r := [2]uint64{off, n}
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
		return e
	}
	return nil
}

// noZeroer has no WriteZeroes: zeroes are written with WriteAt.
type noZeroer struct{ m *mem }

func (z noZeroer) ReadAt(p []byte, off int64) (int, error)  { return z.m.ReadAt(p, off) }
func (z noZeroer) WriteAt(p []byte, off int64) (int, error) { return z.m.WriteAt(p, off) }
func (z noZeroer) Discard(off, n int64) error               { return nil }

// DISCARD and WRITE_ZEROES reach Discard / WriteZeroes (or zeroes written
// with WriteAt when WriteZeroes is missing).
func TestDiscardWriteZeroes(t *testing.T) {
	const size = 8 << 20
	m := &mem{b: make([]byte, size)}
	d := newDev(t, Config{Size: size}, m)
	f := openDev(t, d)
	writeRead(t, f, []int64{0, 1 << 20}, 1<<20, 3)
	if err := ioctlRange(f, blkDiscard, 0, 1<<20); err != nil || m.discard.Load() == 0 {
		t.Fatalf("BLKDISCARD: %v (Discard called %d times)", err, m.discard.Load())
	}
	if err := ioctlRange(f, blkZeroout, 1<<20, 1<<20); err != nil || m.zeroes.Load() == 0 {
		t.Fatalf("BLKZEROOUT: %v (WriteZeroes called %d times)", err, m.zeroes.Load())
	}
	if !bytes.Equal(m.get(0, 2<<20), make([]byte, 2<<20)) {
		t.Fatalf("not zeroed")
	}

	nz := noZeroer{&mem{b: make([]byte, size)}}
	d2 := newDev(t, Config{Size: size}, nz)
	f2 := openDev(t, d2)
	writeRead(t, f2, []int64{1 << 20}, 1<<20, 4)
	if err := ioctlRange(f2, blkZeroout, 1<<20, 1<<20); err != nil {
		t.Fatalf("BLKZEROOUT without WriteZeroes: %v", err)
	}
	buf := alignedBuf(t, 1<<20)
	if _, err := f2.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, make([]byte, 1<<20)) || !bytes.Equal(nz.m.get(1<<20, 1<<20), buf) {
		t.Fatalf("zeroes written with WriteAt: %v", err)
	}
}

// A backend without WriteAt gives a read-only device.
func TestReadOnly(t *testing.T) {
	d := newDev(t, Config{Size: 4 << 20}, readerOnly{})
	ro, err := os.ReadFile("/sys/block/" + strings.TrimPrefix(d.Path(), "/dev/") + "/ro")
	if err != nil || strings.TrimSpace(string(ro)) != "1" {
		t.Fatalf("sysfs ro = %q, %v", ro, err)
	}
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("read: %v", err)
	}
}

func devGone(path string) bool {
	_, err := os.Stat("/sys/block/" + strings.TrimPrefix(path, "/dev/"))
	return errors.Is(err, os.ErrNotExist)
}

func charGone(id int) bool {
	_, err := os.Stat(fmt.Sprintf("/sys/class/ublk-char/ublkc%d", id))
	return errors.Is(err, os.ErrNotExist)
}

// isDone says whether d stopped serving (for waitFor).
func isDone(d *Device) func() bool {
	return func() bool {
		select {
		case <-d.Done():
			return true
		default:
			return false
		}
	}
}

func waitFor(what string, t *testing.T, limit time.Duration, cond func() bool) {
	t.Helper()
	end := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Cancelling the context of NewContext under IO (inline, Async, a Handler
// completing from goroutines) stops and removes the device in bounded time;
// the IO in flight ends with errors, never hangs.
func TestContextCancelUnderIO(t *testing.T) {
	requireDevice(t)
	const size = 16 << 20
	for _, kind := range []string{"inline", "async", "handler"} {
		t.Run(kind, func(t *testing.T) {
			m := &mem{b: make([]byte, size)}
			var backend any = m
			cfg := Config{Size: size, Queues: 2, Depth: 32, Async: kind == "async", Timeout: 20 * time.Second}
			if kind == "handler" {
				cfg.NeedsBuffer = true
				backend = HandlerFunc(func(r *Request) {
					go func() {
						switch r.Op() {
						case OpRead:
							m.ReadAt(r.Data(), r.Offset())
						case OpWrite:
							m.WriteAt(r.Data(), r.Offset())
						}
						r.Fail(nil) // after the stop: ESHUTDOWN or ErrClosed, ignored
					}()
				})
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			d, err := NewContext(ctx, cfg, backend)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			path := d.Path()
			f := openDev(t, d)
			var ios atomic.Int64
			var wg sync.WaitGroup
			for g := 0; g < 4; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					buf := alignedBuf(t, 65536)
					rnd := rand.New(rand.NewSource(int64(g)))
					for {
						off := int64(g)*size/4 + rnd.Int63n(size/4/65536)*65536 // its own quarter: no overlapping writes
						var err error
						if rnd.Intn(2) == 0 {
							_, err = f.WriteAt(buf, off)
						} else {
							_, err = f.ReadAt(buf, off)
						}
						if err != nil {
							return
						}
						ios.Add(1)
					}
				}(g)
			}
			waitFor("IO under way", t, 30*time.Second, func() bool { return ios.Load() > 200 })
			start := time.Now()
			cancel()
			waitFor("device stopped", t, 60*time.Second, isDone(d))
			stopped := time.Since(start)
			ended := make(chan struct{})
			go func() { wg.Wait(); close(ended) }()
			select {
			case <-ended:
			case <-time.After(60 * time.Second):
				t.Fatal("IO still running 60 s after the device stopped")
			}
			// deleting the device waits for every opener of the block device
			f.Close()
			waitFor("device removed", t, 60*time.Second, func() bool { return devGone(path) && charGone(d.ID()) })
			if err := d.Close(); err != nil {
				t.Errorf("Close after cancel: %v", err)
			}
			if _, err := d.Stats(); err != nil {
				t.Errorf("Stats after close: %v", err)
			}
			if err := d.Stop(); !errors.Is(err, ErrClosed) {
				t.Errorf("Stop after Close: %v, want ErrClosed", err)
			}
			t.Logf("%d IOs; stopped %v, removed %v after cancel", ios.Load(), stopped.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		})
	}
}

// Stop ends Serve, which removes the device; Close is idempotent and safe
// from several goroutines.
func TestStopServeClose(t *testing.T) {
	requireDevice(t)
	d, err := New(Config{Size: 4 << 20}, &mem{b: make([]byte, 4<<20)})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- d.Serve(context.Background()) }()
	if err := d.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Serve did not return after Stop")
	}
	if !devGone(d.Path()) {
		t.Errorf("%s still there after Serve returned", d.Path())
	}
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}()
	}
	wg.Wait()
}

// Send and Recv leases on a stream socket: a "remote" goroutine keeps the
// data; each request sends a 16-byte header (op, offset, length) and then its
// data (WRITE, lease Send) or receives the data (READ, lease Recv). One
// request at a time (depth 1) keeps the stream in order. Also a fixed id.
func TestLeaseSocket(t *testing.T) {
	requireDevice(t)
	const size = 8 << 20
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	local, remote := os.NewFile(uintptr(fds[0]), "local"), os.NewFile(uintptr(fds[1]), "remote")
	defer local.Close()
	store := make([]byte, size)
	served := make(chan error, 1)
	go func() { // the remote side; ends when the local socket closes
		hdr := make([]byte, 16)
		for {
			if _, err := io.ReadFull(remote, hdr); err != nil {
				served <- nil
				return
			}
			op, off, n := binary.LittleEndian.Uint32(hdr), int64(binary.LittleEndian.Uint64(hdr[4:])), int64(binary.LittleEndian.Uint32(hdr[12:]))
			var err error
			if Op(op) == OpWrite {
				_, err = io.ReadFull(remote, store[off:off+n])
			} else {
				_, err = remote.Write(store[off : off+n])
			}
			if err != nil {
				served <- err
				return
			}
		}
	}()
	sock := int(local.Fd())
	h := HandlerFunc(func(r *Request) {
		if r.Op() != OpRead && r.Op() != OpWrite {
			r.Complete(0)
			return
		}
		hdr := make([]byte, 16)
		binary.LittleEndian.PutUint32(hdr, uint32(r.Op()))
		binary.LittleEndian.PutUint64(hdr[4:], uint64(r.Offset()))
		binary.LittleEndian.PutUint32(hdr[12:], uint32(r.Len()))
		if _, err := syscall.Write(sock, hdr); err != nil {
			r.Fail(err)
			return
		}
		if r.Op() == OpWrite {
			err = r.Lease().Send(sock, 0, r.Len())
		} else {
			err = r.Lease().Recv(sock, 0, r.Len())
		}
		if err != nil {
			r.Fail(err)
		}
	})
	d := newDev(t, Config{Size: size, Depth: 1, FixedID: true, ID: 7}, h)
	if d.ID() != 7 || d.Path() != "/dev/ublkb7" {
		t.Fatalf("asked for id 7, got %d %s", d.ID(), d.Path())
	}
	f := openDev(t, d)
	data := writeRead(t, f, []int64{0, 1 << 20, size - 64<<10}, 64<<10, 11)
	f.Close()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	local.Close()
	remote.Close()
	if err := <-served; err != nil {
		t.Fatalf("remote: %v", err)
	}
	for off, want := range data {
		if !bytes.Equal(store[off:off+int64(len(want))], want) {
			t.Fatalf("remote store at %d differs", off)
		}
	}
}

// Map: bad extents are refused with the right errno; READ/WRITE inside a
// mapped extent go to the file (at its file offset) and never reach the
// backend, the rest does; after Unmap the backend gets them again.
func TestMap(t *testing.T) {
	const size = 16 << 20
	m := &mem{b: make([]byte, size)}
	d := newDev(t, Config{Size: size, Depth: 16}, m)
	file, err := os.CreateTemp("", "ublk-map-*.img")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(file.Name())
	defer file.Close()
	if err := file.Truncate(size + 1<<20); err != nil {
		t.Fatal(err)
	}
	fd := int(file.Fd())
	for _, c := range []struct {
		off, n uint64
		fd     int
		fl     MapFlags
		want   syscall.Errno
	}{
		{0, size + 4096, fd, MapRead, syscall.EINVAL},
		{100, 4096, fd, MapRead, syscall.EINVAL},
		{0, 0, fd, MapRead, syscall.EINVAL},
		{0, 4096, -1, MapRead, syscall.EBADF},
		{0, 4096, fd, 0, syscall.EINVAL},
	} {
		var e *Error
		if err := d.Map(c.off, c.n, c.fd, 0, c.fl); !errors.As(err, &e) || e.Errno != c.want {
			t.Errorf("Map(%d, %d, fd %d, flags %d) = %v, want %v", c.off, c.n, c.fd, c.fl, err, c.want)
		}
	}
	if err := d.Map(0, size/2, fd, 1<<20, MapRead|MapWrite); err != nil {
		t.Fatalf("Map: %v", err)
	}
	f := openDev(t, d)
	mapped := writeRead(t, f, []int64{0, 4096, size/2 - 8192}, 4096, 7)
	writeRead(t, f, []int64{size / 2, size - 4096}, 4096, 9)
	got := make([]byte, 4096)
	for off, want := range mapped {
		if _, err := file.ReadAt(got, off+1<<20); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("mapped write at %d is not in the file at %d (%v)", off, off+1<<20, err)
		}
		if bytes.Equal(m.get(off, 4096), want) {
			t.Fatalf("mapped write at %d reached the backend", off)
		}
	}
	if bytes.Equal(m.get(size/2, 4096), make([]byte, 4096)) {
		t.Fatalf("the unmapped half's write did not reach the backend")
	}
	if err := d.Unmap(0, size/2); err != nil {
		t.Fatalf("Unmap: %v", err)
	}
	r := alignedBuf(t, 4096)
	if _, err := f.ReadAt(r, 0); err != nil || !bytes.Equal(r, m.get(0, 4096)) {
		t.Fatalf("after Unmap a read at 0 is not the backend's data (%v)", err)
	}
}

// tempFile is a file of size random bytes in the test's temporary directory.
func tempFile(t *testing.T, size int) *os.File {
	t.Helper()
	file, err := os.CreateTemp(t.TempDir(), "backing")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { file.Close() })
	b := make([]byte, size)
	fill(b, 42)
	if _, err := file.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return file
}

// Config.Async does not apply to a Handler: HandleIO runs on the queue thread
// even so, where RegisterFd, leases and Fsync work (EXDEV elsewhere).
func TestHandlerIgnoresAsync(t *testing.T) {
	requireDevice(t)
	const size = 8 << 20
	file := tempFile(t, size)
	fd := int(file.Fd())
	var registered, exdev atomic.Int64
	h := HandlerFunc(func(r *Request) {
		switch err := r.RegisterFd(fd); {
		case err == nil, errors.Is(err, syscall.EOPNOTSUPP):
			registered.Add(1)
		case errors.Is(err, syscall.EXDEV):
			exdev.Add(1)
		default:
			t.Errorf("RegisterFd: %v", err)
		}
		var err error
		switch r.Op() {
		case OpRead:
			err = r.Lease().ReadInto(fd, r.Offset(), 0, r.Len())
		case OpWrite:
			err = r.Lease().WriteFrom(fd, r.Offset(), 0, r.Len())
		case OpFlush:
			err = r.Fsync(fd, true, nil)
		default:
			err = syscall.EOPNOTSUPP
		}
		if err != nil {
			if errors.Is(err, syscall.EXDEV) {
				exdev.Add(1)
			}
			r.Fail(err)
		}
	})
	d := newDev(t, Config{Size: size, Queues: 2, Async: true}, h)
	f := openDev(t, d)
	syncedToBacking(t, f, file, writeRead(t, f, []int64{0, 1 << 20, size - 64<<10}, 64<<10, 5))
	if exdev.Load() != 0 || registered.Load() == 0 {
		t.Errorf("HandleIO with Config.Async: %d EXDEV, %d RegisterFd", exdev.Load(), registered.Load())
	}
}

// failing fails reads at offset at with EIO once armed.
type failing struct {
	mem
	armed atomic.Bool
	at    int64
}

func (b *failing) ReadAt(p []byte, off int64) (int, error) {
	if off == b.at && b.armed.Load() {
		return 0, syscall.EIO
	}
	return b.mem.ReadAt(p, off)
}

// Config.OnError may call Close, also where it runs on the queue thread (an
// inline backend's error, a Handler's panic): there Close starts the stop and
// returns, a goroutine finishes it; from an Async backend's goroutine it
// waits as usual. It never hangs: the device stops and is removed, and a
// Close from another goroutine waits for the end.
func TestCloseFromOnError(t *testing.T) {
	requireDevice(t)
	const size, bad = 8 << 20, 5<<20 + 12288 // (where udev's probe does not read)
	for _, kind := range []string{"inline", "async", "handler"} {
		t.Run(kind, func(t *testing.T) {
			b := &failing{mem: mem{b: make([]byte, size)}, at: bad}
			var dev atomic.Pointer[Device]
			var once sync.Once
			var later errorLog
			closed := make(chan error, 1)
			onError := func(err error) {
				first := false
				once.Do(func() { first = true })
				if !first {
					later.add(err)
					return
				}
				closed <- dev.Load().Close()
			}
			var backend any = b
			cfg := Config{Size: size, Queues: 2, Async: kind == "async", OnError: onError, Timeout: 20 * time.Second}
			if kind == "handler" {
				cfg.NeedsBuffer = true
				backend = panickingHandler(&b.mem, bad, b.armed.Load)
			}
			d := newDev(t, cfg, backend)
			dev.Store(d)
			path, id := d.Path(), d.ID()
			f := openDev(t, d)
			writeRead(t, f, []int64{0, 1 << 20}, 4096, 3)
			b.armed.Store(true)
			if _, err := f.ReadAt(alignedBuf(t, 4096), bad); err == nil {
				t.Fatal("read of the failing block succeeded")
			}
			f.Close() // the device is deleted once nobody has it open
			if err := within(t, closed, 60*time.Second, "Close called from OnError"); err != nil {
				t.Errorf("Close from OnError: %v", err)
			}
			waitFor("device stopped", t, 60*time.Second, isDone(d))
			res := make(chan error, 1)
			go func() { res <- d.Close() }()
			if err := within(t, res, 90*time.Second, "Close"); err != nil {
				t.Errorf("Close after the one from OnError: %v", err)
			}
			waitFor("device removed", t, 30*time.Second, func() bool { return devGone(path) && charGone(id) })
			if err := d.Stop(); !errors.Is(err, ErrClosed) {
				t.Errorf("Stop after Close: %v, want ErrClosed", err)
			}
			later.mu.Lock()
			for _, e := range later.errs {
				t.Logf("also reported: %v", e)
			}
			later.mu.Unlock()
		})
	}
}

// A request left to its leases (no OnDone, or an OnDone callback that does
// not complete it) is completed by the engine when its last operation is
// over: from then on (without OnDone: from the lease call on) Complete and
// Fail give EALREADY and Data nil, so a late Complete from another goroutine
// cannot reach the tag's next request. One queue of depth 1: every request
// has tag 0.
func TestLeaseAutoCompletion(t *testing.T) {
	requireDevice(t)
	const size = 8 << 20
	const leased, next = 4<<20 + 8192, 6<<20 + 4096 // (where udev's probe does not read)
	file := tempFile(t, size)
	fd := int(file.Fd())
	want := func(off int64) []byte {
		b := make([]byte, 4096)
		if _, err := file.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}
	// serve completes r from the file through its buffer (copy mode)
	serve := func(r *Request) error {
		var err error
		switch r.Op() {
		case OpRead:
			_, err = file.ReadAt(r.Data(), r.Offset())
		case OpWrite:
			_, err = file.WriteAt(r.Data(), r.Offset())
		}
		if err != nil {
			r.Fail(err)
			return err
		}
		return r.Fail(nil)
	}
	for _, kind := range []string{"no-callback", "callback"} {
		t.Run(kind, func(t *testing.T) {
			stale := make(chan *Request, 16)
			held := make(chan *Request, 16)
			h := HandlerFunc(func(r *Request) {
				switch {
				case r.Op() == OpRead && r.Offset() == leased:
					l := r.Lease()
					if kind == "callback" {
						l = l.OnDone(func(r *Request, res int) {
							if res != r.Len() || r.Data() == nil {
								t.Errorf("lease callback: res %d, Data %d bytes", res, len(r.Data()))
							}
							stale <- r // not completed here: the engine does after this returns
						})
					}
					if err := l.ReadInto(fd, r.Offset(), 0, r.Len()); err != nil {
						t.Errorf("ReadInto: %v", err)
						r.Fail(err)
						return
					}
					if kind == "no-callback" {
						if r.Data() != nil {
							t.Errorf("Data after a lease without OnDone is not nil")
						}
						if err := r.Complete(0); !errors.Is(err, syscall.EALREADY) {
							t.Errorf("Complete after a lease without OnDone: %v, want EALREADY", err)
						}
						stale <- r
					}
				case r.Op() == OpRead && r.Offset() == next:
					held <- r // completed by the test
				default:
					serve(r)
				}
			})
			d := newDev(t, Config{Size: size, Queues: 1, Depth: 1, NeedsBuffer: true}, h)
			f := openDev(t, d)
			buf := alignedBuf(t, 4096)
			if _, err := f.ReadAt(buf, leased); err != nil || !bytes.Equal(buf, want(leased)) {
				t.Fatalf("leased read: %v (or the data differs)", err)
			}
			var r *Request
			select {
			case r = <-stale:
			case <-time.After(10 * time.Second):
				t.Fatal("no leased request")
			}
			// the tag's next request, held by the handler
			res := make(chan error, 1)
			buf2 := alignedBuf(t, 4096)
			go func() { _, err := f.ReadAt(buf2, next); res <- err }()
			var r2 *Request
			select {
			case r2 = <-held:
			case <-time.After(30 * time.Second):
				t.Fatal("the next read did not reach the handler")
			}
			if r2.Tag() != r.Tag() {
				t.Fatalf("tags %d and %d with depth 1", r.Tag(), r2.Tag())
			}
			if err := r.Complete(-int(syscall.EIO)); !errors.Is(err, syscall.EALREADY) {
				t.Errorf("late Complete of the leased request: %v, want EALREADY", err)
			}
			if err := r.Fail(nil); !errors.Is(err, syscall.EALREADY) {
				t.Errorf("late Fail of the leased request: %v, want EALREADY", err)
			}
			if r.Data() != nil {
				t.Errorf("Data of the completed leased request is not nil")
			}
			if err := serve(r2); err != nil {
				t.Errorf("completing the next request: %v (a late Complete of the previous one reached it?)", err)
			}
			go func() { // any other read at next (udev), until the device stops
				for {
					select {
					case r := <-held:
						serve(r)
					case <-d.Done():
						return
					}
				}
			}()
			select {
			case err := <-res:
				if err != nil || !bytes.Equal(buf2, want(next)) {
					t.Fatalf("the next read: %v (or the data differs)", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the next read did not complete")
			}
		})
	}
}
