//! The `Target` trait: what serves the requests of a device.

use crate::error::Result;
use crate::io::Io;
use crate::queue::{QueueCtx, QueueInfo};
use std::sync::Arc;

/// Serves the requests of one queue. A target object is made per queue, on the
/// queue's thread, by a [`TargetFactory`]; it needs not be `Send`. State shared
/// by the queues lives behind an `Arc` inside it.
///
/// For each request the target either
/// - completes it at once: `ctx.complete(io.tag(), result)`;
/// - lends the request's buffer to IO on files and sockets with
///   `ctx.lease(tag)` ([`crate::Lease`]: zero copy where the kernel allows),
///   which completes the request when the last operation is done;
/// - submits other backing IO on the queue ring (`ctx.fsync`,
///   `ctx.fallocate`, or `ctx.submit`) and completes the request from
///   [`Target::backing_complete`];
/// - or hands it off with `ctx.defer(io)`, getting a `Send` [`crate::Completion`]
///   that completes it later from any thread.
///
/// Results: READ/WRITE return the bytes done, other ops 0; errors are
/// negative errno values. Fewer bytes than `io.len()` only for a READ in copy
/// mode (the kernel asks again for the rest); in the other data modes, and
/// for a WRITE, the kernel would take the whole request as done, so such a
/// result fails it with EIO (and the completion call reports EINVAL).
pub trait Target {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>);

    /// Completion of backing IO submitted for `tag` with user value `data`.
    /// The default fails the request with the backing IO's error, or succeeds
    /// with its result.
    fn backing_complete(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        let _ = data;
        let _ = ctx.complete(tag, res);
    }

    /// A lease operation ([`crate::Lease`]) submitted for `tag` with user
    /// value `data` finished: `res` is its range's length, or a negative errno.
    /// It may submit more lease operations or complete the request. The
    /// default does nothing: once the last operation is over, the engine
    /// completes the request with the total bytes or the first error.
    fn lease_done(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        let _ = (ctx, tag, data, res);
    }

    /// Called after each pass over the queue ring's completions (the
    /// requests, backing and lease completions that arrived together), before
    /// the queue waits again: a target that collects requests in
    /// `handle_io` can act on them all at once here. The default does nothing.
    fn batch_end(&mut self, ctx: &mut QueueCtx<'_>) {
        let _ = ctx;
    }
}

/// Makes the target object of each queue (called on the queue thread).
pub type TargetFactory = Arc<dyn Fn(&QueueInfo) -> Result<Box<dyn Target>> + Send + Sync>;
