//! What a target sees of one request: [`Io`] on the queue thread, and
//! [`Completion`], a `Send` handle that completes the request from any thread.

use crate::error::{Error, Result};
use crate::sys;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// An op this engine does not serve (zone ops…); completed with EOPNOTSUPP
    /// unless the target handles it.
    Other(u8),
}

impl Op {
    pub fn from_raw(op: u8) -> Op {
        match op {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            o => Op::Other(o),
        }
    }

    /// READ and WRITE move data; the result of those is a byte count.
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }
}

/// Request flags (`UBLK_IO_F_*` bits of the descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoFlags(pub u32);

impl IoFlags {
    /// Force unit access: the write must be durable when completed.
    pub fn fua(self) -> bool {
        self.0 & sys::UBLK_IO_F_FUA != 0
    }
    /// WRITE_ZEROES must not deallocate.
    pub fn nounmap(self) -> bool {
        self.0 & sys::UBLK_IO_F_NOUNMAP != 0
    }
}

// Tag life cycle, kept in one atomic per tag: (seq << 2) | phase.
pub(crate) const PHASE_KERNEL: u64 = 0; // the kernel owns the tag (FETCH/COMMIT pending)
pub(crate) const PHASE_TARGET: u64 = 1; // the target owns the request
pub(crate) const PHASE_DONE: u64 = 2; // completed, commit pending on the queue thread

/// State the queue shares with completion handles on other threads.
pub(crate) struct QueueShared {
    pub q_id: u16,
    pub tags: Box<[AtomicU64]>,
    /// Completions posted by other threads, for the queue thread to commit.
    pub posted: crate::posted::Posted,
    pub eventfd: RawFd,
    /// True while no eventfd write is needed to get a posted completion
    /// seen: the queue thread is awake (it takes what was posted before it
    /// sleeps again, see `Queue::run`) or a wake-up is already on its way.
    pub wake_pending: AtomicBool,
    /// Set when the queue thread has exited: completions go nowhere.
    pub closed: AtomicBool,
    /// Set when the device is being stopped (`StopHandle::stop`): the queue
    /// thread then fails requests the target still holds after a grace
    /// period (see `Queue::run`).
    pub stopping: AtomicBool,
    /// A READ may complete with fewer bytes than asked (copy mode only, see
    /// `check_result`).
    pub partial_reads: bool,
    pub stats: crate::stats::QueueStats,
    /// Kept alive as long as any Completion may still touch a buffer.
    pub _bufs: Arc<crate::buf::TagBuffers>,
}

impl QueueShared {
    /// Moves a tag from "owned by the target" to "done" if `seq` is current.
    pub(crate) fn claim(&self, tag: u16, seq: u64) -> Result<()> {
        let slot = self.tags.get(tag as usize).ok_or_else(|| Error::inval(format!("tag {tag} out of range")))?;
        let want = (seq << 2) | PHASE_TARGET;
        slot.compare_exchange(want, (seq << 2) | PHASE_DONE, Ordering::AcqRel, Ordering::Acquire).map(drop).map_err(|cur| {
            if cur >> 2 == seq {
                Error::new(libc::EALREADY, format!("request q{} tag {tag} was already completed", self.q_id))
            } else {
                Error::new(libc::ESTALE, format!("request q{} tag {tag} is not in flight any more (stale handle)", self.q_id))
            }
        })
    }

    /// Completes `req` from any thread: checks the result, claims the tag (so a
    /// second completion is refused) and hands the result to the queue thread.
    /// An oversized result fails the request with EIO and is reported.
    pub(crate) fn complete_remote(&self, req: &Request, res: i32) -> Result<()> {
        let (posted, report) = self.complete_remote_quiet(req, res);
        if posted {
            self.wake();
        }
        report
    }

    /// Checks `res` for a request of `op`/`len`, then claims (tag, seq). Gives
    /// the result to commit (EIO instead of an oversized one) and what to
    /// report to the caller (the oversized result's EINVAL, or Ok).
    pub(crate) fn claim_result(&self, op: Op, len: u32, tag: u16, seq: u64, res: i32) -> Result<(i32, Result<()>)> {
        let (res, report) = match check_result(op, len, res, self.partial_reads) {
            Ok(r) => (r, Ok(())),
            Err(e) => (-libc::EIO, Err(e)),
        };
        self.claim(tag, seq)?;
        Ok((res, report))
    }

    /// Hands a completion to the queue thread and wakes it.
    pub(crate) fn post(&self, tag: u16, res: i32) {
        self.post_quiet(tag, res);
        self.wake();
    }

