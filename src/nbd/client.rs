//! The NBD client of one ublk queue: a [`Target`] that sends each request
//! to the export on one of the queue's connections and completes it from
//! the reply.
//!
//! Per connection there is one send chain and one receive state machine,
//! since io_uring orders nothing between operations in flight on one stream
//! socket:
//! - send: a batch of request headers (from this target's memory) in one
//!   send, then, when the batch ends with a WRITE, its payload straight from
//!   the request buffer (`Lease::send`); then the next batch;
//! - receive: reply headers into this target's memory (a simple reply is 16
//!   bytes, a structured chunk 20 plus its fixed body), then an OFFSET_DATA
//!   payload (or a simple READ reply's) straight into the right range of the
//!   request buffer (`Lease::recv`), the request found by the reply's handle.
//!   Holes are zero-filled from /dev/zero; ERROR chunks (of any error type,
//!   known or not) fail the request and keep the connection.
//!
//! Everything from the server is checked (see `proto`); a violation fails
//! the request it concerns with EIO (when there is one) and drops the
//! connection. Dropped connections come back through [`Reconnector`]
//! (backoff 100 ms doubling to 5 s); the requests that were on them, and
//! those that arrive meanwhile, are re-sent on a connection that is up (NBD
//! requests are idempotent). Each request fails with EIO once `timeout` has
//! passed since it arrived, and a connection with a request past that
//! deadline is dropped: the device never waits forever. A reconnected
//! export must still serve the device as the first handshake described it
//! (`Export::check_serves`: size, writability, FLUSH/FUA/TRIM/WRITE_ZEROES,
//! block sizes); one that does not counts as a failed attempt, and the
//! backoff goes on growing.
//!
//! Durability across a reconnect: a FLUSH covers the writes the server
//! acknowledged on the connection it is sent on, as the server holds them
//! then. A server that restarted (or lost its cache) between a write's
//! acknowledgement and the next FLUSH has lost that write, and the FLUSH
//! after the reconnect cannot bring it back nor tell: such writes are not
//! re-sent. The kernel's NBD client has the same limit; a server that must
//! not lose acknowledged writes has to write them through (or offer no
//! FLUSH, and so no volatile cache).
//!
//! READs go with NBD_CMD_FLAG_DF when the server offers it. proto.md lets a
//! server refuse a DF read over 64 KiB with EOVERFLOW; such a read is sent
//! again without DF, and the device's READs (every queue, every later
//! connection) go without DF from then on.
//!
//! All state changes happen in the completion callbacks; `batch_end` then
//! pumps every connection (next send batch, next receive), so the headers
//! of the requests that arrived together go out in one send.

mod recv;
mod send;
#[cfg(test)]
mod tests;

use super::conn::{self, Endpoint, ExportCheck, Reconnector};
use super::proto::{self, Chunk, Coverage, Export, Head};
use crate::error::{Error, Result};
use crate::io::{Io, Op};
use crate::queue::QueueCtx;
use crate::target::Target;
use io_uring::{opcode, types};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// the kind of an operation, in the top byte of its user value (the rest is
// the connection index)
const K_TX: u32 = 1;
const K_RX: u32 = 2;
const K_TICK: u32 = 3;
const K_TXDATA: u32 = 4;
const K_RXDATA: u32 = 5;
const K_ZERO: u32 = 6;
const K_PAYWAIT: u32 = 7;

fn ud(kind: u32, ci: usize) -> u32 {
    kind << 24 | ci as u32
}

/// Payloads longer than this are received in one piece: when not all of it
/// is in the socket yet, a poll with SO_RCVLOWAT (up to PAYWAIT_MAX) waits
/// for it first, as a blocking MSG_WAITALL receive would.
const PAYWAIT_MIN: u32 = 16 << 10;
const PAYWAIT_MAX: u32 = 256 << 10;
/// Request headers per send.
const TX_BATCH: usize = 32;
const RX_BUF: usize = proto::CHUNK_LEN + proto::MAX_ERROR_BODY as usize + 16;
/// Timer period while a connection is down, and while requests are in flight.
const TICK_DOWN: Duration = Duration::from_millis(100);
const TICK_BUSY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    /// Shut down; waiting for its operations to finish before it is closed.
    Draining,
    /// Closed; being reconnected.
    Down,
}

