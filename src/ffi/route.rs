//! C ABI: the device's route table (`ublk_dev_map` / `ublk_dev_unmap`).
//!
//! A target may tell the engine once where ranges of the device live: "bytes
//! [off, off + len) of the device are bytes [file_off, ...) of fd". READ and
//! WRITE requests that fall entirely inside one mapped extent (of the right
//! direction) are then lent whole to IO on that fd by the queue thread, like
//! a batch entry's `lease_fd`, without any callback: the target decides (the
//! table), the engine moves the data. Everything else reaches the target as
//! before. This is how a binding whose every call across the C boundary
//! costs (Python, Go) serves a loop, a linear or a thinly provisioned device
//! (map what is allocated, get the rest) at the engine's speed.
//!
//! The table is shared by the queues: changes take effect for the requests
//! a queue starts after the call returns (requests already lent keep their
//! fd and offset).

use super::guard;
use crate::error::{Error, Result};
use parking_lot::RwLock;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `ublk_dev_map` flags: READ requests in the extent are served from the fd.
pub const UBLK_MAP_READ: u32 = 1;
/// WRITE requests in the extent go to the fd (FUA becomes RWF_DSYNC).
pub const UBLK_MAP_WRITE: u32 = 2;

/// Most extents one device's table holds.
pub(crate) const MAX_EXTENTS: usize = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub start: u64,
    pub len: u64,
    pub fd: RawFd,
    pub file_off: u64,
    pub flags: u32,
}

impl Extent {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The part of `self` in [from, to), its file offset moved along.
    fn clip(&self, from: u64, to: u64) -> Option<Extent> {
        let (s, e) = (self.start.max(from), self.end().min(to));
        (s < e).then(|| Extent { start: s, len: e - s, file_off: self.file_off + (s - self.start), ..*self })
    }
}

/// Sorted, non-overlapping extents.
#[derive(Debug, Default, Clone)]
pub(crate) struct Table {
    pub extents: Vec<Extent>,
}

impl Table {
    /// The extents with [off, end) cut out (those that straddle it split).
    fn without(&self, off: u64, end: u64) -> Vec<Extent> {
        let mut out = Vec::with_capacity(self.extents.len() + 2);
        for e in &self.extents {
            if e.end() <= off || e.start >= end {
                out.push(*e);
                continue;
            }
            out.extend(e.clip(e.start, off));
            out.extend(e.clip(end, e.end()));
        }
        out
    }

    /// Removes [off, off + len) from every extent (splitting those that
    /// straddle it).
    pub fn unmap(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len);
        if self.extents.iter().any(|e| e.start < end && e.end() > off) {
            self.extents = self.without(off, end);
        }
    }

    /// Maps `x`, replacing whatever overlapped it (a refused map changes nothing).
    pub fn map(&mut self, x: Extent) -> Result<()> {
        let mut out = self.without(x.start, x.end());
        let at = out.partition_point(|e| e.start < x.start);
        out.insert(at, x);
        if out.len() > MAX_EXTENTS {
            return Err(Error::new(libc::ENOSPC, format!("the route table holds at most {MAX_EXTENTS} extents")));
        }
        self.extents = out;
        Ok(())
    }

    /// Where a request of `len` bytes at `off` goes: `(fd, file offset)` when
    /// one extent with `need` in its flags holds all of it.
    pub fn lookup(&self, off: u64, len: u32, need: u32) -> Option<(RawFd, u64)> {
        let i = self.extents.partition_point(|e| e.start <= off).checked_sub(1)?;
        let e = &self.extents[i];
        (e.flags & need != 0 && off + len as u64 <= e.end()).then(|| (e.fd, e.file_off + (off - e.start)))
    }
}

/// A device's table as its queues read it: a snapshot per change, and a
/// generation number they compare per request (one atomic load) to know
/// when to take a new snapshot.
#[derive(Default)]
pub(crate) struct Routes {
    table: RwLock<Arc<Table>>,
    gen: AtomicU64,
}

impl Routes {
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// The current table and its generation.
    pub fn snapshot(&self) -> (u64, Arc<Table>) {
        let t = self.table.read();
        (self.gen.load(Ordering::Acquire), t.clone())
    }

