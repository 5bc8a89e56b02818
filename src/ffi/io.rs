//! C ABI: requests (`ublk_io`) and backing IO on the queue ring.

use super::batch::ublk_io_batch_entry;
use super::device::FfiDevShared;
use super::{guard, guard_or, null_err};
use crate::error::Error;
use crate::io::{Io, Op, QueueShared, Request};
use crate::queue::QueueCtx;
use crate::slab::Slab;
use crate::stats::QueueStatsSnapshot;
use crate::target::Target;
use once_cell::sync::OnceCell;
use parking_lot::Mutex;
use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

const IO_MAGIC: u64 = 0x7562_6c6b_5f69_6f21; // "ublk_io!"

/// One request of a device (opaque). There is one per (queue, tag), owned by
/// the device: the pointer handed to `handle_io` stays valid until
/// `ublk_dev_free`, and stands for the request it carries until that request
/// is completed.
pub struct ublk_io {
    magic: u64,
    /// The queue owning this handle (it lives in the queue's `ios`; an Arc
    /// here would make a cycle).
    queue: *const FfiQueue,
    req: UnsafeCell<Request>,
}

impl ublk_io {
    fn queue(&self) -> &FfiQueue {
        // SAFETY: handles live inside their FfiQueue, so it outlives them.
        unsafe { &*self.queue }
    }
}

// SAFETY: `req` is written only by the queue thread when a request arrives,
// before the handle is given to the target; other threads read it only after
// receiving the handle from the target (which orders the accesses). The seq
// check in `claim` makes a stale completion harmless.
unsafe impl Send for ublk_io {}
unsafe impl Sync for ublk_io {}

/// Completion callback of backing IO: `res` is the syscall-style result.
pub type ublk_backing_cb = Option<unsafe extern "C" fn(user: *mut c_void, io: *mut ublk_io, res: c_int)>;

struct Pending {
    cb: ublk_backing_cb,
    user: *mut c_void,
    io: *mut ublk_io,
}

/// `data` of a lease operation submitted without a callback.
pub(crate) const NO_CB: u32 = u32::MAX;

/// Per-queue state shared by the queue thread and the C side.
pub(crate) struct FfiQueue {
    q_id: u16,
    depth: u16,
    shared: OnceCell<Arc<QueueShared>>,
    data: AtomicPtr<c_void>,
    ios: OnceCell<Box<[ublk_io]>>,
    /// Callbacks of the backing and lease operations in flight, by slab key.
    pending: Mutex<Slab<Pending>>,
}

// SAFETY: the raw pointers in `pending` are only used on the queue thread.
unsafe impl Send for FfiQueue {}
unsafe impl Sync for FfiQueue {}

impl FfiQueue {
    pub(crate) fn new(q_id: u16, depth: u16) -> FfiQueue {
        FfiQueue {
            q_id,
            depth,
            shared: OnceCell::new(),
            data: AtomicPtr::new(std::ptr::null_mut()),
            ios: OnceCell::new(),
            pending: Mutex::new(Slab::default()),
        }
    }

    pub(crate) fn stats(&self) -> Option<QueueStatsSnapshot> {
        self.shared.get().map(|s| s.stats.snapshot())
    }
}

