//! Memory the engine maps: per-tag IO buffers (copy mode) and the read-only
//! descriptor array of a queue.

use crate::error::{Error, Result};
use crate::sys;
use std::os::fd::RawFd;

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// An anonymous private mapping, unmapped on drop.
pub(crate) struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; who may touch which byte is decided by the owners
// (one tag's buffer is used by one request holder at a time).
unsafe impl Send for AnonMap {}
unsafe impl Sync for AnonMap {}

impl AnonMap {
    /// Maps `len` bytes of zeroed, page-aligned, lazily allocated memory.
    pub(crate) fn new(len: usize) -> Result<AnonMap> {
        let len = sys::round_up(len.max(1), page_size());
        // SAFETY: anonymous mapping, no fd, kernel picks the address.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(format!("cannot map {len} bytes of memory")));
        }
        Ok(AnonMap { ptr: p as *mut u8, len })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Asks for small pages only: a sparse store touched at random would
    /// otherwise zero a whole 2 MiB huge page on the first write to it.
    pub(crate) fn no_huge_pages(&self) {
        // SAFETY: advice on our own mapping; failure only loses the hint.
        unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.len, libc::MADV_NOHUGEPAGE) };
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Per-tag data buffers of one queue in copy mode: `depth` slots of `slot`
/// bytes each, page aligned.
pub(crate) struct TagBuffers {
    map: Option<AnonMap>,
    slot: usize,
}

impl TagBuffers {
    pub(crate) fn new(depth: u16, slot_bytes: u32) -> Result<TagBuffers> {
        let slot = sys::round_up(slot_bytes as usize, page_size());
        let map = AnonMap::new(slot * depth as usize)?;
        Ok(TagBuffers { map: Some(map), slot })
    }

    /// No buffers (zero-copy modes: the data stays in the request).
    pub(crate) fn none() -> TagBuffers {
        TagBuffers { map: None, slot: 0 }
    }

    pub(crate) fn get(&self, tag: u16) -> *mut u8 {
        match &self.map {
            // SAFETY: tag < depth is checked by the queue before use, so the
            // offset stays inside the mapping.
            Some(m) => unsafe { m.ptr().add(tag as usize * self.slot) },
            None => std::ptr::null_mut(),
        }
    }
}

/// The read-only mapping of one queue's `ublksrv_io_desc` array.
pub(crate) struct DescArray {
    ptr: *const sys::ublksrv_io_desc,
    len: usize,
    depth: u16,
}

impl DescArray {
    pub(crate) fn map(char_fd: RawFd, q_id: u16, depth: u16) -> Result<DescArray> {
        let ps = page_size();
        let len = sys::round_up(depth as usize * std::mem::size_of::<sys::ublksrv_io_desc>(), ps);
        let off = sys::UBLKSRV_CMD_BUF_OFFSET as usize + q_id as usize * sys::desc_queue_stride(ps);
        // SAFETY: maps the kernel's descriptor array read-only and shared; the
        // length and offset follow the driver's rules.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE, char_fd, off as libc::off_t) };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(format!("cannot mmap the descriptors of queue {q_id}")));
        }
        Ok(DescArray { ptr: p as *const sys::ublksrv_io_desc, len, depth })
    }

    /// The descriptor of `tag`, read after its FETCH/COMMIT completed.
    pub(crate) fn get(&self, tag: u16) -> sys::ublksrv_io_desc {
        assert!(tag < self.depth);
        // SAFETY: tag < depth, inside the mapping; the kernel wrote it before
        // completing the command whose CQE we just reaped.
        unsafe { std::ptr::read_volatile(self.ptr.add(tag as usize)) }
    }
}

impl Drop for DescArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
