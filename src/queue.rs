//! The queue engine: one thread and one io_uring per queue. It FETCHes every
//! tag, hands each request to the target, submits the target's backing IO on
//! the same ring, and COMMIT_AND_FETCHes results, whether they come inline or
//! from other threads (posted per tag, see `posted`, with an eventfd read armed
//! on the ring to wake the thread).

use crate::buf::{DescArray, TagBuffers};
use crate::error::{Error, Result};
use crate::io::{Completion, Io, IoFlags, Op, QueueShared, Request, PHASE_KERNEL, PHASE_TARGET};
use crate::lease::Leases;
use crate::mode::DataMode;
use crate::sys;
use crate::target::Target;
use io_uring::{opcode, squeue, types, IoUring};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// user_data layout: kind in bits 61..63, target data in bits 16..47, tag in 0..15.
/// How long a stopping device's queue lets its target finish the requests
/// it holds before failing them (`Queue::fail_held`).
const STOP_GRACE: Duration = Duration::from_secs(5);

const KIND_SHIFT: u32 = 61;
const KIND_CMD: u64 = 0;
const KIND_BACKING: u64 = 1;
const KIND_WAKE: u64 = 2;
const KIND_CANCEL: u64 = 3;
/// A lease operation (data: its slot in the lease slab).
pub(crate) const KIND_LEASE: u64 = 4;
/// A failed REGISTER/UNREGISTER_IO_BUF (data: the command).
pub(crate) const KIND_BUFCMD: u64 = 5;

pub(crate) fn user_data(kind: u64, tag: u16, data: u32) -> u64 {
    (kind << KIND_SHIFT) | ((data as u64) << 16) | tag as u64
}

/// What a queue thread needs to know to start.
#[derive(Clone)]
pub(crate) struct QueueSetup {
    pub dev_id: u32,
    pub q_id: u16,
    pub depth: u16,
    pub buf_bytes: u32,
    pub logical_block_size: u32,
    pub char_fd: RawFd,
    pub affinity: Vec<usize>,
    pub mode: DataMode,
    /// The device's negotiated `UBLK_F_*` bits.
    pub flags: u64,
    pub force_exit: Arc<AtomicBool>,
}

/// Facts about a queue, given to the target factory.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub dev_id: u32,
    pub queue_id: u16,
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
    /// The device's logical block size in bytes.
    pub logical_block_size: u32,
}

/// Per-tag bookkeeping private to the queue thread.
#[derive(Clone, Copy)]
pub(crate) struct TagLocal {
    pub(crate) seq: u64,
    pub(crate) op: Op,
    pub(crate) flags: IoFlags,
    pub(crate) off: u64,
    pub(crate) len: u32,
}

/// Everything of a queue except the target, so both can be borrowed at once.
pub(crate) struct QueueCore {
    ring: IoUring,
    pub(crate) shared: Arc<QueueShared>,
    pub(crate) bufs: Arc<TagBuffers>,
    descs: DescArray,
    pub(crate) local: Vec<TagLocal>,
    pub(crate) info: QueueInfo,
    pub(crate) char_fd: RawFd,
    /// `char_fd` is the ring's fixed file 0 (saves a file lookup per command).
    char_fixed: bool,
    /// Backing fds the target registered (`QueueCtx::register_fd`): fixed
    /// file `i + 1` is `fixed_fds[i]` (-1: a free slot).
    fixed_fds: Vec<RawFd>,
    /// Slots of the ring's file table after slot 0 (0: no sparse table).
    file_slots: u32,
    pub(crate) mode: DataMode,
    pub(crate) flags: u64,
    pub(crate) leases: Leases,
    /// `/dev/zero`, read into registered buffers to zero-fill after short reads.
    pub(crate) zero_fd: Option<OwnedFd>,
    in_kernel: u32,
    target_owned: u32,
    /// A command came back aborted: the device is stopping (or its queue
    /// quiescing), no more requests come.
    aborted: bool,
    pub(crate) backing_inflight: u32,
    /// Target of the eventfd read (cancelled before the ring goes, see `run`).
    wake_buf: Box<u64>,
    wake_armed: bool,
    force_exit: Arc<AtomicBool>,
}

/// The queue as a target sees it while handling a request or a backing
/// completion: complete requests, defer them to other threads, submit backing IO.
pub struct QueueCtx<'a> {
    pub(crate) core: &'a mut QueueCore,
}