thread_local! {
    /// The queue context of the callback running on this thread (if any), and
    /// the queue it belongs to: backing IO and inline completion need it.
    static CURRENT: Cell<(*mut QueueCtx<'static>, *const FfiQueue)> = const { Cell::new((std::ptr::null_mut(), std::ptr::null())) };
    /// The device this thread is a queue thread of (null: none). Only
    /// compared, never dereferenced.
    static QUEUE_OF: Cell<*const FfiDevShared> = const { Cell::new(std::ptr::null()) };
}

/// Whether the calling thread is one of `dev`'s queue threads: the calls
/// that wait for those threads (stop, wait, serve, free) would wait for
/// themselves there.
pub(crate) fn on_queue_thread_of(dev: &Arc<FfiDevShared>) -> bool {
    QUEUE_OF.with(|c| std::ptr::eq(c.get(), Arc::as_ptr(dev)))
}

/// Runs a C callback with `ctx` registered as this thread's current context.
fn with_ctx<R>(ctx: &mut QueueCtx<'_>, q: &Arc<FfiQueue>, f: impl FnOnce() -> R) -> R {
    // SAFETY: the pointer is only dereferenced by calls made from `f`, on this
    // thread, while `ctx` is still mutably borrowed here; the previous value
    // is restored before returning, so it never outlives the borrow.
    let p = (ctx as *mut QueueCtx<'_>).cast::<QueueCtx<'static>>();
    // (one lookup of the thread-local for both accesses: in a shared library
    // each one is a call)
    CURRENT.with(|c| {
        let prev = c.replace((p, Arc::as_ptr(q)));
        let r = f();
        c.set(prev);
        r
    })
}

/// The current context if this thread is inside a callback of `q`'s queue.
fn current_ctx<'a>(q: &FfiQueue) -> Option<&'a mut QueueCtx<'static>> {
    let (p, cur) = CURRENT.with(|c| c.get());
    if p.is_null() || !std::ptr::eq(cur, q) {
        return None;
    }
    // SAFETY: set by `with_ctx` on this thread for the duration of the callback
    // we are called from (see there).
    Some(unsafe { &mut *p })
}

pub(crate) struct FfiTarget {
    dev: Arc<FfiDevShared>,
    q: Arc<FfiQueue>,
    /// The requests of this pass over the ring, for `handle_batch`: room for
    /// the whole queue from the start, so the array the callback gets stays
    /// at one address (bindings keep their views of it).
    batch: Vec<ublk_io_batch_entry>,
    /// The handles of `batch`'s entries, kept apart from the entries, which
    /// the callback may write (see `batch::finish`).
    batch_ios: Vec<*mut ublk_io>,
    /// This queue's view of the route table (`ublk_dev_map`).
    routes: super::route::QueueRoutes,
}

impl FfiTarget {
    /// Made on the queue thread: runs the C `queue_init` callback.
    pub(crate) fn new(dev: Arc<FfiDevShared>, q_id: u16) -> crate::Result<FfiTarget> {
        QUEUE_OF.with(|c| c.set(Arc::as_ptr(&dev)));
        let q = dev.queues.get(q_id as usize).cloned().ok_or_else(|| Error::inval(format!("no queue {q_id}")))?;
        q.ios.get_or_init(|| {
            (0..q.depth)
                .map(|tag| ublk_io {
                    magic: IO_MAGIC,
                    queue: Arc::as_ptr(&q),
                    req: UnsafeCell::new(Request { tag, q_id, op: Op::Read, flags: Default::default(), offset: 0, len: 0, buf: std::ptr::null_mut(), seq: 0 }),
                })
                .collect()
        });
        if let Some(init) = dev.ops.queue_init {
            let mut data: *mut c_void = std::ptr::null_mut();
            // SAFETY: a C callback with the documented arguments.
            let r = unsafe { init(dev.user, q_id, &mut data) };
            if r < 0 {
                return Err(Error::new(-r, format!("queue_init callback of queue {q_id} failed")));
            }
            q.data.store(data, Ordering::Release);
        }
        let batch = Vec::with_capacity(q.depth as usize);
        let batch_ios = Vec::with_capacity(q.depth as usize);
        Ok(FfiTarget { dev, q, batch, batch_ios, routes: Default::default() })
    }

    /// Catches up with the route table if it changed (one atomic load when
    /// it did not): drops the fds registered for the old table, which may
    /// name other files by now (see `QueueRoutes::refresh`). Runs before
    /// every callback, so no backing IO of the target goes to a stale
    /// registration either.
    fn sync_routes(&mut self, ctx: &mut QueueCtx<'_>) {
        for fd in self.routes.refresh(&self.dev.routes) {
            let _ = ctx.unregister_fd(fd);
        }
    }

    /// Lends a READ/WRITE request inside a mapped extent to its fd
    /// (`ublk_dev_map`); false when the request goes to the target.
    /// After `sync_routes`.
    fn route(&mut self, ctx: &mut QueueCtx<'_>, io: &Io<'_>) -> bool {
        use super::route::{UBLK_MAP_READ, UBLK_MAP_WRITE};
        if self.routes.is_empty() {
            return false; // (the usual case)
        }
        let need = match io.op() {
            Op::Read => UBLK_MAP_READ,
            Op::Write => UBLK_MAP_WRITE,
            _ => return false,
        };
        let Some((fd, file_off)) = self.routes.lookup(io.offset(), io.len(), need) else { return false };
        if !self.routes.registered.contains(&fd) && ctx.core.fixed_slot(fd).is_none() && ctx.register_fd(fd).is_ok() {
            self.routes.registered.push(fd); // (one the target registered itself stays its own)
        }
        if let Err(e) = super::batch::lend_whole(ctx, &io.req, fd, file_off) {
            let _ = ctx.complete(io.tag(), e.neg_errno());
        }
        true
    }

    fn io_ptr(&self, tag: u16) -> *mut ublk_io {
        let ios = self.q.ios.get().expect("ios are made in FfiTarget::new");
        &ios[tag as usize] as *const ublk_io as *mut ublk_io
    }
}

impl Drop for FfiTarget {
    fn drop(&mut self) {
        if let Some(deinit) = self.dev.ops.queue_deinit {
            // SAFETY: a C callback with the documented arguments, on the queue thread.
            unsafe { deinit(self.dev.user, self.q.q_id, self.q.data.load(Ordering::Acquire)) };
        }
    }
}

impl Target for FfiTarget {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        if self.q.shared.get().is_none() {
            let _ = self.q.shared.set(ctx.shared().clone());
        }
        let p = self.io_ptr(io.tag());
        // SAFETY: only the queue thread writes `req`, and the tag is not held by
        // anyone now (a new request just arrived on it).
        unsafe { *(*p).req.get() = io.req };
        self.sync_routes(ctx);
        if self.route(ctx, &io) {
            return;
        }
        if self.dev.ops.handle_batch.is_some() {
            self.batch.push(ublk_io_batch_entry::new(p, &io.req, self.q.q_id));
            self.batch_ios.push(p);
            return;
        }
        let Some(handle) = self.dev.ops.handle_io else { return };
        // SAFETY: a C callback with the documented arguments.
        with_ctx(ctx, &self.q, || unsafe { handle(self.dev.user, p) });
    }

    fn backing_complete(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        self.sync_routes(ctx);
        let p = self.q.pending.lock().take(data);
        match p {
            Some(Pending { cb: Some(cb), user, io }) => {
                // SAFETY: a C callback with the documented arguments.
                with_ctx(ctx, &self.q, || unsafe { cb(user, io, res) });
            }
            _ => {
                let _ = ctx.complete(tag, if res < 0 { res } else { -libc::EIO });
            }
        }
    }

    fn batch_end(&mut self, ctx: &mut QueueCtx<'_>) {
        let (Some(handle), false) = (self.dev.ops.handle_batch, self.batch.is_empty()) else { return };
        self.sync_routes(ctx);
        let (ptr, n) = (self.batch.as_mut_ptr(), self.batch.len() as u32);
        // SAFETY: a C callback with the documented arguments; `batch` is not
        // touched until it returns.
        with_ctx(ctx, &self.q, || unsafe { handle(self.dev.user, ptr, n) });
        super::batch::finish(ctx, &self.batch, &self.batch_ios);
        self.batch.clear();
        self.batch_ios.clear();
    }

    fn lease_done(&mut self, ctx: &mut QueueCtx<'_>, _tag: u16, data: u32, res: i32) {
        if data == NO_CB {
            return;
        }
        self.sync_routes(ctx);
        if let Some(Pending { cb: Some(cb), user, io }) = self.q.pending.lock().take(data) {
            // SAFETY: a C callback with the documented arguments.
            with_ctx(ctx, &self.q, || unsafe { cb(user, io, res) });
        }
    }
}

