//! `mem`: a RAM disk. The store is one anonymous `MAP_NORESERVE` mapping, so
//! memory is only used for blocks that were written (sparse); discard and
//! write-zeroes give whole pages back.

use crate::buf::{page_size, AnonMap};
use crate::error::Result;
use crate::io::{Io, Op};
use crate::queue::QueueCtx;
use crate::target::Target;
use std::sync::Arc;

/// The memory shared by every queue of a `mem` device.
pub struct MemStore {
    map: AnonMap,
    size: u64,
}

impl MemStore {
    pub fn new(size: u64) -> Result<Arc<MemStore>> {
        let len = usize::try_from(size).map_err(|_| crate::Error::inval("size too large for memory"))?;
        let map = AnonMap::new(len)?;
        map.no_huge_pages();
        Ok(Arc::new(MemStore { map, size }))
    }

    fn range(&self, off: u64, len: usize) -> Option<*mut u8> {
        if off.checked_add(len as u64)? > self.size {
            return None;
        }
        // SAFETY: off + len <= size <= mapping length.
        Some(unsafe { self.map.ptr().add(off as usize) })
    }

    /// Zeroes a range: whole pages are dropped (reads see zeroes), edges memset.
    fn zero(&self, off: u64, len: usize) -> i32 {
        let Some(p) = self.range(off, len) else { return -libc::EIO };
        let ps = page_size();
        let start = p as usize;
        let end = start + len;
        let first = start.div_ceil(ps) * ps;
        let last = end / ps * ps;
        // SAFETY: all pointers lie in [p, p+len), inside the mapping. Concurrent
        // requests on overlapping ranges have undefined content on any block
        // device; here they cannot fault.
        unsafe {
            if first < last {
                std::ptr::write_bytes(p, 0, first - start);
                std::ptr::write_bytes(last as *mut u8, 0, end - last);
                libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED);
            } else {
                std::ptr::write_bytes(p, 0, len);
            }
        }
        0
    }
}

impl MemStore {
    /// Serves one request against the store: READ copies into `buf`, WRITE
    /// copies from it, DISCARD/WRITE_ZEROES zero the range. Returns the
    /// request's result (bytes for READ/WRITE, 0, or a negative errno). Any
    /// thread: usable by targets that complete requests elsewhere.
    pub fn apply(&self, op: Op, off: u64, len: u32, buf: &mut [u8]) -> i32 {
        let len = len as usize;
        match op {
            Op::Read | Op::Write => match self.range(off, len) {
                Some(p) if buf.len() >= len => {
                    // SAFETY: p..p+len is inside the store and buf holds at
                    // least len bytes of the request's own buffer; they never
                    // overlap. Concurrent requests on overlapping ranges have
                    // undefined content on any block device; they cannot fault.
                    unsafe {
                        if op == Op::Read {
                            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
                        } else {
                            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len);
                        }
                    }
                    len as i32
                }
                _ => -libc::EIO,
            },
            Op::Flush => 0,
            Op::Discard | Op::WriteZeroes => self.zero(off, len),
            Op::Other(_) => -libc::EOPNOTSUPP,
        }
    }
}

pub struct MemTarget {
    store: Arc<MemStore>,
}

impl MemTarget {
    pub fn new(store: Arc<MemStore>) -> MemTarget {
        MemTarget { store }
    }
}

impl Target for MemTarget {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, mut io: Io<'_>) {
        let (op, off, len) = (io.op(), io.offset(), io.len());
        let res = self.store.apply(op, off, len, io.buf());
        let _ = ctx.complete(io.tag(), res);
    }
}