    /// Hands a completion to the queue thread without waking it: the caller
    /// calls `wake` once after a batch of these.
    pub(crate) fn post_quiet(&self, tag: u16, res: i32) {
        // (If the queue thread is gone, the device is gone and the completion
        // has nowhere to go: nothing takes it.)
        self.posted.post(tag, res);
    }

    /// `complete_remote` without the wake-up: the caller calls `wake` once
    /// after a batch of these if any was posted (the first value).
    pub(crate) fn complete_remote_quiet(&self, req: &Request, res: i32) -> (bool, Result<()>) {
        if self.closed.load(Ordering::Acquire) {
            return (false, Err(Error::new(libc::ESHUTDOWN, format!("queue {} has stopped serving", self.q_id))));
        }
        match self.claim_result(req.op, req.len, req.tag, req.seq, res) {
            Ok((res, report)) => {
                self.post_quiet(req.tag, res);
                (true, report)
            }
            Err(e) => (false, Err(e)),
        }
    }

    /// Called by the queue thread before it takes what was posted and may
    /// sleep in its ring: from here on, a posting thread writes the eventfd.
    pub(crate) fn may_sleep(&self) {
        self.wake_pending.store(false, Ordering::SeqCst);
        // Pairs with the fence in `wake`: either the caller's look at
        // `posted` after this sees a completion, or its poster sees `false`.
        fence(Ordering::SeqCst);
    }

    /// Called by the queue thread when it is back from its ring: posted
    /// completions need no eventfd write until its next `may_sleep`.
    pub(crate) fn awake(&self) {
        self.wake_pending.store(true, Ordering::Relaxed);
    }

    /// Makes sure the queue thread sees what was posted before this call:
    /// wakes it (its eventfd read on the ring completes) unless it is awake
    /// or already being woken.
    pub(crate) fn wake(&self) {
        // Pairs with the fence in `may_sleep`.
        fence(Ordering::SeqCst);
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local to the queue's eventfd, which
            // stays open as long as any `Arc<QueueShared>` exists.
            unsafe { libc::write(self.eventfd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

impl Drop for QueueShared {
    fn drop(&mut self) {
        // SAFETY: the eventfd is owned by this struct and closed once.
        unsafe { libc::close(self.eventfd) };
    }
}

/// Checks and normalises a completion result for an op of `len` bytes.
///
/// A READ or WRITE done in part (0 < res < len): the kernel completes the
/// first `res` bytes and sends the rest again only for a READ in copy mode
/// (`partial_reads`: it copies `res` bytes out of the server's buffer). In
/// the other modes, and for every WRITE, it ends the whole request as done
/// (ublk_drv's `__ublk_complete_rq`: nothing to unmap), so the bytes past
/// `res` would reach a reader unfilled, or never be written: such a result
/// fails the request with EIO instead, and is reported.
pub(crate) fn check_result(op: Op, len: u32, res: i32, partial_reads: bool) -> Result<i32> {
    if res < 0 {
        return Ok(res);
    }
    if op.has_data() {
        if res as u64 > len as u64 {
            return Err(Error::inval(format!("result {res} is larger than the request length {len}")));
        }
        if res == 0 && len > 0 {
            // A zero-byte READ/WRITE would make the block layer retry forever.
            return Ok(-libc::EIO);
        }
        if (res as u32) < len && !(op == Op::Read && partial_reads) {
            let why = if op == Op::Read { "a READ can end early in copy mode only" } else { "a WRITE cannot end early" };
            return Err(Error::inval(format!("result {res} of a {len}-byte {op:?}: {why}; failed with EIO")));
        }
        Ok(res)
    } else {
        Ok(0)
    }
}

/// What a request is: op, flags, device range, and where it lives (queue, tag).
/// [`Io`] and [`Completion`] dereference to it.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub(crate) tag: u16,
    pub(crate) q_id: u16,
    pub(crate) op: Op,
    pub(crate) flags: IoFlags,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) buf: *mut u8,
    pub(crate) seq: u64,
}

impl Request {
    pub fn tag(&self) -> u16 {
        self.tag
    }
    pub fn queue_id(&self) -> u16 {
        self.q_id
    }
    pub fn op(&self) -> Op {
        self.op
    }
    pub fn flags(&self) -> IoFlags {
        self.flags
    }
    /// Byte offset on the device.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Length in bytes (READ/WRITE: data length; DISCARD/WRITE_ZEROES: range length).
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The data buffer; callers hold the request exclusively.
    fn data(&mut self) -> &mut [u8] {
        if self.buf.is_null() || !self.op.has_data() {
            return &mut [];
        }
        // SAFETY: the queue gives each tag its own buffer of at least `len`
        // bytes, owned by whoever holds the request (Io or Completion) while it
        // is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len as usize) }
    }
}

/// One request, as the target sees it on the queue thread.
pub struct Io<'a> {
    pub(crate) req: Request,
    pub(crate) _marker: std::marker::PhantomData<&'a mut [u8]>,
}

impl std::ops::Deref for Io<'_> {
    type Target = Request;
    fn deref(&self) -> &Request {
        &self.req
    }
}