    fn change(&self, f: impl FnOnce(&mut Table) -> Result<()>) -> Result<()> {
        let mut g = self.table.write();
        let mut t = (**g).clone();
        f(&mut t)?;
        *g = Arc::new(t);
        self.gen.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// A queue's view of the table: its snapshot, and the fds it put in its
/// ring's file table for the extents.
#[derive(Default)]
pub(crate) struct QueueRoutes {
    gen: u64,
    table: Arc<Table>,
    pub registered: Vec<RawFd>,
}

impl QueueRoutes {
    /// Takes a new snapshot if the table changed; then gives every fd this
    /// queue registered for the old table, to unregister. Once the table
    /// changed, a registered fd number may name another file: the caller may
    /// close an unmapped fd and open another file at the same number, then
    /// map that, and a registration kept by number would send its requests
    /// to the closed file. So registrations start over after each change
    /// (the fds still mapped are registered again by their next request).
    pub fn refresh(&mut self, routes: &Routes) -> Vec<RawFd> {
        if routes.generation() == self.gen {
            return Vec::new();
        }
        let (gen, table) = routes.snapshot();
        self.gen = gen;
        self.table = table;
        std::mem::take(&mut self.registered)
    }

    /// Nothing is mapped in this queue's snapshot.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.table.extents.is_empty()
    }

    pub fn lookup(&self, off: u64, len: u32, need: u32) -> Option<(RawFd, u64)> {
        if self.table.extents.is_empty() {
            return None;
        }
        self.table.lookup(off, len, need)
    }
}

fn check_range(dev: &super::device::ublk_dev, off: u64, len: u64) -> Result<()> {
    let (size, lbs) = dev.size_and_block();
    if len == 0 || off % lbs as u64 != 0 || len % lbs as u64 != 0 {
        return Err(Error::inval(format!("range {off}+{len}: empty or not a multiple of the {lbs}-byte logical block")));
    }
    if off.checked_add(len).map_or(true, |e| e > size) {
        return Err(Error::inval(format!("range {off}+{len} goes past the end of the {size}-byte device")));
    }
    Ok(())
}

/// Routes READ (`UBLK_MAP_READ`) and/or WRITE (`UBLK_MAP_WRITE`) requests
/// that fall entirely inside device bytes [`offset`, `offset + len`) to IO on
/// `fd` at `file_offset + (request offset - offset)`: the queue thread lends
/// the request's buffer to that IO (zero copy where the data mode allows)
/// and completes the request when it is over, without calling the target.
/// A request that is not inside one extent, or of another op, reaches the
/// target as usual. A new extent replaces the parts of older ones it
/// overlaps. Any thread, any time after `ublk_dev_new`; requests a queue
/// starts after the call see the change.
///
/// `offset` and `len` are multiples of the logical block size inside the
/// device. `fd` is borrowed: keep it open until it is unmapped and the
/// requests using it completed (a closed fd fails them with EBADF; each
/// queue keeps the file in its ring's file table while an extent uses it).
///
/// Returns 0, or -EINVAL (NULL dev, bad range, flags not a non-empty
/// combination of UBLK_MAP_READ | UBLK_MAP_WRITE), -EBADF (fd < 0), -ENOSPC (65536 extents),
/// -EOPNOTSUPP (a device with a built-in target, e.g. `ublk_nbd_dev_new`:
/// it moves its own data and has no route table).
#[no_mangle]
pub extern "C" fn ublk_dev_map(dev: *mut super::device::ublk_dev, offset: u64, len: u64, fd: i32, file_offset: u64, flags: u32) -> i32 {
    guard(|| {
        let d = super::device::dev_ref(dev)?;
        no_builtin(d, "ublk_dev_map")?;
        check_range(d, offset, len)?;
        if fd < 0 {
            return Err(Error::new(libc::EBADF, format!("ublk_dev_map: bad fd {fd}")));
        }
        if flags == 0 || flags & !(UBLK_MAP_READ | UBLK_MAP_WRITE) != 0 {
            return Err(Error::inval(format!("ublk_dev_map: flags {flags:#x}: want UBLK_MAP_READ and/or UBLK_MAP_WRITE")));
        }
        if file_offset.checked_add(len).is_none() {
            return Err(Error::inval("ublk_dev_map: file_offset + len overflows"));
        }
        let x = Extent { start: offset, len, fd, file_off: file_offset, flags };
        d.routes().change(|t| t.map(x))?;
        Ok(0)
    })
}

/// Removes device bytes [`offset`, `offset + len`) from the route table:
/// requests there reach the target again (those already lent finish on
/// their fd). Unmapping what is not mapped is not an error. Any thread.
/// Returns 0, or -EINVAL (NULL dev, bad range as in `ublk_dev_map`),
/// -EOPNOTSUPP (a built-in target, as in `ublk_dev_map`).
#[no_mangle]
pub extern "C" fn ublk_dev_unmap(dev: *mut super::device::ublk_dev, offset: u64, len: u64) -> i32 {
    guard(|| {
        let d = super::device::dev_ref(dev)?;
        no_builtin(d, "ublk_dev_unmap")?;
        check_range(d, offset, len)?;
        d.routes().change(|t| {
            t.unmap(offset, len);
            Ok(())
        })?;
        Ok(0)
    })
}

fn no_builtin(d: &super::device::ublk_dev, what: &str) -> Result<()> {
    if d.is_builtin() {
        return Err(Error::new(libc::EOPNOTSUPP, format!("{what}: the device has a built-in target ({}), which has no route table", d.target_name())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(start: u64, len: u64, fd: RawFd, file_off: u64) -> Extent {
        Extent { start, len, fd, file_off, flags: UBLK_MAP_READ | UBLK_MAP_WRITE }
    }

    #[test]
    fn map_lookup_split() {
        let mut t = Table::default();
        t.map(x(0, 1 << 20, 3, 4096)).unwrap();
        assert_eq!(t.lookup(0, 4096, UBLK_MAP_READ), Some((3, 4096)));
        assert_eq!(t.lookup(8192, 4096, UBLK_MAP_WRITE), Some((3, 12288)));
        assert_eq!(t.lookup((1 << 20) - 4096, 8192, UBLK_MAP_READ), None, "past the extent");
        // overlay in the middle: three pieces, offsets kept
        t.map(x(65536, 65536, 4, 0)).unwrap();
        assert_eq!(t.extents.len(), 3);
        assert_eq!(t.lookup(65536 + 512, 512, UBLK_MAP_READ), Some((4, 512)));
        assert_eq!(t.lookup(131072, 4096, UBLK_MAP_READ), Some((3, 4096 + 131072)));
        assert_eq!(t.lookup(61440, 8192, UBLK_MAP_READ), None, "straddles two extents");
        t.unmap(0, 65536);
        assert_eq!(t.lookup(0, 512, UBLK_MAP_READ), None);
        assert_eq!(t.extents.len(), 2);
        assert!(t.extents.windows(2).all(|w| w[0].end() <= w[1].start));
        t.unmap(0, u64::MAX);
        assert!(t.extents.is_empty());
    }

    #[test]
    fn direction_and_limits() {
        let mut t = Table::default();
        t.map(Extent { flags: UBLK_MAP_READ, ..x(0, 4096, 5, 0) }).unwrap();
        assert_eq!(t.lookup(0, 4096, UBLK_MAP_READ), Some((5, 0)));
        assert_eq!(t.lookup(0, 4096, UBLK_MAP_WRITE), None, "read-only extent");
        let mut t = Table::default();
        for i in 0..MAX_EXTENTS as u64 {
            t.extents.push(x(i * 1024, 512, 3, 0));
        }
        let before = t.extents.len();
        assert_eq!(t.map(x(u64::MAX / 2, 512, 3, 0)).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(t.extents.len(), before, "a refused map changes nothing");
    }

    #[test]
    fn queue_refresh_reports_stale_fds() {
        let r = Routes::default();
        let mut q = QueueRoutes::default();
        r.change(|t| t.map(x(0, 4096, 7, 0))).unwrap();
        assert!(q.refresh(&r).is_empty());
        q.registered.push(7);
        assert_eq!(q.lookup(0, 512, UBLK_MAP_READ), Some((7, 0)));
        r.change(|t| {
            t.unmap(0, 4096);
            Ok(())
        })
        .unwrap();
        assert_eq!(q.refresh(&r), vec![7]);
        assert!(q.registered.is_empty());
        assert_eq!(q.lookup(0, 512, UBLK_MAP_READ), None);
    }

    #[test]
    fn queue_refresh_drops_fds_still_mapped() {
        // fd 7 unmapped, closed, another file opened at 7 and mapped: the
        // registration of the old file must not survive the change
        let r = Routes::default();
        let mut q = QueueRoutes::default();
        r.change(|t| t.map(x(0, 4096, 7, 0))).unwrap();
        assert!(q.refresh(&r).is_empty());
        q.registered.push(7);
        r.change(|t| {
            t.unmap(0, 4096);
            t.map(x(0, 4096, 7, 0))
        })
        .unwrap();
        assert_eq!(q.refresh(&r), vec![7]);
        assert!(q.registered.is_empty());
        assert_eq!(q.lookup(0, 512, UBLK_MAP_READ), Some((7, 0)));
        assert!(q.refresh(&r).is_empty(), "no change, nothing to drop");
    }
}