/// One TCP connection to the export.
pub(crate) struct Conn {
    fd: Option<OwnedFd>,
    state: State,
    structured: bool,
    /// READs may go with NBD_CMD_FLAG_DF (structured replies and the server
    /// offers it), unless the device gave DF up (`NbdQueue::no_df`).
    df: bool,
    /// 0: not tried, 1: in the ring's file table, 2: registration failed.
    reg: u8,
    /// Operations on the socket in flight.
    ops: u32,
    sendq: VecDeque<u16>,
    /// Requests whose header went out and whose reply is not complete.
    on_wire: u32,
    /// The READs among them: while there are none, no payload can arrive and
    /// header receives may take as many bytes as the buffer holds.
    reads_on_wire: u32,
    tx: Box<[u8]>,
    tx_len: usize,
    tx_done: usize,
    tx_busy: bool,
    /// The WRITE whose payload follows the header batch in flight.
    tx_payload: Option<u16>,
    rx: Box<[u8]>,
    rx_have: usize,
    rx_busy: bool,
    /// Bytes the ring receive in flight asked for.
    rx_ask: usize,
    /// The last ring receive got less than it asked for: the socket was
    /// empty then, so the next receive goes to the ring directly (a
    /// non-blocking recv(2) would most likely fail with EAGAIN).
    rx_dry: bool,
    /// A payload being received: (tag, the chunk had the DONE flag).
    rx_payload: Option<(u16, bool)>,
    /// A large payload whose bytes are not all in the socket yet: (tag, off,
    /// len, done). A poll waits (with SO_RCVLOWAT) until they are, so that
    /// one receive takes the whole payload instead of a piece per wakeup.
    /// SO_RCVLOWAT is raised on the socket while it is Some.
    rx_wait: Option<(u16, u32, u32, bool)>,
}

