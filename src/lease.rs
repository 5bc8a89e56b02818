//! Leases: a request's buffer lent to IO on backing files and sockets.
//!
//! The rules, enforced here before the kernel is asked:
//! 1. direction: a READ request's buffer is only filled (`read_into`, `recv`),
//!    a WRITE request's buffer is only a source (`write_from`, `send`); else EPERM;
//! 2. lifetime: the request is committed only once every lease operation on it
//!    has finished (an earlier completion waits, see `QueueCore::commit`);
//! 3. sub-buffers: any range inside the request, any number of operations in
//!    flight at once, no link chains;
//! 4. short reads: a file read that ends early leaves zeroes in the rest of its
//!    range (a socket that closes early fails the operation).
//!
//! How the bytes move depends on the data mode: fixed-buffer READ/WRITE against
//! the request's registered buffer (auto-buf-reg, register), or plain IO on the
//! per-tag buffer (copy; user-copy also moves it through `/dev/ublkcN`).

use crate::error::{Error, Result};
use crate::io::{Op, PHASE_TARGET};
use crate::mode::DataMode;
use crate::queue::{QueueCore, QueueCtx};
use crate::slab::Slab;
use crate::sys;
use io_uring::{opcode, squeue, types};
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

/// What a lease operation does with its range of the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ReadInto,
    WriteFrom,
    Send,
    Recv,
}

impl Kind {
    /// Fills the buffer (allowed on READ requests only).
    fn fills(self) -> bool {
        matches!(self, Kind::ReadInto | Kind::Recv)
    }
    fn stream(self) -> bool {
        matches!(self, Kind::Send | Kind::Recv)
    }
    fn name(self) -> &'static str {
        match self {
            Kind::ReadInto => "read_into",
            Kind::WriteFrom => "write_from",
            Kind::Send => "send",
            Kind::Recv => "recv",
        }
    }
}

/// Lease bookkeeping of one tag, reset when its request is committed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LeaseState {
    /// Lease SQEs on the ring.
    pub(crate) inflight: u32,
    /// First error of the finished operations (0: none).
    err: i32,
    /// First error of an operation that finished after the target completed
    /// the request (`pending`): it fails the request whatever the target said,
    /// which it gave without knowing that operation's outcome.
    late_err: i32,
    /// Any operation was submitted for the current request.
    used: bool,
    /// The target completes the request itself (no aggregate completion).
    pub(crate) manual: bool,
    /// The engine registered the buffer (REGISTER_IO_BUF) and unregisters it.
    registered: bool,
    /// user-copy: the WRITE request's data is in the bounce buffer.
    staged: bool,
    /// auto-buf-reg: the kernel could not register this request's buffer.
    pub(crate) need_reg: bool,
    /// A completion that waits for the operations in flight.
    pub(crate) pending: Option<i32>,
}