impl QueueCtx<'_> {
    pub fn info(&self) -> &QueueInfo {
        &self.core.info
    }

    /// Completes the request of `tag` now, on the queue thread. While lease
    /// operations on it are in flight the completion waits for them, and if
    /// one of them then fails, the request fails with its error: a result
    /// given before an operation's outcome was known does not vouch for it
    /// (to overrule a failure, complete from the last `lease_done`).
    pub fn complete(&mut self, tag: u16, res: i32) -> Result<()> {
        let seq = self.core.local.get(tag as usize).ok_or_else(|| Error::inval(format!("tag {tag} out of range")))?.seq;
        self.complete_seq(tag, seq, res)
    }

    /// Completes the request `seq` of `tag` (refused if the tag moved on).
    pub(crate) fn complete_seq(&mut self, tag: u16, seq: u64, res: i32) -> Result<()> {
        let c = &mut *self.core;
        let l = *c.local.get(tag as usize).ok_or_else(|| Error::inval(format!("tag {tag} out of range")))?;
        let (res, report) = c.shared.claim_result(l.op, l.len, tag, seq, res)?;
        c.commit(tag, res);
        report
    }

    /// The queue is winding down: the device was stopped (every request is
    /// completed and no more will come) or the queue is forced out. A target
    /// that keeps operations on the ring without a request (a receive on an
    /// idle socket, a timer) must end them now, since the queue exits only
    /// once nothing it submitted is in flight; `Target::batch_end` is the
    /// place to check.
    pub fn is_stopping(&self) -> bool {
        self.core.force_exit.load(Ordering::Acquire) || (self.core.in_kernel == 0 && self.core.target_owned == 0)
    }

    pub(crate) fn shared(&self) -> &Arc<QueueShared> {
        &self.core.shared
    }

    /// Device byte offset and length of the request `tag` currently carries.
    pub fn request_range(&self, tag: u16) -> Option<(u64, u32)> {
        self.core.local.get(tag as usize).map(|l| (l.off, l.len))
    }

    /// Registers `fd` in the queue ring's file table, so that the IO this
    /// queue submits on it (lease operations, fsync, fallocate) skips the
    /// per-operation file lookup and reference counting: what a loop or
    /// mirror target does once per queue for its backing files. `fd` must stay
    /// open while registered (closing it does not unregister it: the ring
    /// keeps the file, and a new file on the same number would not be used);
    /// `unregister_fd` releases it. Registering twice is a no-op. Errors:
    /// EBADF (fd < 0), EOPNOTSUPP (the kernel has no sparse file tables),
    /// ENOSPC (all slots in use); IO on an fd that is not registered works
    /// the same, only without the saving.
    pub fn register_fd(&mut self, fd: RawFd) -> Result<()> {
        let c = &mut *self.core;
        if fd < 0 {
            return Err(Error::new(libc::EBADF, format!("register_fd: bad fd {fd}")));
        }
        if c.fixed_slot(fd).is_some() {
            return Ok(());
        }
        if c.file_slots == 0 {
            return Err(Error::new(libc::EOPNOTSUPP, "register_fd: this kernel's io_uring has no sparse file table"));
        }
        let i = match c.fixed_fds.iter().position(|&f| f < 0) {
            Some(i) => i,
            None if (c.fixed_fds.len() as u32) < c.file_slots => {
                c.fixed_fds.push(-1);
                c.fixed_fds.len() - 1
            }
            None => return Err(Error::new(libc::ENOSPC, format!("register_fd: all {} file slots of the queue ring are in use", c.file_slots))),
        };
        c.ring.submitter().register_files_update(i as u32 + 1, &[fd]).map_err(|e| Error::from_io(e, format!("register_fd: cannot register fd {fd}")))?;
        c.fixed_fds[i] = fd;
        Ok(())
    }

    /// Releases a registration of `register_fd` (operations in flight on it
    /// keep their file until they finish). ENOENT when `fd` is not registered.
    pub fn unregister_fd(&mut self, fd: RawFd) -> Result<()> {
        let c = &mut *self.core;
        let slot = c.fixed_slot(fd).ok_or_else(|| Error::new(libc::ENOENT, format!("unregister_fd: fd {fd} is not registered")))?;
        c.ring.submitter().register_files_update(slot, &[-1]).map_err(|e| Error::from_io(e, format!("unregister_fd: fd {fd}")))?;
        c.fixed_fds[slot as usize - 1] = -1;
        Ok(())
    }

    /// Hands the request to whoever will complete it later, from any thread.
    /// The `Completion` then completes it: lease operations on it no longer
    /// complete it automatically (as after `Lease::complete_manually`), so
    /// its buffer stays the holder's until it does.
    pub fn defer(&mut self, io: Io<'_>) -> Completion {
        if let Some(st) = self.core.leases.state.get_mut(io.tag() as usize) {
            st.manual = true;
        }
        Completion { shared: self.core.shared.clone(), req: io.req, done: false }
    }

    /// fsync / fdatasync of `fd`.
    pub fn fsync(&mut self, tag: u16, fd: RawFd, datasync: bool, data: u32) -> Result<()> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let e = on_fd!(self.core, fd, |f| opcode::Fsync::new(f).flags(flags).build());
        // SAFETY: references no memory.
        unsafe { self.submit(e, tag, data) }
    }

    /// fallocate(fd, mode, off, len).
    pub fn fallocate(&mut self, tag: u16, fd: RawFd, mode: i32, off: u64, len: u64, data: u32) -> Result<()> {
        let e = on_fd!(self.core, fd, |f| opcode::Fallocate::new(f, len).offset(off).mode(mode).build());
        // SAFETY: references no memory.
        unsafe { self.submit(e, tag, data) }
    }

    /// Submits any SQE on the queue ring; its completion comes back as
    /// `backing_complete(tag, data, res)`.
    ///
    /// # Safety
    /// Memory the entry references must stay valid until that completion.
    pub unsafe fn submit(&mut self, entry: squeue::Entry, tag: u16, data: u32) -> Result<()> {
        self.core.push(entry.user_data(user_data(KIND_BACKING, tag, data)))?;
        self.core.backing_inflight += 1;
        Ok(())
    }
}