fn io_ref<'a>(io: *const ublk_io) -> Result<&'a ublk_io, Error> {
    // SAFETY: a non-null handle comes from handle_io and stays valid until
    // ublk_dev_free (documented); the magic check catches common misuse.
    let r = unsafe { io.as_ref() }.ok_or_else(|| null_err("io"))?;
    if r.magic != IO_MAGIC {
        return Err(Error::inval("io is not a libublk request handle"));
    }
    Ok(r)
}

pub(crate) fn req_of(io: &ublk_io) -> Request {
    // SAFETY: see the Send/Sync comment on ublk_io.
    unsafe { *io.req.get() }
}

/// Completes the request with `result`: bytes done for READ/WRITE (at most
/// `ublk_io_len`; 0 fails the request with EIO, as the block layer would
/// retry a zero-byte transfer forever; fewer than `ublk_io_len` only for a
/// READ in copy mode, where the kernel asks again for the rest: in the other
/// data modes and for a WRITE the kernel would take the whole request as
/// done, so such a result fails it with EIO and gives -EINVAL), 0 for other
/// ops, or a negative errno.
/// Inside a callback or later from any thread; the engine wakes the queue
/// itself. While lease operations on the request are in flight the
/// completion waits for them, and one that fails then fails the request
/// (see `ublk_io_lease_manual`). After this call the handle may carry the
/// tag's next request: keep none after completing (a second call then
/// gives -EALREADY only until that next request arrives).
/// Returns 0, or: -EALREADY (already completed), -ESTALE (the handle now
/// carries no request of yours), -ESHUTDOWN (the device stopped serving),
/// -EINVAL (NULL/invalid handle; or result > length, or a partial result
/// the data mode cannot express: the request is then failed with EIO).
#[no_mangle]
pub extern "C" fn ublk_io_complete(io: *mut ublk_io, result: c_int) -> c_int {
    let (r, posted) = complete_one_quiet(io, result);
    if let Some(q) = posted {
        q.wake();
    }
    r
}