impl LeaseState {
    /// Records an operation's failure.
    fn failed(&mut self, err: i32) {
        if self.err == 0 {
            self.err = err;
        }
        if self.pending.is_some() && self.late_err == 0 {
            self.late_err = err;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseOp {
    tag: u16,
    kind: Kind,
    fd: RawFd,
    file_off: u64,
    buf_off: u32,
    len: u32,
    /// Bytes moved so far (short transfers are continued).
    done: u32,
    rw_flags: i32,
    data: u32,
    /// The SQE in flight zero-fills the rest after a short read.
    zero_fill: bool,
}

/// Lease state of a queue: per tag, and the operations in flight (their slab
/// key is the `data` of their user_data).
pub(crate) struct Leases {
    pub(crate) state: Vec<LeaseState>,
    ops: Slab<LeaseOp>,
    /// Per tag, the ranges of the request buffer the finished operations
    /// moved in full (the automatic result is the part from byte 0 they
    /// cover without a gap; emptied, not freed, at each commit).
    done: Vec<Vec<Range<u32>>>,
}

impl Leases {
    pub(crate) fn new(depth: u16) -> Leases {
        Leases { state: vec![LeaseState::default(); depth as usize], ops: Slab::default(), done: vec![Vec::new(); depth as usize] }
    }

    /// The automatic result of a request of `len` bytes: the bytes from its
    /// start that finished operations moved with no gap. The kernel takes a
    /// result n as "bytes [0, n) are done", so operations that overlap, or
    /// leave a hole before the last one, must not count as more than that
    /// (a hole in a READ would reach the reader as whatever the buffer held).
    fn covered(&mut self, tag: u16, len: u32) -> u32 {
        let d = &mut self.done[tag as usize];
        d.sort_unstable_by_key(|r| r.start);
        let mut end = 0;
        for r in d.iter() {
            if r.start > end {
                break;
            }
            end = end.max(r.end);
        }
        end.min(len)
    }
}

/// The lease of one request, from [`QueueCtx::lease`]. Each operation's
/// completion goes to [`crate::Target::lease_done`] with the `data` given;
/// when the last one finishes and the target has not completed the request,
/// the engine completes it with the first error, or else the bytes the
/// operations moved from the start of the buffer without a gap (unless
/// [`Lease::complete_manually`] was called, or the request was deferred).
pub struct Lease<'c, 'q> {
    ctx: &'c mut QueueCtx<'q>,
    tag: u16,
}

impl<'q> QueueCtx<'q> {
    /// The lease of the request `tag` carries (only while the target owns it).
    pub fn lease<'c>(&'c mut self, tag: u16) -> Lease<'c, 'q> {
        Lease { ctx: self, tag }
    }
}

impl Lease<'_, '_> {
    /// Fills `range` of a READ request's buffer from `fd` at `file_off`.
    /// A read that ends early (end of file) leaves zeroes in the rest.
    pub fn read_into(&mut self, fd: RawFd, file_off: u64, range: Range<u32>, data: u32) -> Result<()> {
        self.ctx.core.lease_op(self.tag, Kind::ReadInto, fd, file_off, range, data)
    }

    /// Writes `range` of a WRITE request's buffer to `fd` at `file_off`
    /// (with RWF_DSYNC when the request has FUA).
    pub fn write_from(&mut self, fd: RawFd, file_off: u64, range: Range<u32>, data: u32) -> Result<()> {
        self.ctx.core.lease_op(self.tag, Kind::WriteFrom, fd, file_off, range, data)
    }

    /// Sends `range` of a WRITE request's buffer on the stream socket `sock`
    /// (all of it: short sends are continued). A closed peer fails it with
    /// EPIPE (queue threads block SIGPIPE).
    pub fn send(&mut self, sock: RawFd, range: Range<u32>, data: u32) -> Result<()> {
        self.ctx.core.lease_op(self.tag, Kind::Send, sock, 0, range, data)
    }

    /// Receives exactly `range.len()` bytes from the stream socket `sock` into
    /// a READ request's buffer; the peer closing first fails with ECONNRESET.
    pub fn recv(&mut self, sock: RawFd, range: Range<u32>, data: u32) -> Result<()> {
        self.ctx.core.lease_op(self.tag, Kind::Recv, sock, 0, range, data)
    }

    /// The target completes the request itself (`QueueCtx::complete`), for
    /// instance after retrying a failed operation; the engine then still
    /// holds the completion back until every lease operation has finished
    /// (and fails the request if one finishing after it fails).
    pub fn complete_manually(&mut self) -> Result<()> {
        self.ctx.core.lease_check_owned(self.tag)?;
        self.ctx.core.leases.state[self.tag as usize].manual = true;
        Ok(())
    }

    /// Lease operations of this request still in flight.
    pub fn in_flight(&self) -> u32 {
        self.ctx.core.leases.state.get(self.tag as usize).map_or(0, |s| s.inflight)
    }
}

fn pread_exact(fd: RawFd, buf: *mut u8, len: usize, off: u64, write: bool) -> Result<()> {
    // SAFETY: buf points at `len` bytes of a tag buffer the queue thread owns
    // for this request.
    let n = unsafe {
        if write {
            libc::pwrite(fd, buf as *const libc::c_void, len, off as libc::off_t)
        } else {
            libc::pread(fd, buf as *mut libc::c_void, len, off as libc::off_t)
        }
    };
    if n < 0 {
        return Err(Error::last_os("user copy on the ublk char device failed"));
    }
    if n as usize != len {
        return Err(Error::new(libc::EIO, format!("user copy moved {n} of {len} bytes")));
    }
    Ok(())
}

impl QueueCore {
    /// The tag's request is owned by the target and not yet completed.
    fn lease_check_owned(&self, tag: u16) -> Result<()> {
        let l = self.local.get(tag as usize).ok_or_else(|| Error::inval(format!("tag {tag} out of range")))?;
        let cur = self.shared.tags[tag as usize].load(Ordering::Acquire);
        if cur != (l.seq << 2 | PHASE_TARGET) || self.leases.state[tag as usize].pending.is_some() {
            return Err(Error::new(libc::EALREADY, format!("request of tag {tag} is already completed: its buffer cannot be leased")));
        }
        Ok(())
    }

    fn lease_op(&mut self, tag: u16, kind: Kind, fd: RawFd, file_off: u64, range: Range<u32>, data: u32) -> Result<()> {
        self.lease_check_owned(tag)?;
        let l = self.local[tag as usize];
        if !l.op.has_data() {
            return Err(Error::inval(format!("{}: a {:?} request has no data buffer", kind.name(), l.op)));
        }
        if kind.fills() != (l.op == Op::Read) {
            let why = if kind.fills() { "a WRITE request's buffer is a data source only" } else { "a READ request's buffer is a destination only" };
            return Err(Error::new(libc::EPERM, format!("{}: {why}", kind.name())));
        }
        if range.start >= range.end || range.end > l.len {
            return Err(Error::inval(format!("{}: range {}..{} is empty or outside the {}-byte request", kind.name(), range.start, range.end, l.len)));
        }
        if fd < 0 {
            return Err(Error::new(libc::EBADF, format!("{}: bad fd {fd}", kind.name())));
        }
        let len = range.end - range.start;
        // (io_uring reads an offset of -1 as "the file position")
        if !kind.stream() && file_off.checked_add(len as u64).map_or(true, |e| e > i64::MAX as u64) {
            return Err(Error::inval(format!("{}: file offset {file_off} + {len} is past the largest file offset", kind.name())));
        }
        self.lease_prepare(tag, l.op)?;
        let rw_flags = if kind == Kind::WriteFrom && l.flags.fua() { libc::RWF_DSYNC } else { 0 };
        let op = LeaseOp { tag, kind, fd, file_off, buf_off: range.start, len, done: 0, rw_flags, data, zero_fill: false };
        let idx = self.leases.ops.insert(op);
        let st = &mut self.leases.state[tag as usize];
        st.used = true;
        if let Err(e) = self.push_lease(idx) {
            self.leases.ops.take(idx);
            return Err(e);
        }
        self.shared.stats.lease_op();
        Ok(())
    }

    /// Before the first operation of a request: register its buffer (register
    /// mode, or an auto-buf-reg request the kernel could not register), or
    /// fetch a WRITE request's data into the bounce buffer (user copy).
    fn lease_prepare(&mut self, tag: u16, op: Op) -> Result<()> {
        let st = self.leases.state[tag as usize];
        match self.mode {
            DataMode::Register | DataMode::AutoBufReg if !st.registered && (self.mode == DataMode::Register || st.need_reg) => {
                if self.flags & sys::UBLK_F_SUPPORT_ZERO_COPY == 0 {
                    return Err(Error::new(libc::EIO, format!("the kernel could not register the buffer of tag {tag}")));
                }
                self.buf_cmd(sys::UBLK_U_IO_REGISTER_IO_BUF, tag)?;
                self.leases.state[tag as usize].registered = true;
            }
            DataMode::UserCopy if op == Op::Write && !st.staged => {
                let len = self.local[tag as usize].len;
                pread_exact(self.char_fd, self.bufs.get(tag), len as usize, sys::user_copy_offset(self.info.queue_id, tag), false)?;
                self.shared.stats.copied(len as u64);
                self.leases.state[tag as usize].staged = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// REGISTER_IO_BUF / UNREGISTER_IO_BUF of `tag`'s request at index `tag`.
    /// Only failures post a CQE (they are issued before the operations that
    /// follow them in the SQ, so those see the registration).
    fn buf_cmd(&mut self, cmd_op: u32, tag: u16) -> Result<()> {
        let cmd = sys::ublksrv_io_cmd { q_id: self.info.queue_id, tag, result: 0, addr: tag as u64 };
        let mut raw = [0u8; 16];
        // SAFETY: ublksrv_io_cmd is 16 bytes of plain data.
        unsafe { std::ptr::write_unaligned(raw.as_mut_ptr() as *mut sys::ublksrv_io_cmd, cmd) };
        let e =
            self.char_cmd(cmd_op, raw).build().flags(squeue::Flags::SKIP_SUCCESS).user_data(crate::queue::user_data(crate::queue::KIND_BUFCMD, tag, cmd_op));
        self.push(e)
    }

    /// A failed REGISTER/UNREGISTER (successes post nothing).
    pub(crate) fn buf_cmd_failed(&mut self, tag: u16, cmd_op: u32, res: i32) {
        if cmd_op == sys::UBLK_U_IO_REGISTER_IO_BUF {
            if let Some(st) = self.leases.state.get_mut(tag as usize) {
                st.registered = false;
            }
        } else {
            eprintln!("ublk: queue {} tag {tag}: unregistering the request buffer failed: {}", self.info.queue_id, Error::new(-res, ""));
        }
    }

    fn push_lease(&mut self, idx: u32) -> Result<()> {
        let op = *self.leases.ops.get_mut(idx).ok_or_else(|| Error::inval(format!("no lease operation {idx}")))?;
        let off = op.buf_off + op.done;
        let len = op.len - op.done;
        let file_off = if op.kind.stream() { u64::MAX } else { op.file_off + op.done as u64 };
        let ud = crate::queue::user_data(crate::queue::KIND_LEASE, op.tag, idx);
        let tag = op.tag;
        let e = if self.mode.is_zero_copy() {
            // the registered buffer's addresses are offsets into the request
            let addr = off as usize as *mut u8;
            if op.zero_fill {
                let zfd = self.zero_fd.as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
                opcode::ReadFixed::new(types::Fd(zfd), addr, len, tag).offset(0).build()
            } else if op.kind.fills() {
                on_fd!(self, op.fd, |f| opcode::ReadFixed::new(f, addr, len, tag).offset(file_off).build())
            } else {
                on_fd!(self, op.fd, |f| opcode::WriteFixed::new(f, addr, len, tag).offset(file_off).rw_flags(op.rw_flags).build())
            }
        } else {
            // SAFETY: off + len <= request length <= the tag's buffer size.
            let p = unsafe { self.bufs.get(tag).add(off as usize) };
            match op.kind {
                Kind::ReadInto => on_fd!(self, op.fd, |f| opcode::Read::new(f, p, len).offset(file_off).build()),
                Kind::WriteFrom => on_fd!(self, op.fd, |f| opcode::Write::new(f, p, len).offset(file_off).rw_flags(op.rw_flags).build()),
                Kind::Recv => on_fd!(self, op.fd, |f| opcode::Recv::new(f, p, len).build()),
                Kind::Send => on_fd!(self, op.fd, |f| opcode::Send::new(f, p, len).flags(libc::MSG_NOSIGNAL).build()),
            }
        };
        // Fan-out: while another operation of the same request is in flight
        // (a mirror's second leg, a stripe's next piece), this one goes to an
        // io-wq worker (IOSQE_ASYNC) instead of being issued inline by this
        // thread after the first: the copies into the page cache (tmpfs,
        // buffered files) then run in parallel.
        let e = if self.leases.state[tag as usize].inflight > 0 { e.flags(squeue::Flags::ASYNC) } else { e };
        self.push(e.user_data(ud))?;
        self.leases.state[tag as usize].inflight += 1;
        self.backing_inflight += 1;
        Ok(())
    }

    /// A lease CQE. Continues short transfers (and zero-fills after a short
    /// read); once the operation is over, gives `(tag, data, result)` for the
    /// target's `lease_done` (the result is the whole range's length on success).
    pub(crate) fn lease_cqe(&mut self, idx: u32, res: i32) -> Option<(u16, u32, i32)> {
        let op = self.leases.ops.get_mut(idx)?;
        let tag = op.tag;
        self.leases.state[tag as usize].inflight -= 1;
        let remaining = op.len - op.done;
        let fin = if res < 0 {
            res
        } else if res as u32 >= remaining {
            op.len as i32
        } else if res > 0 {
            op.done += res as u32;
            return self.lease_continue(idx);
        } else if op.zero_fill || op.kind == Kind::WriteFrom || op.kind == Kind::Send {
            -libc::EIO
        } else if op.kind == Kind::Recv {
            -libc::ECONNRESET
        } else {
            // end of file: the rest of the range reads as zeroes
            if self.mode.is_zero_copy() {
                op.zero_fill = true;
                return self.lease_continue(idx);
            }
            // SAFETY: the unfilled rest of the op's range, inside the tag buffer.
            unsafe { std::ptr::write_bytes(self.bufs.get(tag).add((op.buf_off + op.done) as usize), 0, remaining as usize) };
            op.len as i32
        };
        let (data, range) = (op.data, op.buf_off..op.buf_off + op.len);
        self.leases.ops.take(idx);
        if fin < 0 {
            self.leases.state[tag as usize].failed(fin);
        } else {
            self.leases.done[tag as usize].push(range);
        }
        Some((tag, data, fin))
    }

    fn lease_continue(&mut self, idx: u32) -> Option<(u16, u32, i32)> {
        match self.push_lease(idx) {
            Ok(()) => None,
            Err(e) => {
                let op = self.leases.ops.take(idx)?;
                self.leases.state[op.tag as usize].failed(e.neg_errno());
                Some((op.tag, op.data, e.neg_errno()))
            }
        }
    }

    /// After a lease operation finished (and the target saw it): commits the
    /// request once nothing is in flight, with the completion the target gave
    /// (unless an operation failed after it: then with that error), or,
    /// without one, with the bytes covered from the start or the first error.
    pub(crate) fn lease_settle(&mut self, tag: u16) {
        let st = self.leases.state[tag as usize];
        if st.inflight > 0 {
            return;
        }
        if let Some(res) = st.pending {
            self.commit(tag, if res >= 0 && st.late_err < 0 { st.late_err } else { res });
        } else if st.used && !st.manual {
            let l = self.local[tag as usize];
            let res = if st.err < 0 { st.err } else { self.leases.covered(tag, l.len) as i32 };
            if let Ok((res, _)) = self.shared.claim_result(l.op, l.len, tag, l.seq, res) {
                self.commit(tag, res);
            }
        }
    }

    /// Called by `commit` once no lease operation is in flight: copies a READ
    /// out (user copy), unregisters a buffer the engine registered, resets the
    /// lease. Gives the result to commit.
    pub(crate) fn lease_release(&mut self, tag: u16, res: i32) -> i32 {
        let st = std::mem::take(&mut self.leases.state[tag as usize]);
        self.leases.done[tag as usize].clear();
        let mut res = res;
        if st.registered {
            if let Err(e) = self.buf_cmd(sys::UBLK_U_IO_UNREGISTER_IO_BUF, tag) {
                eprintln!("ublk: queue {} tag {tag}: {e}", self.info.queue_id);
            }
        }
        if self.mode == DataMode::UserCopy && st.used && res > 0 && self.local[tag as usize].op == Op::Read {
            match pread_exact(self.char_fd, self.bufs.get(tag), res as usize, sys::user_copy_offset(self.info.queue_id, tag), true) {
                Ok(()) => self.shared.stats.copied(res as u64),
                Err(e) => {
                    eprintln!("ublk: queue {} tag {tag}: {e}", self.info.queue_id);
                    res = -libc::EIO;
                }
            }
        }
        res
    }
}