impl Conn {
    pub(crate) fn new(fd: OwnedFd, e: &Export) -> Conn {
        Conn {
            fd: Some(fd),
            state: State::Up,
            structured: e.structured,
            df: e.structured && e.has(proto::TFLAG_SEND_DF),
            reg: 0,
            ops: 0,
            sendq: VecDeque::new(),
            on_wire: 0,
            reads_on_wire: 0,
            tx: vec![0u8; TX_BATCH * proto::REQUEST_LEN].into_boxed_slice(),
            tx_len: 0,
            tx_done: 0,
            tx_busy: false,
            tx_payload: None,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_have: 0,
            rx_busy: false,
            rx_ask: 0,
            rx_dry: false,
            rx_payload: None,
            rx_wait: None,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Leaves for good: NBD_CMD_DISC when nothing is being sent (a header
    /// batch or WRITE payload half sent would have the DISC bytes spliced
    /// into it), then the socket shut down so that its operations end.
    fn leave(&mut self) {
        if !self.tx_busy {
            conn::say_goodbye(self.raw());
        }
        // SAFETY: shutdown on a socket this connection owns.
        unsafe { libc::shutdown(self.raw(), libc::SHUT_RDWR) };
        self.state = State::Draining;
    }
}

/// A request of the queue, by tag.
#[derive(Default)]
struct Req {
    /// The target owns it.
    live: bool,
    read: bool,
    has_data: bool,
    cmd: u16,
    flags: u16,
    off: u64,
    len: u32,
    /// Part of the handle: tells a reply to this attempt from stale ones.
    seq: u16,
    /// The connection it is queued or sent on.
    conn: Option<usize>,
    /// Its header went out on `conn`.
    wire: bool,
    /// In the waiting list (no connection up).
    waiting: bool,
    /// Lease operations in flight (payload, zero fill).
    ops: u32,
    /// Its payload is next in its connection's send chain.
    tx_pending: bool,
    /// The reply is complete: the result.
    result: Option<i32>,
    /// First error chunk of the reply.
    err: i32,
    /// First failed zero fill.
    local_err: i32,
    cov: Coverage,
    deadline: Option<Instant>,
    /// Its connection dropped: send it again once its operations are over.
    requeue: bool,
    /// A FUA write to a server without FUA: a FLUSH follows the write.
    fua_flush: bool,
    /// Sent with NBD_CMD_FLAG_DF.
    df: bool,
}

impl Req {
    /// A READ sent with DF that the server refused with EOVERFLOW (proto.md
    /// allows that over 64 KiB): it must go again without DF.
    fn df_refused(&self) -> bool {
        self.read && self.df && self.err == -libc::EOVERFLOW
    }
}

/// The target of one queue.
pub struct NbdQueue {
    ep: Arc<Endpoint>,
    export: Export,
    timeout: Duration,
    conns: Vec<Conn>,
    reqs: Vec<Req>,
    waiting: VecDeque<u16>,
    active: u32,
    zero: File,
    recon: Reconnector,
    /// Set once a server refused a DF read: shared by the device's queues.
    no_df: Arc<AtomicBool>,
    tick: Box<types::Timespec>,
    tick_armed: bool,
    stopped: bool,
    /// The request a protocol violation concerns (failed with EIO, not re-sent).
    culprit: Option<usize>,
    label: String,
}

fn handle(tag: u16, seq: u16) -> u64 {
    (seq as u64) << 16 | tag as u64
}

impl NbdQueue {
    /// `check` decides whether a reconnected export may be used, `no_df` is
    /// the device's "READs without DF" flag.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        ep: Arc<Endpoint>,
        export: Export,
        timeout: Duration,
        check: ExportCheck,
        no_df: Arc<AtomicBool>,
        conns: Vec<Conn>,
        depth: u16,
        label: String,
    ) -> Result<NbdQueue> {
        let zero = File::open("/dev/zero").map_err(|e| Error::from_io(e, "cannot open /dev/zero"))?;
        let hs_timeout = timeout.min(Duration::from_secs(10));
        Ok(NbdQueue {
            recon: Reconnector::new(ep.clone(), hs_timeout, check, label.clone()),
            no_df,
            ep,
            export,
            timeout,
            conns,
            reqs: (0..depth).map(|_| Req::default()).collect(),
            waiting: VecDeque::new(),
            active: 0,
            zero,
            tick: Box::new(types::Timespec::new()),
            tick_armed: false,
            stopped: false,
            culprit: None,
            label,
        })
    }

    /// Maps a ublk request to an NBD command and queues it.
    fn start(&mut self, ctx: &mut QueueCtx<'_>, io: &Io<'_>) -> Result<()> {
        let e = self.export;
        let tag = io.tag();
        let (cmd, flags, fua_flush) = match io.op() {
            Op::Read => (proto::CMD_READ, 0, false),
            Op::Write if e.has(proto::TFLAG_READ_ONLY) => return Err(Error::new(libc::EROFS, "read-only export")),
            Op::Write if io.flags().fua() && e.has(proto::TFLAG_SEND_FUA) => (proto::CMD_WRITE, proto::CMD_FLAG_FUA, false),
            Op::Write => (proto::CMD_WRITE, 0, io.flags().fua() && e.has(proto::TFLAG_SEND_FLUSH)),
            Op::Flush if e.has(proto::TFLAG_SEND_FLUSH) => (proto::CMD_FLUSH, 0, false),
            Op::Flush => return ctx.complete(tag, 0),
            Op::Discard if e.has(proto::TFLAG_SEND_TRIM) => (proto::CMD_TRIM, 0, false),
            Op::WriteZeroes if e.has(proto::TFLAG_SEND_WRITE_ZEROES) => {
                (proto::CMD_WRITE_ZEROES, if io.flags().nounmap() { proto::CMD_FLAG_NO_HOLE } else { 0 }, false)
            }
            op => return Err(Error::new(libc::EOPNOTSUPP, format!("{op:?} is not offered by the export"))),
        };
        if io.op().has_data() {
            ctx.lease(tag).complete_manually()?;
        }
        let r = &mut self.reqs[tag as usize];
        let (seq, mut cov) = (r.seq, std::mem::take(&mut r.cov));
        cov.clear();
        *r = Req {
            live: true,
            read: io.op() == Op::Read,
            has_data: io.op().has_data(),
            cmd,
            flags,
            off: io.offset(),
            len: io.len(),
            seq,
            cov,
            deadline: Some(Instant::now() + self.timeout),
            fua_flush,
            ..Default::default()
        };
        self.active += 1;
        self.enqueue(tag);
        Ok(())
    }

    /// Queues a request on the least busy connection that is up, or in the
    /// waiting list when none is.
    fn enqueue(&mut self, tag: u16) {
        let best = self.conns.iter().enumerate().filter(|(_, c)| c.state == State::Up).min_by_key(|(_, c)| c.sendq.len() as u32 + c.on_wire).map(|(i, _)| i);
        let r = &mut self.reqs[tag as usize];
        r.conn = best;
        match best {
            Some(ci) => self.conns[ci].sendq.push_back(tag),
            None => {
                r.waiting = true;
                self.waiting.push_back(tag);
            }
        }
    }

    /// Completes, re-sends or leaves a request, as its state allows.
    fn settle(&mut self, ctx: &mut QueueCtx<'_>, tag: usize) {
        let r = &mut self.reqs[tag];
        if !r.live || r.ops > 0 || r.tx_pending {
            return;
        }
        if let Some(mut res) = r.result {
            if res >= 0 && r.local_err < 0 {
                res = r.local_err;
            }
            if res >= 0 && r.fua_flush && r.cmd == proto::CMD_WRITE {
                // the write is done: its FLUSH makes it durable
                r.cmd = proto::CMD_FLUSH;
                r.flags = 0;
                r.result = None;
                self.enqueue(tag as u16);
                return;
            }
            r.live = false;
            self.active -= 1;
            let _ = ctx.complete(tag as u16, res);
        } else if r.requeue {
            r.requeue = false;
            r.cov.clear();
            r.err = 0;
            r.local_err = 0;
            if r.deadline.is_some_and(|d| Instant::now() >= d) {
                r.result = Some(-libc::EIO);
                self.settle(ctx, tag);
            } else {
                self.enqueue(tag as u16);
            }
        }
    }

    /// Drops connection `ci`: shuts the socket down (its operations finish),
    /// takes its requests back for re-sending (except `culprit`, which fails
    /// with EIO) and, once nothing is in flight on it, closes and reconnects it.
    fn conn_fail(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, why: Error, culprit: Option<usize>) {
        let c = &mut self.conns[ci];
        if c.state != State::Up {
            return;
        }
        if !self.stopped {
            eprintln!(
                "ublk nbd: {} conn {ci}: dropping the connection to {}: {why}; reconnecting (its requests are sent again; any request fails with EIO {}s after it arrived)",
                self.label,
                self.ep,
                self.timeout.as_secs_f64()
            );
        }
        c.state = State::Draining;
        // SAFETY: shutdown on a socket this connection owns.
        unsafe { libc::shutdown(c.raw(), libc::SHUT_RDWR) };
        c.sendq.clear();
        c.on_wire = 0;
        c.reads_on_wire = 0;
        let mut affected = Vec::new();
        for (tag, r) in self.reqs.iter_mut().enumerate() {
            if r.live && r.conn == Some(ci) && r.result.is_none() {
                r.conn = None;
                r.wire = false;
                if Some(tag) == culprit {
                    r.result = Some(-libc::EIO);
                } else {
                    r.requeue = true;
                }
                affected.push(tag);
            }
        }
        self.conn_settle(ctx, ci);
        for tag in affected {
            self.settle(ctx, tag);
        }
    }

    /// A draining connection with nothing in flight: closed, and reconnected.
    fn conn_settle(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) {
        let c = &mut self.conns[ci];
        if c.state != State::Draining || c.ops > 0 {
            return;
        }
        if c.reg == 1 {
            let _ = ctx.unregister_fd(c.raw());
        }
        c.fd = None;
        c.state = State::Down;
        c.reg = 0;
        c.rx_have = 0;
        c.rx_busy = false;
        c.rx_dry = false;
        c.rx_payload = None;
        c.rx_wait = None;
        c.tx_busy = false;
        let payload = c.tx_payload.take();
        if !self.stopped {
            self.recon.start(ci);
        }
        if let Some(t) = payload {
            self.reqs[t as usize].tx_pending = false;
            self.settle(ctx, t as usize);
        }
    }

    /// Takes back reconnected sockets (their exports passed the reconnector's
    /// check); the waiting requests go out on them.
    fn adopt_reconnected(&mut self) {
        for rc in self.recon.poll() {
            let i = rc.index;
            if self.stopped || i >= self.conns.len() || self.conns[i].state != State::Down {
                continue;
            }
            self.conns[i] = Conn::new(rc.fd, &rc.export);
            for tag in std::mem::take(&mut self.waiting) {
                self.reqs[tag as usize].waiting = false;
                self.enqueue(tag);
            }
        }
    }

    /// Fails requests past their deadline; drops connections that hold one.
    fn check_deadlines(&mut self, ctx: &mut QueueCtx<'_>) {
        let now = Instant::now();
        let mut late_conns = Vec::new();
        let mut expired = 0;
        for tag in 0..self.reqs.len() {
            let r = &mut self.reqs[tag];
            if !r.live || r.result.is_some() || r.deadline.map_or(true, |d| now < d) {
                continue;
            }
            if let Some(ci) = r.conn {
                if !late_conns.contains(&ci) {
                    late_conns.push(ci);
                }
            } else if r.waiting {
                r.waiting = false;
                r.result = Some(-libc::EIO);
                self.waiting.retain(|&t| t as usize != tag);
                expired += 1;
                self.settle(ctx, tag);
            }
        }
        if expired > 0 {
            eprintln!("ublk nbd: {}: {expired} request(s) failed with EIO: no connection to {} within {}s", self.label, self.ep, self.timeout.as_secs_f64());
        }
        for ci in late_conns {
            let why = Error::new(libc::ETIMEDOUT, format!("a request got no reply within {}s", self.timeout.as_secs_f64()));
            self.conn_fail(ctx, ci, why, None);
        }
    }

    fn ensure_tick(&mut self, ctx: &mut QueueCtx<'_>) {
        if self.stopped || self.tick_armed {
            return;
        }
        let down = self.conns.iter().any(|c| c.state != State::Up);
        if !down && self.active == 0 {
            return;
        }
        let p = if down { TICK_DOWN } else { TICK_BUSY };
        *self.tick = types::Timespec::new().sec(p.as_secs()).nsec(p.subsec_nanos());
        let e = opcode::Timeout::new(&*self.tick as *const types::Timespec).build();
        // SAFETY: the timespec lives in this target, which outlives its operations.
        if unsafe { ctx.submit(e, 0, ud(K_TICK, 0)) }.is_ok() {
            self.tick_armed = true;
        }
    }

    /// The device is going away: say goodbye where no send is under way,
    /// shut every socket down so that the standing receives end, and stop
    /// reconnecting.
    fn stop_all(&mut self) {
        self.stopped = true;
        self.recon.stop();
        for c in &mut self.conns {
            if c.state == State::Up {
                c.leave();
            }
        }
    }
}

impl Target for NbdQueue {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        if let Err(e) = self.start(ctx, &io) {
            let _ = ctx.complete(io.tag(), e.neg_errno());
        }
    }

    fn backing_complete(&mut self, ctx: &mut QueueCtx<'_>, _tag: u16, data: u32, res: i32) {
        let ci = (data & 0xff_ffff) as usize;
        match data >> 24 {
            K_TX => self.tx_done(ctx, ci, res),
            K_RX => self.rx_done(ctx, ci, res),
            K_PAYWAIT => self.paywait_done(ctx, ci, res),
            K_TICK => {
                self.tick_armed = false;
                if !self.stopped {
                    self.check_deadlines(ctx);
                }
            }
            _ => {}
        }
    }

    fn lease_done(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        let ci = (data & 0xff_ffff) as usize;
        match data >> 24 {
            K_TXDATA => self.txdata_done(ctx, ci, tag, res),
            K_RXDATA => self.rxdata_done(ctx, ci, tag, res),
            K_ZERO => {
                let r = &mut self.reqs[tag as usize];
                r.ops -= 1;
                if res < 0 && r.local_err == 0 {
                    r.local_err = res;
                }
                self.settle(ctx, tag as usize);
            }
            _ => {}
        }
    }

    fn batch_end(&mut self, ctx: &mut QueueCtx<'_>) {
        if self.stopped {
            return;
        }
        if ctx.is_stopping() {
            return self.stop_all();
        }
        self.adopt_reconnected();
        for ci in 0..self.conns.len() {
            let c = &mut self.conns[ci];
            if c.state == State::Up && c.reg == 0 {
                c.reg = if ctx.register_fd(c.raw()).is_ok() { 1 } else { 2 };
            }
            self.tx_kick(ctx, ci);
            self.rx_pump(ctx, ci);
        }
        self.ensure_tick(ctx);
    }
}