/// Completes `n` requests, `ios[i]` with `results[i]`, as `ublk_io_complete`
/// would one by one, but wakes each queue thread once, after the last one,
/// instead of after the first: for a worker thread that finishes several
/// requests at a time (a queue thread woken by the first completion would
/// otherwise take it alone, then wait to be woken again for the rest).
/// `ios` and `results` point to `n` entries each, borrowed for the call.
/// `status`: NULL, or `n` ints that get each request's own
/// `ublk_io_complete` result (0 or a negative errno). Every entry is tried
/// whatever the others give. Returns 0 when all were completed, else the
/// error of the first entry that failed; -EINVAL for NULL arrays with `n` >
/// 0. Any thread.
#[no_mangle]
pub extern "C" fn ublk_io_complete_batch(ios: *const *mut ublk_io, results: *const c_int, n: usize, status: *mut c_int) -> c_int {
    /// Wakes the queues it holds when dropped: also if a later entry panics,
    /// so no posted completion waits for a wake-up that never comes.
    struct Wake(Vec<Arc<QueueShared>>);
    impl Drop for Wake {
        fn drop(&mut self) {
            for q in &self.0 {
                q.wake();
            }
        }
    }
    guard(|| {
        if n == 0 {
            return Ok(0);
        }
        if ios.is_null() || results.is_null() {
            return Err(null_err(if ios.is_null() { "ios" } else { "results" }));
        }
        // SAFETY: the caller passes n entries in each array (documented); they
        // are only read, and status only written, during this call.
        let (ios, results) = unsafe { (std::slice::from_raw_parts(ios, n), std::slice::from_raw_parts(results, n)) };
        let mut wake = Wake(Vec::new());
        let mut first = 0; // the first error, already reported by its entry's guard
        for (i, (&io, &res)) in ios.iter().zip(results).enumerate() {
            let (r, posted) = complete_one_quiet(io, res);
            if let Some(q) = posted.filter(|q| !wake.0.iter().any(|w| Arc::ptr_eq(w, q))) {
                wake.0.push(q);
            }
            if !status.is_null() {
                // SAFETY: status has n entries (documented).
                unsafe { *status.add(i) = r };
            }
            if r < 0 && first == 0 {
                first = r;
            }
        }
        drop(wake);
        Ok(first)
    })
}

