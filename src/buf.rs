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
    /// The slots are sized for the largest IO but most IOs use the first
    /// pages of theirs; the mapping asks for small pages so that only the
    /// pages IOs touch become resident (with huge pages a queue of depth 64
    /// and 512 KiB IOs holds 32 MiB after a few 4 KiB IOs; libublk-rs and
    /// ublksrv get small pages from their per-tag allocations too).
    pub(crate) fn new(depth: u16, slot_bytes: u32) -> Result<TagBuffers> {
        let slot = sys::round_up(slot_bytes as usize, page_size());
        let map = AnonMap::new(slot * depth as usize)?;
        map.no_huge_pages();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of field `key` of the mapping that starts at `addr` in
    /// /proc/self/smaps.
    fn smaps_field(addr: usize, key: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = usize::from_str_radix(start, 16) {
                        inside = start == addr;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix(key) {
                    return v.trim().to_string();
                }
            }
        }
        panic!("no {key} of a mapping at {addr:#x} in /proc/self/smaps");
    }

    fn vm_flags(addr: usize) -> String {
        smaps_field(addr, "VmFlags:")
    }

    #[test]
    fn tag_buffers_ask_for_small_pages() {
        let bufs = TagBuffers::new(64, 512 << 10).unwrap();
        let flags = vm_flags(bufs.get(0) as usize);
        assert!(flags.split(' ').any(|f| f == "nh"), "tag buffers without MADV_NOHUGEPAGE: VmFlags {flags}");
        // A 4 KiB IO in every slot makes 64 pages resident, not 32 MiB.
        for tag in 0..64 {
            // SAFETY: tag < depth: inside the mapping, no one else uses it.
            unsafe { bufs.get(tag).write_bytes(0xa5, 4096) };
        }
        let rss_kb: usize = smaps_field(bufs.get(0) as usize, "Rss:").trim_end_matches("kB").trim().parse().unwrap();
        assert!(rss_kb <= 64 * page_size() / 1024, "64 touched pages made {rss_kb} KiB resident");
        let plain = AnonMap::new(4096).unwrap();
        assert!(!vm_flags(plain.ptr() as usize).split(' ').any(|f| f == "nh"), "only tag buffers get the advice");
    }

    #[test]
    fn tag_slots_are_page_aligned_and_apart() {
        let bufs = TagBuffers::new(4, 1000).unwrap();
        let ps = page_size();
        assert_eq!(bufs.get(0) as usize % ps, 0);
        assert_eq!(bufs.get(1) as usize - bufs.get(0) as usize, ps);
        assert!(TagBuffers::none().get(3).is_null());
    }
}