impl Io<'_> {
    /// The request's data: what to write (WRITE) or where to put what is read
    /// (READ). Empty for ops without data.
    pub fn buf(&mut self) -> &mut [u8] {
        self.req.data()
    }
}

/// Completes one request from any thread. Not `Clone`: a request completes once.
pub struct Completion {
    pub(crate) shared: Arc<QueueShared>,
    pub(crate) req: Request,
    pub(crate) done: bool,
}

// SAFETY: the buffer pointer is exclusively owned by the holder of the
// Completion until it completes (the queue does not touch a tag's buffer while
// the target owns it); everything else is Send.
unsafe impl Send for Completion {}

impl std::ops::Deref for Completion {
    type Target = Request;
    fn deref(&self) -> &Request {
        &self.req
    }
}

impl Completion {
    /// The request's data buffer, usable until `complete`.
    pub fn buf(&mut self) -> &mut [u8] {
        self.req.data()
    }

    /// Completes the request with `res` (bytes done, or a negative errno).
    ///
    /// A result larger than the request is a caller bug: it is reported as
    /// EINVAL and the request is failed with EIO so it never hangs; so is a
    /// READ/WRITE done in part, except a READ in copy mode (the kernel then
    /// asks again for the rest; see [`crate::Target`]). Completing
    /// a request that is no longer in flight (device stopped and re-armed) is
    /// reported as ESTALE and changes nothing.
    pub fn complete(mut self, res: i32) -> Result<()> {
        self.done = true;
        self.shared.complete_remote(&self.req, res)
    }
}

