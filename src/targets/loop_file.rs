//! `loop`: serves a file or a block device. Reads and writes go on the queue
//! ring (O_DIRECT when the backing accepts aligned direct IO), FLUSH is
//! fdatasync, FUA writes are RWF_DSYNC, DISCARD punches a hole and
//! WRITE_ZEROES zeroes the range (punching a hole where zero-range is missing).

use crate::error::{Error, Result};
use crate::io::{Io, Op};
use crate::queue::QueueCtx;
use crate::target::Target;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

// user data of backing ops
const WZ_ZERO_RANGE: u32 = 1;

/// The backing file of a loop device, shared by its queues.
pub struct LoopBacking {
    file: File,
    size: u64,
    direct: bool,
    block_size: u32,
    zero_range: AtomicBool,
}

impl LoopBacking {
    /// Opens `path` (a regular file or a block device), preferring O_DIRECT.
    pub fn open(path: &Path, read_only: bool) -> Result<Arc<LoopBacking>> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = open(false).map_err(|e| Error::from_io(e, format!("cannot open backing file {}", path.display())))?;
        let meta = file.metadata().map_err(|e| Error::from_io(e, format!("cannot stat {}", path.display())))?;
        let is_blk = meta.file_type().is_block_device();
        if !is_blk && !meta.is_file() {
            return Err(Error::inval(format!("{} is neither a regular file nor a block device", path.display())));
        }
        let (size, mut block_size) = if is_blk {
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 512;
            // SAFETY: both ioctls write one integer of the given type.
            unsafe {
                if libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) < 0 {
                    return Err(Error::last_os(format!("BLKGETSIZE64 on {}", path.display())));
                }
                libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut ssz);
            }
            (size, ssz.max(512) as u32)
        } else {
            (meta.len(), 512)
        };
        // Use O_DIRECT when an aligned direct read works.
        let mut direct = None;
        if let Ok(df) = open(true) {
            let buf = crate::buf::AnonMap::new(4096)?;
            for bs in [block_size, 4096] {
                // SAFETY: reads at most bs <= 4096 bytes into a 4096-byte mapping.
                let r = unsafe { libc::pread(df.as_raw_fd(), buf.ptr() as *mut libc::c_void, bs as usize, 0) };
                if r >= 0 {
                    block_size = bs;
                    direct = Some(df);
                    break;
                }
            }
        }
        let (file, direct) = match direct {
            Some(df) => (df, true),
            None => (file, false),
        };
        Ok(Arc::new(LoopBacking { file, size, direct, block_size, zero_range: AtomicBool::new(true) }))
    }

    /// Size of the backing file or device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether IO bypasses the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The smallest block the backing accepts (the device's logical block size).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

pub struct LoopTarget {
    b: Arc<LoopBacking>,
    /// The backing fd was offered to the queue ring's file table.
    registered: bool,
}

impl LoopTarget {
    pub fn new(b: Arc<LoopBacking>) -> LoopTarget {
        LoopTarget { b, registered: false }
    }
}

impl Target for LoopTarget {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        let (fd, tag, off, len) = (self.b.fd(), io.tag(), io.offset(), io.len());
        if !self.registered {
            // once per queue; without a file table the IO works the same
            self.registered = true;
            let _ = ctx.register_fd(fd);
        }
        let r = match io.op() {
            // the request's buffer is lent to the file IO: zero copy where
            // the kernel allows; FUA becomes RWF_DSYNC, a short read zeroes
            // the rest, the request completes when the IO is done
            Op::Read => ctx.lease(tag).read_into(fd, off, 0..len, 0),
            Op::Write => ctx.lease(tag).write_from(fd, off, 0..len, 0),
            Op::Flush => ctx.fsync(tag, fd, true, 0),
            Op::Discard => ctx.fallocate(tag, fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len as u64, 0),
            Op::WriteZeroes if self.b.zero_range.load(Ordering::Relaxed) => {
                ctx.fallocate(tag, fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, off, len as u64, WZ_ZERO_RANGE)
            }
            Op::WriteZeroes => ctx.fallocate(tag, fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len as u64, 0),
            Op::Other(_) => Err(Error::new(libc::EOPNOTSUPP, "unsupported op")),
        };
        if let Err(e) = r {
            let _ = ctx.complete(tag, e.neg_errno());
        }
    }

    fn backing_complete(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        if data == WZ_ZERO_RANGE && res == -libc::EOPNOTSUPP {
            // e.g. tmpfs has no FALLOC_FL_ZERO_RANGE: a hole reads as zeroes too.
            self.b.zero_range.store(false, Ordering::Relaxed);
            if let Some((off, len)) = ctx.request_range(tag) {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                if ctx.fallocate(tag, self.b.fd(), mode, off, len as u64, 0).is_ok() {
                    return;
                }
            }
        }
        let _ = ctx.complete(tag, res);
    }
}
