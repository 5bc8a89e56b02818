//! The receive side of a connection: reply headers into the connection's
//! buffer (non-blocking recv(2) first, then the ring), payloads straight
//! into the request buffer through its lease, holes zero-filled.

use super::*;

impl NbdQueue {
    /// Keeps a receive going on `ci`: decodes what arrived, then either
    /// receives more header bytes or a payload. Header bytes are first taken
    /// with a non-blocking recv(2) into this connection's buffer (replies
    /// that are already there cost no ring round trip); only when the socket
    /// is empty does a ring receive wait for them. Right after a ring
    /// receive that found the socket drained, the recv(2) is skipped: with
    /// replies coming one at a time (writes: in one VM run 2730 of 3160
    /// recv(2) calls failed with EAGAIN) it is a wasted system call, and a
    /// ring receive of bytes that are there completes at once anyway.
    pub(super) fn rx_pump(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) {
        let c = &self.conns[ci];
        if c.state != State::Up || c.rx_busy {
            return;
        }
        loop {
            self.culprit = None;
            let ask = match self.rx_step(ctx, ci) {
                Ok(Some(ask)) => ask,
                Ok(None) => return,
                Err(e) => {
                    let culprit = self.culprit.take();
                    return self.conn_fail(ctx, ci, e, culprit);
                }
            };
            let c = &mut self.conns[ci];
            // No READ on the wire: no payload can follow, so this recv may
            // take all there is. (Not the ring receive below: a READ may be
            // sent while it waits, and its payload must not land here.)
            let now = if c.reads_on_wire == 0 { RX_BUF - c.rx_have } else { ask };
            debug_assert!(ask > 0 && c.rx_have + now <= RX_BUF);
            // SAFETY: have + ask <= have + now <= RX_BUF (asks stay within one
            // reply header and body, or the whole buffer when no payload can come).
            let p = unsafe { c.rx.as_mut_ptr().add(c.rx_have) };
            if !std::mem::take(&mut c.rx_dry) {
                // SAFETY: receives into this connection's buffer, inside its bounds.
                let n = unsafe { libc::recv(c.raw(), p as *mut libc::c_void, now, libc::MSG_DONTWAIT) };
                if n > 0 {
                    c.rx_have += n as usize;
                    continue;
                }
                if n == 0 {
                    return self.conn_fail(ctx, ci, Error::new(libc::ECONNRESET, "the server closed the connection"), None);
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {}
                    _ => return self.conn_fail(ctx, ci, Error::from_io(e, "receiving a reply"), None),
                }
            }
            let e = opcode::Recv::new(types::Fd(c.raw()), p, ask as u32).build();
            // SAFETY: the buffer is this connection's and outlives the operation.
            match unsafe { ctx.submit(e, 0, ud(K_RX, ci)) } {
                Ok(()) => {
                    c.rx_busy = true;
                    c.rx_ask = ask;
                    c.ops += 1;
                }
                Err(e) => self.conn_fail(ctx, ci, e, None),
            }
            return;
        }
    }