/// `ublk_io_complete` without the wake-up: its result, and the queue to
/// wake when the completion was handed to another thread's queue.
fn complete_one_quiet(io: *mut ublk_io, result: c_int) -> (c_int, Option<Arc<QueueShared>>) {
    let mut posted = None;
    let r = guard(|| {
        let io = io_ref(io)?;
        let req = req_of(io);
        if let Some(ctx) = current_ctx(io.queue()) {
            ctx.complete_seq(req.tag, req.seq, result)?;
            return Ok(0);
        }
        let shared = io.queue().shared.get().ok_or_else(|| Error::new(libc::ESTALE, "no request on this handle"))?;
        let (sent, report) = shared.complete_remote_quiet(&req, result);
        if sent {
            posted = Some(shared.clone());
        }
        report.map(|()| 0)
    });
    (r, posted)
}

fn op_code(op: Op) -> c_int {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::Discard => 3,
        Op::WriteZeroes => 5,
        Op::Other(o) => o as c_int,
    }
}

/// The op of the request: UBLK_OP_READ, _WRITE, _FLUSH, _DISCARD,
/// _WRITE_ZEROES (other kernel op numbers pass through); -EINVAL for a bad
/// handle. Any thread holding the request.
#[no_mangle]
pub extern "C" fn ublk_io_op(io: *const ublk_io) -> c_int {
    guard(|| Ok(op_code(req_of(io_ref(io)?).op)))
}

/// Everything `ublk_io_op`, `_flags`, `_offset`, `_len`, `_queue_id` and
/// `_tag` tell, in one call (for bindings, where each call costs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_io_desc {
    pub op: i32,
    pub flags: u32,
    pub offset: u64,
    pub len: u32,
    pub queue_id: u16,
    pub tag: u16,
}

pub(crate) fn desc_of(r: &Request, queue_id: u16) -> ublk_io_desc {
    ublk_io_desc { op: op_code(r.op), flags: r.flags.0, offset: r.offset, len: r.len, queue_id, tag: r.tag }
}

/// Fills `*out` with the request's op, flags, offset, length, queue id and
/// tag. Returns 0, or -EINVAL for a bad handle or a NULL `out`. Any thread
/// holding the request.
#[no_mangle]
pub extern "C" fn ublk_io_get_desc(io: *const ublk_io, out: *mut ublk_io_desc) -> c_int {
    guard(|| {
        let i = io_ref(io)?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        let d = desc_of(&req_of(i), i.queue().q_id);
        // SAFETY: out is non-null and points to a ublk_io_desc (documented).
        unsafe { out.write(d) };
        Ok(0)
    })
}

/// Flag bits of the request: UBLK_FLAG_FUA, UBLK_FLAG_NOUNMAP (the kernel's
/// UBLK_IO_F_* bits).
#[no_mangle]
pub extern "C" fn ublk_io_flags(io: *const ublk_io) -> u32 {
    guard_or(0, || io_ref(io).ok().map(|i| req_of(i).flags.0))
}

/// Byte offset of the request on the device.
#[no_mangle]
pub extern "C" fn ublk_io_offset(io: *const ublk_io) -> u64 {
    guard_or(0, || io_ref(io).ok().map(|i| req_of(i).offset))
}

/// Length of the request in bytes.
#[no_mangle]
pub extern "C" fn ublk_io_len(io: *const ublk_io) -> u32 {
    guard_or(0, || io_ref(io).ok().map(|i| req_of(i).len))
}

/// Queue id of the request.
#[no_mangle]
pub extern "C" fn ublk_io_queue_id(io: *const ublk_io) -> u16 {
    guard_or(0, || io_ref(io).ok().map(|i| i.queue().q_id))
}

/// Tag of the request within its queue.
#[no_mangle]
pub extern "C" fn ublk_io_tag(io: *const ublk_io) -> u16 {
    guard_or(0, || io_ref(io).ok().map(|i| req_of(i).tag))
}

/// The request's data buffer (`ublk_io_len` bytes: fill it for READ, read it
/// for WRITE), owned by the engine and valid until the request is completed;
/// NULL for requests without data, and in every data mode but
/// UBLK_DATA_COPY (set `ublk_dev_config.needs_buffer` to get copy mode; the
/// other modes move data with the `ublk_io_lease_*` operations).
#[no_mangle]
pub extern "C" fn ublk_io_buf(io: *mut ublk_io) -> *mut c_void {
    guard_or(std::ptr::null_mut(), || Some(data_buf(&req_of(io_ref(io).ok()?))))
}

