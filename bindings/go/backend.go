package ublk

import (
	"io"
	"sync"
	"syscall"
)

// rwBackend serves requests with an io.ReaderAt / io.WriterAt backend, on
// the request's data buffer (copy mode).
type rwBackend struct {
	r       io.ReaderAt
	w       io.WriterAt
	flush   func() error
	discard func(off, n int64) error
	zero    func(off, n int64) error
}

// zeroes is a read-only, page-aligned (O_DIRECT-friendly) block of zeroes
// for WRITE_ZEROES through WriteAt.
var zeroes = sync.OnceValue(func() []byte {
	const n = 64 << 10
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n)
	}
	return b
})

// serve serves r and completes it; it returns the error to report (an
// *IOError) when the backend failed it.
func (b *rwBackend) serve(r *Request) error {
	var err error
	res := 0
	switch r.op {
	case OpRead:
		buf := r.Data()
		n, e := b.r.ReadAt(buf, r.off)
		if n < len(buf) && (e == nil || e == io.EOF) { // end of the data: zeroes
			clear(buf[n:])
			e = nil
		} else if e == io.EOF {
			e = nil
		}
		err, res = e, len(buf)
	case OpWrite:
		if b.w == nil {
			err = syscall.EROFS
			break
		}
		buf := r.Data()
		n, e := b.w.WriteAt(buf, r.off)
		if e == nil && n < len(buf) {
			e = io.ErrShortWrite
		}
		if e == nil && r.FUA() && b.flush != nil {
			e = b.flush()
		}
		err, res = e, len(buf)
	case OpFlush:
		if b.flush != nil {
			err = b.flush()
		}
	case OpDiscard:
		if b.discard != nil {
			err = b.discard(r.off, int64(r.n))
		}
	case OpWriteZeroes:
		switch {
		case b.zero != nil:
			err = b.zero(r.off, int64(r.n))
		case b.w != nil:
			z := zeroes()
			for off, end := r.off, r.off+int64(r.n); off < end && err == nil; off += int64(len(z)) {
				_, err = b.w.WriteAt(z[:min(int64(len(z)), end-off)], off)
			}
		default:
			err = syscall.EROFS
		}
	default:
		err = syscall.EOPNOTSUPP
	}
	if err != nil {
		// the caller reports it after the completion: the report may be
		// slow (logging), or close the device
		_ = r.Complete(Errno(err))
		return &IOError{Op: r.op, Offset: r.off, Len: r.n, Err: err}
	}
	_ = r.Complete(res)
	return nil
}