impl QueueCore {
    /// The fixed-file slot `fd` is registered at (`QueueCtx::register_fd`).
    pub(crate) fn fixed_slot(&self, fd: RawFd) -> Option<u32> {
        if fd < 0 {
            return None;
        }
        self.fixed_fds.iter().position(|&f| f == fd).map(|i| i as u32 + 1)
    }

    pub(crate) fn push(&mut self, e: squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: callers guarantee the memory referenced by `e` stays valid.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(|e| Error::from_io(e, "io_uring submit failed"))?;
        }
    }

    /// A uring_cmd on `/dev/ublkcN` (the ring's fixed file 0 when registered).
    pub(crate) fn char_cmd(&self, op: u32, raw: [u8; 16]) -> opcode::UringCmd16 {
        if self.char_fixed {
            opcode::UringCmd16::new(types::Fixed(0), op).cmd(raw)
        } else {
            opcode::UringCmd16::new(types::Fd(self.char_fd), op).cmd(raw)
        }
    }

    fn io_cmd(&mut self, op: u32, tag: u16, result: i32) {
        // copy mode: the kernel copies into / out of the tag's buffer; the
        // other modes pass no buffer (auto-buf-reg: the table index in sqe->addr)
        let addr = if self.mode == DataMode::Copy { self.bufs.get(tag) as u64 } else { 0 };
        let cmd = sys::ublksrv_io_cmd { q_id: self.info.queue_id, tag, result, addr };
        let mut raw = [0u8; 16];
        // SAFETY: ublksrv_io_cmd is 16 bytes of plain data.
        unsafe { std::ptr::write_unaligned(raw.as_mut_ptr() as *mut sys::ublksrv_io_cmd, cmd) };
        let mut c = self.char_cmd(op, raw);
        if self.mode == DataMode::AutoBufReg {
            c = c.addr(Some(sys::auto_buf_reg_addr(tag, sys::UBLK_AUTO_BUF_REG_FALLBACK)));
        }
        let e = c.build().user_data(user_data(KIND_CMD, tag, 0));
        if let Err(err) = self.push(e) {
            // Cannot happen short of a broken ring; the tag is lost, say so.
            eprintln!("ublk: queue {}: cannot submit command for tag {tag}: {err}", self.info.queue_id);
            return;
        }
        self.in_kernel += 1;
    }

    /// Issues COMMIT_AND_FETCH for a tag whose phase is already DONE, once no
    /// lease operation on its buffer is in flight (until then it waits).
    pub(crate) fn commit(&mut self, tag: u16, res: i32) {
        if self.leases.state[tag as usize].inflight > 0 {
            self.leases.state[tag as usize].pending = Some(res);
            return;
        }
        let res = self.lease_release(tag, res);
        let l = self.local[tag as usize];
        if self.mode == DataMode::Copy && l.op == Op::Read && res > 0 {
            self.shared.stats.copied(res as u64);
        }
        self.shared.tags[tag as usize].store(l.seq << 2 | PHASE_KERNEL, Ordering::Release);
        self.shared.stats.completed(res, l.op.has_data());
        self.target_owned -= 1;
        self.io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, res);
    }

    fn arm_wake(&mut self) -> Result<()> {
        let p = &mut *self.wake_buf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.shared.eventfd), p, 8).build().user_data(user_data(KIND_WAKE, 0, 0));
        self.push(e)?;
        self.wake_armed = true;
        Ok(())
    }
}