/// What `ublk_io_buf` gives for `r`: its buffer if it carries data, else NULL.
pub(crate) fn data_buf(r: &Request) -> *mut c_void {
    if r.op.has_data() {
        r.buf as *mut c_void
    } else {
        std::ptr::null_mut()
    }
}

/// The pointer `queue_init` stored for the request's queue (NULL if none).
#[no_mangle]
pub extern "C" fn ublk_io_queue_data(io: *const ublk_io) -> *mut c_void {
    guard_or(std::ptr::null_mut(), || io_ref(io).ok().map(|i| i.queue().data.load(Ordering::Acquire)))
}

/// Submits an operation for `io` on its queue's ring. Only from a callback
/// running on that queue's thread (else -EXDEV). `cb` NULL is allowed when
/// `optional_cb` (lease operations: the request then completes in aggregate).
fn submit_op(
    io: *mut ublk_io,
    cb: ublk_backing_cb,
    user: *mut c_void,
    optional_cb: bool,
    f: impl FnOnce(&mut QueueCtx<'static>, u16, u32) -> crate::Result<()>,
) -> c_int {
    guard(|| {
        let r = io_ref(io)?;
        if cb.is_none() && !optional_cb {
            return Err(null_err("cb"));
        }
        let ctx = current_ctx(r.queue())
            .ok_or_else(|| Error::new(libc::EXDEV, "IO on the queue ring must be submitted from a callback on the request's queue thread"))?;
        let tag = req_of(r).tag;
        let idx = if cb.is_some() { r.queue().pending.lock().insert(Pending { cb, user, io }) } else { NO_CB };
        if let Err(e) = f(ctx, tag, idx) {
            if idx != NO_CB {
                r.queue().pending.lock().take(idx);
            }
            return Err(e);
        }
        Ok(0)
    })
}

fn submit_backing(io: *mut ublk_io, cb: ublk_backing_cb, user: *mut c_void, f: impl FnOnce(&mut QueueCtx<'static>, u16, u32) -> crate::Result<()>) -> c_int {
    submit_op(io, cb, user, false, f)
}

fn range(buf_off: u32, len: u32) -> std::ops::Range<u32> {
    buf_off..buf_off.saturating_add(len)
}

/// Lease: fills `len` bytes of a READ request's buffer at `buf_off` from `fd`
/// at `file_off`, on the queue's io_uring, zero copy where the data mode
/// allows. A read that ends early (end of file) leaves zeroes in the rest of
/// the range. When `cb` is not NULL, `cb(cb_user, io, res)` runs on the queue
/// thread when the operation is over (`res`: `len`, or a negative errno); it
/// may submit more operations or complete `io`. When the last lease operation
/// of the request is over and the request was not completed, the engine
/// completes it with the first error, or else the bytes the operations moved
/// from the start of the buffer without a gap (see `ublk_io_lease_manual`).
/// Errors: -EPERM (a WRITE request: its buffer is a source only), -EINVAL
/// (range empty or outside the request, `file_off + len` past 2^63 - 1, or a
/// request without data: FLUSH, DISCARD...), -EALREADY (request already
/// completed), -EXDEV (not on the request's queue thread), -EBADF (fd < 0).
/// `fd` must stay open until the operation is over.
#[no_mangle]
pub extern "C" fn ublk_io_lease_read(io: *mut ublk_io, fd: c_int, file_off: u64, buf_off: u32, len: u32, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_op(io, cb, cb_user, true, |ctx, tag, d| ctx.lease(tag).read_into(fd, file_off, range(buf_off, len), d))
}

/// Lease: writes `len` bytes of a WRITE request's buffer at `buf_off` to `fd`
/// at `file_off` (RWF_DSYNC when the request has UBLK_FLAG_FUA). As
/// `ublk_io_lease_read`; -EPERM when the request is a READ (its buffer is a
/// destination only).
#[no_mangle]
pub extern "C" fn ublk_io_lease_write(io: *mut ublk_io, fd: c_int, file_off: u64, buf_off: u32, len: u32, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_op(io, cb, cb_user, true, |ctx, tag, d| ctx.lease(tag).write_from(fd, file_off, range(buf_off, len), d))
}

/// Lease: sends `len` bytes of a WRITE request's buffer at `buf_off` on the
/// stream socket `sock` (all of them: short sends are continued); a closed
/// peer fails it with -EPIPE (queue threads block SIGPIPE, so it never kills
/// the server). As `ublk_io_lease_write`.
#[no_mangle]
pub extern "C" fn ublk_io_lease_send(io: *mut ublk_io, sock: c_int, buf_off: u32, len: u32, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_op(io, cb, cb_user, true, |ctx, tag, d| ctx.lease(tag).send(sock, range(buf_off, len), d))
}

/// Lease: receives exactly `len` bytes from the stream socket `sock` into a
/// READ request's buffer at `buf_off`; the peer closing first fails the
/// operation with -ECONNRESET. As `ublk_io_lease_read`.
#[no_mangle]
pub extern "C" fn ublk_io_lease_recv(io: *mut ublk_io, sock: c_int, buf_off: u32, len: u32, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_op(io, cb, cb_user, true, |ctx, tag, d| ctx.lease(tag).recv(sock, range(buf_off, len), d))
}

/// The target completes `io` itself with `ublk_io_complete` (e.g. after
/// retrying a failed lease operation) instead of the aggregate completion.
/// The completion is still held back until every lease operation on the
/// request is over, and an operation that fails after it fails the request
/// with its error (complete from the last operation's callback to overrule
/// a failure). Call it before handing a leased request to another thread
/// that will complete it: else the last operation completes it meanwhile. Only on the request's queue thread (else -EXDEV);
/// -EALREADY once the request is completed.
#[no_mangle]
pub extern "C" fn ublk_io_lease_manual(io: *mut ublk_io) -> c_int {
    guard(|| {
        let r = io_ref(io)?;
        let ctx = current_ctx(r.queue()).ok_or_else(|| Error::new(libc::EXDEV, "only on the request's queue thread"))?;
        ctx.lease(req_of(r).tag).complete_manually()?;
        Ok(0)
    })
}

/// Registers `fd` in the file table of `io`'s queue ring, so that the IO the
/// queue submits on it afterwards (leases, fsync, fallocate) skips the file
/// lookup of each operation: what a loop or mirror does once per queue for its
/// backing files (for instance on the first request, with a flag in the queue
/// data). `fd` must stay open while registered; closing it does not
/// unregister it. Registering an fd twice is a no-op. Only from a callback on
/// the request's queue thread (-EXDEV otherwise). Errors: -EBADF (fd < 0),
/// -EOPNOTSUPP (the kernel's io_uring has no sparse file table), -ENOSPC (the
/// queue's 16 slots are in use). IO on an fd that is not registered works
/// the same, without the saving.
#[no_mangle]
pub extern "C" fn ublk_io_register_fd(io: *mut ublk_io, fd: c_int) -> c_int {
    guard(|| {
        let r = io_ref(io)?;
        let ctx = current_ctx(r.queue()).ok_or_else(|| Error::new(libc::EXDEV, "only on the request's queue thread"))?;
        ctx.register_fd(fd)?;
        Ok(0)
    })
}

/// fsync (`datasync` = 0) or fdatasync (non-zero) of `fd` on the queue's
/// io_uring; `cb(cb_user, io, res)` (required) runs on the queue thread when
/// done and completes `io` (or submits more). Only from a callback on the
/// request's queue thread (-EXDEV otherwise). `fd` must stay open until `cb` runs.
#[no_mangle]
pub extern "C" fn ublk_io_fsync(io: *mut ublk_io, fd: c_int, datasync: c_int, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_backing(io, cb, cb_user, |ctx, tag, d| ctx.fsync(tag, fd, datasync != 0, d))
}

/// fallocate(fd, mode, off, len) (e.g. FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE
/// for DISCARD). As `ublk_io_fsync`.
#[no_mangle]
pub extern "C" fn ublk_io_fallocate(io: *mut ublk_io, fd: c_int, mode: c_int, off: u64, len: u64, cb: ublk_backing_cb, cb_user: *mut c_void) -> c_int {
    submit_backing(io, cb, cb_user, |ctx, tag, d| ctx.fallocate(tag, fd, mode, off, len, d))
}