impl Drop for Completion {
    /// A request whose handle is dropped without completing fails with EIO
    /// rather than hanging its submitter forever.
    fn drop(&mut self) {
        if !self.done && self.shared.claim(self.req.tag, self.req.seq).is_ok() {
            self.shared.post(self.req.tag, -libc::EIO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(depth: u16) -> Arc<QueueShared> {
        // SAFETY: eventfd has no memory preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(efd >= 0);
        let s = QueueShared {
            q_id: 0,
            tags: (0..depth).map(|_| AtomicU64::new(PHASE_KERNEL)).collect(),
            posted: crate::posted::Posted::new(depth),
            eventfd: efd,
            wake_pending: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            partial_reads: true,
            stats: Default::default(),
            _bufs: Arc::new(crate::buf::TagBuffers::new(depth, 4096).unwrap()),
        };
        Arc::new(s)
    }

    fn completion(s: &Arc<QueueShared>, tag: u16, seq: u64, op: Op, len: u32) -> Completion {
        s.tags[tag as usize].store(seq << 2 | PHASE_TARGET, Ordering::Release);
        let req = Request { tag, q_id: 0, op, flags: IoFlags(0), offset: 0, len, buf: s._bufs.get(tag), seq };
        Completion { shared: s.clone(), req, done: false }
    }

    #[test]
    fn results_are_checked() {
        assert_eq!(check_result(Op::Read, 4096, 4096, true), Ok(4096));
        assert_eq!(check_result(Op::Read, 4096, 512, true), Ok(512));
        assert_eq!(check_result(Op::Read, 4096, 512, false).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(check_result(Op::Write, 4096, 512, true).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(check_result(Op::Write, 4096, 4096, false), Ok(4096));
        assert_eq!(check_result(Op::Write, 4096, -libc::EIO, true), Ok(-libc::EIO));
        assert_eq!(check_result(Op::Read, 4096, 0, true), Ok(-libc::EIO));
        assert_eq!(check_result(Op::Read, 4096, 4097, true).unwrap_err().errno(), libc::EINVAL);
        // ops without data complete with 0 whatever positive value is given
        assert_eq!(check_result(Op::Discard, 1 << 20, 1 << 20, true), Ok(0));
        assert_eq!(check_result(Op::Flush, 0, 0, true), Ok(0));
    }

    #[test]
    fn completion_from_another_thread() {
        let s = shared(4);
        let mut c = completion(&s, 2, 7, Op::Read, 4096);
        assert_eq!(c.buf().len(), 4096);
        std::thread::spawn(move || c.complete(4096).unwrap()).join().unwrap();
        assert_eq!(s.posted.take_all(), [(2, 4096)]);
        // the eventfd was written once
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local.
        assert_eq!(unsafe { libc::read(s.eventfd, &mut v as *mut u64 as *mut libc::c_void, 8) }, 8);
        assert_eq!(v, 1);
    }

    /// The eventfd's counter (0 when nothing was written), reset by the read.
    fn take_wakes(s: &QueueShared) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local; the eventfd is non-blocking.
        let n = unsafe { libc::read(s.eventfd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    #[test]
    fn completion_while_the_queue_is_awake_writes_no_eventfd() {
        let s = shared(4);
        s.awake();
        let c = completion(&s, 1, 1, Op::Write, 512);
        std::thread::spawn(move || c.complete(512).unwrap()).join().unwrap();
        assert_eq!(s.posted.take_all(), [(1, 512)]);
        assert_eq!(take_wakes(&s), 0);
        // once the queue may sleep, the next completion wakes it
        s.may_sleep();
        completion(&s, 2, 1, Op::Write, 512).complete(512).unwrap();
        assert_eq!(take_wakes(&s), 1);
    }

    /// Posters race a consumer that sleeps on the eventfd exactly as the
    /// queue thread does (`may_sleep`, take, sleep, `awake`): no completion
    /// is ever left posted while the consumer sleeps. Each poster owns a tag
    /// and posts it again once it was taken, as a worker completes the next
    /// request on a tag only after the queue thread committed the last one.
    #[test]
    fn no_lost_wakeup() {
        use std::sync::atomic::AtomicBool;
        const PER_THREAD: u32 = 20_000;
        let s = shared(3);
        let busy: Arc<Vec<AtomicBool>> = Arc::new((0..3).map(|_| AtomicBool::new(false)).collect());
        let posters: Vec<_> = (0..3u16)
            .map(|tag| {
                let (s, busy) = (s.clone(), busy.clone());
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        while busy[tag as usize].load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                        busy[tag as usize].store(true, Ordering::Relaxed);
                        s.post_quiet(tag, 0);
                        if i % 7 == 0 {
                            std::thread::yield_now();
                        }
                        s.wake();
                    }
                })
            })
            .collect();
        let mut got = 0;
        while got < 3 * PER_THREAD {
            s.may_sleep();
            for (tag, _) in s.posted.take_all() {
                busy[tag as usize].store(false, Ordering::Release);
                got += 1;
            }
            if got == 3 * PER_THREAD {
                break;
            }
            let mut p = libc::pollfd { fd: s.eventfd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd on the stack.
            let r = unsafe { libc::poll(&mut p, 1, 10_000) };
            assert_eq!(r, 1, "asleep for 10 s with {} of {} completions taken: a lost wake-up", got, 3 * PER_THREAD);
            take_wakes(&s);
            s.awake();
        }
        for p in posters {
            p.join().unwrap();
        }
    }

    #[test]
    fn double_and_stale_completion_are_errors() {
        let s = shared(4);
        let c = completion(&s, 1, 3, Op::Write, 512);
        assert_eq!(s.claim(1, 3), Ok(()));
        // the handle's request was already completed (inline by the queue)
        assert_eq!(c.complete(512).unwrap_err().errno(), libc::EALREADY);
        // an older handle for a reused tag
        s.tags[1].store(4 << 2 | PHASE_TARGET, Ordering::Release);
        assert_eq!(s.claim(1, 3).unwrap_err().errno(), libc::ESTALE);
        assert_eq!(s.claim(9, 0).unwrap_err().errno(), libc::EINVAL);
        assert!(s.posted.take_all().is_empty());
    }

    #[test]
    fn oversized_result_fails_the_request_and_dropped_handle_fails_with_eio() {
        let s = shared(2);
        let c = completion(&s, 0, 1, Op::Read, 512);
        assert_eq!(c.complete(513).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(s.posted.take_all(), [(0, -libc::EIO)]);
        let c = completion(&s, 1, 1, Op::Write, 512);
        drop(c);
        assert_eq!(s.posted.take_all(), [(1, -libc::EIO)]);
    }
}
