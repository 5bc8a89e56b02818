//! C ABI: requests handed to the target in batches
//! (`ublk_target_ops.handle_batch`): one call for all the requests that
//! arrived in one pass over the queue ring, for bindings where each call
//! across the C boundary costs (Python, Go).

use super::io::{data_buf, desc_of, req_of, ublk_io, ublk_io_desc, NO_CB};
use crate::io::{Op, Request};
use crate::queue::QueueCtx;
use std::ffi::c_void;

/// `ublk_io_batch_entry.result` as handed over: the request is not
/// completed when `handle_batch` returns (the target completes it later, as
/// after `handle_io`, unless it sets `result` or `lease_fd`).
pub const UBLK_BATCH_PENDING: i32 = i32::MIN;

/// One request of a batch.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ublk_io_batch_entry {
    /// The request's handle, as `handle_io` would get it.
    pub io: *mut ublk_io,
    /// Its data buffer (`ublk_io_buf`): NULL for requests without data and
    /// outside UBLK_DATA_COPY.
    pub buf: *mut c_void,
    /// Op, flags, offset, length, queue id, tag (`ublk_io_get_desc`).
    pub desc: ublk_io_desc,
    /// In: UBLK_BATCH_PENDING. Set it to complete the request when
    /// `handle_batch` returns: bytes done (READ/WRITE), 0, or a negative
    /// errno (the rules of `ublk_io_complete`).
    pub result: i32,
    /// In: -1. Set it (and `lease_file_off`) to lend the whole request to IO
    /// on this fd when `handle_batch` returns: a READ is filled from the fd,
    /// a WRITE written to it (FUA becomes RWF_DSYNC), zero copy where the data
    /// mode allows; the request completes when that is over, as with
    /// `ublk_io_lease_read` / `_write` of its whole range without a callback.
    /// Leave `result` at UBLK_BATCH_PENDING then. The fd must stay open until
    /// the request completes.
    pub lease_fd: i32,
    /// File offset of the lease of `lease_fd`.
    pub lease_file_off: u64,
}

impl ublk_io_batch_entry {
    pub(crate) fn new(io: *mut ublk_io, req: &Request, q_id: u16) -> ublk_io_batch_entry {
        ublk_io_batch_entry { io, buf: data_buf(req), desc: desc_of(req, q_id), result: UBLK_BATCH_PENDING, lease_fd: -1, lease_file_off: 0 }
    }
}

/// After `handle_batch` returned: completes or leases what the target asked
/// for, entry by entry. A request the target also completed itself is left
/// alone (its completion is refused as a duplicate).
/// `ios` are the entries' handles as the engine made them: the entries are
/// the target's to write, and a binding that overwrote an `io` field must
/// not make the queue thread follow a bad pointer.
pub(crate) fn finish(ctx: &mut QueueCtx<'_>, entries: &[ublk_io_batch_entry], ios: &[*mut ublk_io]) {
    for (e, &io) in entries.iter().zip(ios) {
        // SAFETY: the handles live as long as the device; no new request can
        // have arrived on this tag since the batch was made (requests arrive
        // only between batches), so `req` is still this entry's request.
        let req = req_of(unsafe { &*io });
        let tag = req.tag;
        if e.result != UBLK_BATCH_PENDING {
            let _ = ctx.complete_seq(tag, req.seq, e.result);
        } else if e.lease_fd >= 0 {
            if let Err(err) = lend_whole(ctx, &req, e.lease_fd, e.lease_file_off) {
                let _ = ctx.complete_seq(tag, req.seq, err.neg_errno());
            }
        }
    }
}

/// Lends the whole of a READ (filled from `fd` at `file_off`) or WRITE
/// (written there) request, without a callback: it completes when that is
/// over. What a batch entry's `lease_fd` and a route table extent ask for.
pub(crate) fn lend_whole(ctx: &mut QueueCtx<'_>, req: &Request, fd: i32, file_off: u64) -> crate::Result<()> {
    match req.op {
        Op::Read => ctx.lease(req.tag).read_into(fd, file_off, 0..req.len, NO_CB),
        Op::Write => ctx.lease(req.tag).write_from(fd, file_off, 0..req.len, NO_CB),
        _ => Err(crate::Error::inval("only READ and WRITE requests are lent whole to a file")),
    }
}