    /// Decodes the replies received so far. Ok(Some(n)): receive up to n
    /// more header bytes; Ok(None): a payload receive was started.
    pub(super) fn rx_step(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) -> Result<Option<usize>> {
        loop {
            self.culprit = None;
            let c = &self.conns[ci];
            let have = c.rx_have;
            match proto::decode_head(&c.rx[..have], c.structured)? {
                Head::NeedMore(n) => {
                    // structured: up to 28 bytes from a reply's start are never payload
                    let upto = if c.structured { proto::STRUCTURED_SAFE_LEN } else { n };
                    return Ok(Some(upto - have));
                }
                Head::Simple { error, handle } => {
                    let tag = self.lookup(ci, handle)?;
                    self.consume(ci, proto::SIMPLE_LEN);
                    if error != 0 {
                        self.reqs[tag].err = -proto::local_errno(error);
                        self.reply_done(ctx, ci, tag);
                        continue;
                    }
                    if self.reqs[tag].read {
                        if self.conns[ci].structured {
                            return Err(proto::violation("a simple reply without error to a READ, after structured replies were negotiated"));
                        }
                        let len = self.reqs[tag].len;
                        self.reqs[tag].cov.add(0, len)?;
                        self.start_payload(ctx, ci, tag, 0, len, true)?;
                        return Ok(None);
                    }
                    self.reply_done(ctx, ci, tag);
                }
                Head::Chunk { flags, typ, handle, length } => {
                    // the request first: a malformed chunk then fails it
                    // (EIO) instead of leaving it to be sent again
                    let tag = self.lookup(ci, handle)?;
                    let need = proto::CHUNK_LEN + proto::chunk_body_len(flags, typ, length)?;
                    if have < need {
                        return Ok(Some(need - have));
                    }
                    let r = &self.reqs[tag];
                    let body = &self.conns[ci].rx[proto::CHUNK_LEN..need];
                    let ch = proto::decode_chunk(typ, length, body, r.read, r.off, r.len)?;
                    self.consume(ci, need);
                    let done = flags & proto::REPLY_FLAG_DONE != 0;
                    match ch {
                        Chunk::Data { buf_off, len } => {
                            self.reqs[tag].cov.add(buf_off, len)?;
                            self.start_payload(ctx, ci, tag, buf_off, len, done)?;
                            return Ok(None);
                        }
                        Chunk::Hole { buf_off, len } => {
                            self.reqs[tag].cov.add(buf_off, len)?;
                            ctx.lease(tag as u16).read_into(self.zero.as_raw_fd(), 0, buf_off..buf_off + len, ud(K_ZERO, ci))?;
                            self.reqs[tag].ops += 1;
                        }
                        Chunk::Error(e) => {
                            let r = &mut self.reqs[tag];
                            if r.err == 0 {
                                r.err = -e;
                            }
                        }
                        Chunk::None => {}
                    }
                    if done {
                        self.chunks_done(ctx, ci, tag)?;
                    }
                }
            }
        }
    }

    /// The request a reply's handle names: live, sent on this connection,
    /// not answered yet; anything else is a protocol violation.
    pub(super) fn lookup(&mut self, ci: usize, handle: u64) -> Result<usize> {
        let tag = (handle & 0xffff) as usize;
        let seq = handle >> 16;
        let ok = seq <= 0xffff && self.reqs.get(tag).is_some_and(|r| r.live && r.conn == Some(ci) && r.wire && r.seq as u64 == seq && r.result.is_none());
        if !ok {
            return Err(proto::violation(format!("a reply for handle {handle:#x}, which names no request in flight on this connection")));
        }
        self.culprit = Some(tag);
        Ok(tag)
    }

    pub(super) fn consume(&mut self, ci: usize, n: usize) {
        let c = &mut self.conns[ci];
        c.rx.copy_within(n..c.rx_have, 0);
        c.rx_have -= n;
    }

    pub(super) fn start_payload(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: usize, off: u32, len: u32, done: bool) -> Result<()> {
        let fd = self.conns[ci].raw();
        if len > PAYWAIT_MIN && conn::readable_bytes(fd) < len as usize && conn::set_rcvlowat(fd, len.min(PAYWAIT_MAX)).is_ok() {
            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
            // SAFETY: a poll on the connection's socket, no buffer.
            unsafe { ctx.submit(e, 0, ud(K_PAYWAIT, ci)) }?;
            let c = &mut self.conns[ci];
            c.ops += 1;
            c.rx_busy = true;
            c.rx_wait = Some((tag as u16, off, len, done));
            return Ok(());
        }
        self.recv_payload(ctx, ci, tag as u16, off, len, done)
    }