/// A queue being served on its own thread.
pub(crate) struct Queue {
    core: QueueCore,
    target: Box<dyn Target>,
}

fn set_affinity(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Free slots of a queue ring's file table for the target's backing files.
const FILE_SLOTS: u32 = 16;

fn new_ring(entries: u32) -> Result<IoUring> {
    let fast = IoUring::builder().setup_single_issuer().setup_defer_taskrun().setup_coop_taskrun().setup_cqsize(entries * 2).build(entries);
    match fast {
        Ok(r) => Ok(r),
        Err(_) => IoUring::builder().setup_cqsize(entries * 2).build(entries).map_err(|e| Error::from_io(e, "cannot create the queue io_uring")),
    }
}

impl Queue {
    /// Sets the queue up on the calling thread (which becomes its daemon):
    /// ring, descriptor map, buffers, target, and a FETCH for every tag.
    pub(crate) fn new(s: &QueueSetup, factory: &crate::target::TargetFactory) -> Result<(Queue, Arc<QueueShared>)> {
        set_affinity(&s.affinity);
        let entries = (s.depth as u32 * 2 + 8).next_power_of_two();
        let ring = new_ring(entries)?;
        // file table: /dev/ublkcN at 0, then FILE_SLOTS free slots for the
        // target's backing files (QueueCtx::register_fd); older kernels
        // without sparse tables get only the char device
        let sub = ring.submitter();
        let (char_fixed, file_slots) = if sub.register_files_sparse(FILE_SLOTS + 1).is_ok() {
            if sub.register_files_update(0, &[s.char_fd]).is_ok() {
                (true, FILE_SLOTS)
            } else {
                let _ = sub.unregister_files();
                (sub.register_files(&[s.char_fd]).is_ok(), 0)
            }
        } else {
            (sub.register_files(&[s.char_fd]).is_ok(), 0)
        };
        let descs = DescArray::map(s.char_fd, s.q_id, s.depth)?;
        let bufs = Arc::new(if s.mode.has_tag_buffers() { TagBuffers::new(s.depth, s.buf_bytes)? } else { TagBuffers::none() });
        let mut zero_fd = None;
        if s.mode.is_zero_copy() {
            // a slot per tag (index = tag) in the ring's buffer table
            ring.submitter()
                .register_buffers_sparse(s.depth as u32)
                .map_err(|e| Error::from_io(e, format!("queue {}: cannot register the buffer table", s.q_id)))?;
            let f = std::fs::File::open("/dev/zero").map_err(|e| Error::from_io(e, "cannot open /dev/zero"))?;
            zero_fd = Some(OwnedFd::from(f));
        }
        // SAFETY: eventfd has no memory preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::last_os("cannot create an eventfd"));
        }
        let shared = Arc::new(QueueShared {
            q_id: s.q_id,
            tags: (0..s.depth).map(|_| std::sync::atomic::AtomicU64::new(PHASE_KERNEL)).collect(),
            posted: crate::posted::Posted::new(s.depth),
            eventfd: efd,
            wake_pending: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            partial_reads: s.mode == DataMode::Copy,
            stats: Default::default(),
            _bufs: bufs.clone(),
        });
        let info = QueueInfo { dev_id: s.dev_id, queue_id: s.q_id, depth: s.depth, max_io_bytes: s.buf_bytes, logical_block_size: s.logical_block_size };
        let target = factory(&info).map_err(|e| e.context(format!("target setup of queue {}", s.q_id)))?;
        let mut core = QueueCore {
            ring,
            shared: shared.clone(),
            bufs,
            descs,
            local: vec![TagLocal { seq: 0, op: Op::Read, flags: IoFlags(0), off: 0, len: 0 }; s.depth as usize],
            info,
            char_fd: s.char_fd,
            char_fixed,
            fixed_fds: Vec::new(),
            file_slots,
            mode: s.mode,
            flags: s.flags,
            leases: Leases::new(s.depth),
            zero_fd,
            in_kernel: 0,
            target_owned: 0,
            aborted: false,
            backing_inflight: 0,
            wake_buf: Box::new(0),
            wake_armed: false,
            force_exit: s.force_exit.clone(),
        };
        core.arm_wake()?;
        for tag in 0..s.depth {
            core.io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0);
        }
        core.ring.submit().map_err(|e| Error::from_io(e, format!("queue {}: submitting FETCH failed", s.q_id)))?;
        Ok((Queue { core, target }, shared))
    }

    fn done(&self) -> bool {
        let c = &self.core;
        if c.backing_inflight > 0 {
            return false;
        }
        c.force_exit.load(Ordering::Acquire) || (c.in_kernel == 0 && c.target_owned == 0)
    }

    /// Serves until every tag is aborted (device stopped) or a forced exit.
    pub(crate) fn run(mut self) -> Result<()> {
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(256);
        // when the device was seen stopping with requests still in the target
        let mut held_since: Option<Instant> = None;
        loop {
            self.before_sleep();
            if self.done() {
                break;
            }
            let stopping = self.core.aborted || self.core.shared.stopping.load(Ordering::Acquire);
            let r = if stopping && self.core.target_owned > 0 {
                // STOP_DEV waits for every request in flight: one the target
                // never completes (a stuck worker, a dead backend) would hold
                // the stop until its timeout, then the queue is forced out
                let since = *held_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STOP_GRACE {
                    // (their commits wait for lease operations in flight: so
                    // this may come again, finding nothing new to fail)
                    self.fail_held();
                }
                let ts = types::Timespec::new().nsec(100_000_000);
                self.core.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            } else {
                self.core.ring.submit_and_wait(1)
            };
            match r {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ETIME)) => {}
                Err(e) => return Err(Error::from_io(e, format!("queue {}: io_uring_enter failed", self.core.info.queue_id))),
            }
            // Awake: completions posted from now on are drained by the next
            // `before_sleep`, without an eventfd write.
            self.core.shared.awake();
            cqes.clear();
            cqes.extend(self.core.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.dispatch(ud, res);
            }
            let mut ctx = QueueCtx { core: &mut self.core };
            self.target.batch_end(&mut ctx);
        }
        self.disarm_wake();
        Ok(())
    }

    /// The device is stopping and the target has held its requests for
    /// STOP_GRACE: fails each of them with EIO (after its lease operations,
    /// as any completion), so the stop goes on. The target's own completion
    /// of one later gets EALREADY (or ESTALE, ESHUTDOWN), like a second one.
    fn fail_held(&mut self) {
        let c = &mut self.core;
        let mut n = 0;
        for tag in 0..c.local.len() as u16 {
            if c.shared.claim(tag, c.local[tag as usize].seq).is_ok() {
                c.commit(tag, -libc::EIO);
                n += 1;
            }
        }
        if n > 0 {
            eprintln!("ublk: queue {}: the device is stopping: failed {n} request(s) the target still held after {} s", c.info.queue_id, STOP_GRACE.as_secs());
        }
    }

    /// Takes the completions other threads posted, before the thread may
    /// sleep in the ring. From the fence on, a thread posting another one
    /// sees `wake_pending` false and writes the eventfd (`QueueShared::wake`):
    /// so while the thread is awake, completions cost no wake-up at all
    /// (workers on other CPUs that finish while it serves the ring).
    fn before_sleep(&mut self) {
        self.core.shared.may_sleep();
        let c = &mut self.core;
        for w in 0..c.shared.posted.words() {
            for tag in crate::posted::tags(w, c.shared.posted.take_word(w)) {
                let res = c.shared.posted.result(tag);
                c.commit(tag, res);
            }
        }
    }

    /// Cancels the armed eventfd read and reaps it, so the ring never holds
    /// a read into `wake_buf` once the queue is gone.
    fn disarm_wake(&mut self) {
        let c = &mut self.core;
        if !c.wake_armed {
            return;
        }
        let e = opcode::AsyncCancel::new(user_data(KIND_WAKE, 0, 0)).build().user_data(user_data(KIND_CANCEL, 0, 0));
        if c.push(e).is_err() {
            return;
        }
        for _ in 0..100 {
            if c.ring.submit_and_wait(1).is_err() {
                break;
            }
            let reaped: Vec<u64> = c.ring.completion().map(|q| q.user_data()).collect();
            if reaped.iter().any(|&ud| ud >> KIND_SHIFT == KIND_WAKE) {
                c.wake_armed = false;
                return;
            }
        }
        // Could not confirm: keep the buffer alive rather than risk a write.
        std::mem::forget(std::mem::take(&mut c.wake_buf));
    }

    fn dispatch(&mut self, ud: u64, res: i32) {
        let tag = (ud & 0xffff) as u16;
        match ud >> KIND_SHIFT {
            KIND_CMD => {
                self.core.in_kernel -= 1;
                if res == sys::UBLK_IO_RES_OK {
                    self.start_io(tag);
                } else if res == sys::UBLK_IO_RES_ABORT {
                    self.core.aborted = true;
                } else {
                    eprintln!("ublk: queue {} tag {tag}: command failed: {}", self.core.info.queue_id, Error::new(-res, "FETCH/COMMIT"));
                }
            }
            KIND_BACKING => {
                self.core.backing_inflight -= 1;
                let data = ((ud >> 16) & 0xffff_ffff) as u32;
                let mut ctx = QueueCtx { core: &mut self.core };
                self.target.backing_complete(&mut ctx, tag, data, res);
            }
            KIND_LEASE => {
                self.core.backing_inflight -= 1;
                let idx = ((ud >> 16) & 0xffff_ffff) as u32;
                if let Some((tag, data, res)) = self.core.lease_cqe(idx, res) {
                    let mut ctx = QueueCtx { core: &mut self.core };
                    self.target.lease_done(&mut ctx, tag, data, res);
                    self.core.lease_settle(tag);
                }
            }
            KIND_BUFCMD => self.core.buf_cmd_failed(tag, ((ud >> 16) & 0xffff_ffff) as u32, res),
            KIND_WAKE => {
                // what was posted is taken by the next `before_sleep`
                self.core.wake_armed = false;
                if !self.core.force_exit.load(Ordering::Acquire) {
                    if let Err(e) = self.core.arm_wake() {
                        eprintln!("ublk: queue {}: {e}", self.core.info.queue_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn start_io(&mut self, tag: u16) {
        let c = &mut self.core;
        let d = c.descs.get(tag);
        let op = Op::from_raw(d.op());
        let len = d.nr_sectors.saturating_mul(512);
        let seq = c.local[tag as usize].seq + 1;
        let flags = IoFlags(d.op_flags & !0xff);
        c.local[tag as usize] = TagLocal { seq, op, flags, off: d.start_sector << 9, len };
        c.leases.state[tag as usize].need_reg = d.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0;
        c.shared.tags[tag as usize].store(seq << 2 | PHASE_TARGET, Ordering::Release);
        c.shared.stats.started();
        c.target_owned += 1;
        // Only copy mode has the data in memory; the other modes lease it.
        let buf = if c.mode == DataMode::Copy { c.bufs.get(tag) } else { std::ptr::null_mut() };
        if c.mode == DataMode::Copy && op == Op::Write {
            c.shared.stats.copied(len as u64);
        }
        let req = Request { tag, q_id: c.info.queue_id, op, flags, offset: d.start_sector << 9, len, buf, seq };
        let io = Io { req, _marker: std::marker::PhantomData };
        let mut ctx = QueueCtx { core: c };
        self.target.handle_io(&mut ctx, io);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.core.shared.closed.store(true, Ordering::Release);
    }
}