    /// Receives a payload into `tag`'s buffer at `off` through its lease.
    fn recv_payload(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: u16, off: u32, len: u32, done: bool) -> Result<()> {
        let fd = self.conns[ci].raw();
        ctx.lease(tag).recv(fd, off..off + len, ud(K_RXDATA, ci))?;
        let c = &mut self.conns[ci];
        c.ops += 1;
        c.rx_busy = true;
        c.rx_payload = Some((tag, done));
        self.reqs[tag as usize].ops += 1;
        Ok(())
    }

    /// The payload waited for is in the socket (or the connection failed).
    pub(super) fn paywait_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, res: i32) {
        let c = &mut self.conns[ci];
        c.ops -= 1;
        c.rx_busy = false;
        let wait = c.rx_wait.take();
        if c.state != State::Up {
            return self.conn_settle(ctx, ci);
        }
        if wait.is_some() {
            let _ = conn::set_rcvlowat(c.raw(), 1);
        }
        if res < 0 {
            return self.conn_fail(ctx, ci, Error::new(-res, "waiting for read data"), None);
        }
        let Some((tag, off, len, done)) = wait else { return };
        if let Err(e) = self.recv_payload(ctx, ci, tag, off, len, done) {
            self.conn_fail(ctx, ci, e.context("receiving read data"), Some(tag as usize));
        }
    }

    /// The last chunk of a reply arrived (and its payload, if any).
    pub(super) fn chunks_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: usize) -> Result<()> {
        let r = &self.reqs[tag];
        if r.err == 0 && r.read && r.cov.bytes != r.len as u64 {
            return Err(proto::violation(format!("the reply to a {}-byte READ ended after {} bytes", r.len, r.cov.bytes)));
        }
        self.reply_done(ctx, ci, tag);
        Ok(())
    }

    pub(super) fn reply_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: usize) {
        let r = &mut self.reqs[tag];
        r.wire = false;
        r.conn = None;
        let c = &mut self.conns[ci];
        c.on_wire -= 1;
        c.reads_on_wire -= r.read as u32;
        if r.df_refused() {
            // proto.md: a server may refuse a DF read over 64 KiB; the
            // device gives DF up and this read goes again without it
            if !self.no_df.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "ublk nbd: {}: {} refused a {}-byte READ with NBD_CMD_FLAG_DF (EOVERFLOW): READs go without DF from now on",
                    self.label, self.ep, r.len
                );
            }
            r.requeue = true;
            return self.settle(ctx, tag);
        }
        r.result = Some(if r.err < 0 {
            r.err
        } else if r.has_data {
            r.len as i32
        } else {
            0
        });
        self.settle(ctx, tag);
    }

    pub(super) fn rx_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, res: i32) {
        let c = &mut self.conns[ci];
        c.ops -= 1;
        c.rx_busy = false;
        if c.state != State::Up {
            return self.conn_settle(ctx, ci);
        }
        if res <= 0 {
            let e = if res == 0 { Error::new(libc::ECONNRESET, "the server closed the connection") } else { Error::new(-res, "receiving a reply") };
            return self.conn_fail(ctx, ci, e, None);
        }
        c.rx_have += res as usize;
        c.rx_dry = (res as usize) < c.rx_ask;
    }

    pub(super) fn rxdata_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: u16, res: i32) {
        let c = &mut self.conns[ci];
        c.ops -= 1;
        c.rx_busy = false;
        let payload = c.rx_payload.take();
        self.reqs[tag as usize].ops -= 1;
        if c.state != State::Up {
            self.conn_settle(ctx, ci);
            return self.settle(ctx, tag as usize);
        }
        if res < 0 {
            self.conn_fail(ctx, ci, Error::new(-res, "receiving read data"), None);
            return self.settle(ctx, tag as usize);
        }
        if let Some((t, true)) = payload {
            // cannot fail: coverage was checked when the chunk came
            if let Err(e) = self.chunks_done(ctx, ci, t as usize) {
                self.conn_fail(ctx, ci, e, Some(t as usize));
            }
        }
        self.settle(ctx, tag as usize);
    }
}
