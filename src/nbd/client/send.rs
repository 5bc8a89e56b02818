//! The send side of a connection: batches of request headers (non-blocking
//! send(2) first, then the ring), each WRITE's payload straight from the
//! request buffer through its lease.

use super::*;

impl NbdQueue {
    /// Sends batches of headers on `ci` while its send chain is idle: each
    /// batch ends at a WRITE, whose payload the lease then sends.
    pub(super) fn tx_kick(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) {
        let no_df = self.no_df.load(Ordering::Relaxed);
        loop {
            let c = &mut self.conns[ci];
            if c.state != State::Up || c.tx_busy || c.sendq.is_empty() {
                return;
            }
            let mut n = 0;
            c.tx_payload = None;
            while n < TX_BATCH {
                let Some(tag) = c.sendq.pop_front() else { break };
                let r = &mut self.reqs[tag as usize];
                r.seq = r.seq.wrapping_add(1);
                r.wire = true;
                c.on_wire += 1;
                c.reads_on_wire += r.read as u32;
                let (off, len) = if r.cmd == proto::CMD_FLUSH { (0, 0) } else { (r.off, r.len) };
                r.df = r.cmd == proto::CMD_READ && c.df && !no_df;
                let flags = if r.df { r.flags | proto::CMD_FLAG_DF } else { r.flags };
                proto::encode_request(&mut c.tx[n * proto::REQUEST_LEN..(n + 1) * proto::REQUEST_LEN], flags, r.cmd, handle(tag, r.seq), off, len);
                n += 1;
                if r.cmd == proto::CMD_WRITE {
                    r.tx_pending = true;
                    c.tx_payload = Some(tag);
                    break;
                }
            }
            c.tx_len = n * proto::REQUEST_LEN;
            c.tx_done = 0;
            c.tx_busy = true;
            match self.send_headers(ctx, ci) {
                Ok(true) => {
                    if !self.headers_sent(ctx, ci) {
                        return;
                    }
                }
                Ok(false) => return,
                Err(e) => return self.conn_fail(ctx, ci, e, None),
            }
        }
    }

    /// Sends the rest of the header batch: first with non-blocking send(2)
    /// (Ok(true): all of it went), then, for what the socket did not take,
    /// with a ring send (Ok(false)).
    pub(super) fn send_headers(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) -> Result<bool> {
        let c = &mut self.conns[ci];
        let more = if c.tx_payload.is_some() { libc::MSG_MORE } else { 0 };
        while c.tx_done < c.tx_len {
            let p = c.tx[c.tx_done..].as_ptr();
            // SAFETY: sends from this connection's buffer, inside its bounds.
            let n = unsafe { libc::send(c.raw(), p as *const libc::c_void, c.tx_len - c.tx_done, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | more) };
            if n > 0 {
                c.tx_done += n as usize;
                continue;
            }
            if n == 0 {
                return Err(Error::new(libc::EPIPE, "sending request headers"));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => break,
                _ => return Err(Error::from_io(e, "sending request headers")),
            }
        }
        if c.tx_done == c.tx_len {
            return Ok(true);
        }
        let p = c.tx[c.tx_done..].as_ptr();
        let e = opcode::Send::new(types::Fd(c.raw()), p, (c.tx_len - c.tx_done) as u32).flags(libc::MSG_NOSIGNAL | more).build();
        // SAFETY: the buffer is this connection's, kept (boxed) until the
        // operation completes: a connection is replaced only once idle.
        unsafe { ctx.submit(e, 0, ud(K_TX, ci)) }?;
        c.ops += 1;
        Ok(false)
    }

    /// The header batch is out: sends the WRITE payload that follows it, if
    /// any. True when the send chain is idle again.
    pub(super) fn headers_sent(&mut self, ctx: &mut QueueCtx<'_>, ci: usize) -> bool {
        let c = &mut self.conns[ci];
        let Some(tag) = c.tx_payload else {
            c.tx_busy = false;
            return true;
        };
        let (fd, len) = (c.raw(), self.reqs[tag as usize].len);
        match ctx.lease(tag).send(fd, 0..len, ud(K_TXDATA, ci)) {
            Ok(()) => {
                self.conns[ci].ops += 1;
                self.reqs[tag as usize].ops += 1;
            }
            Err(e) => self.conn_fail(ctx, ci, e.context("sending write data"), Some(tag as usize)),
        }
        false
    }

    pub(super) fn tx_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, res: i32) {
        let c = &mut self.conns[ci];
        c.ops -= 1;
        if c.state != State::Up {
            return self.conn_settle(ctx, ci);
        }
        if res <= 0 {
            let e = Error::new(if res < 0 { -res } else { libc::EPIPE }, "sending request headers");
            return self.conn_fail(ctx, ci, e, None);
        }
        c.tx_done += res as usize;
        match self.send_headers(ctx, ci) {
            Ok(true) => {
                self.headers_sent(ctx, ci);
            }
            Ok(false) => {}
            Err(e) => self.conn_fail(ctx, ci, e, None),
        }
    }

    pub(super) fn txdata_done(&mut self, ctx: &mut QueueCtx<'_>, ci: usize, tag: u16, res: i32) {
        self.conns[ci].ops -= 1;
        self.reqs[tag as usize].ops -= 1;
        if self.conns[ci].state != State::Up {
            self.conn_settle(ctx, ci);
            return self.settle(ctx, tag as usize);
        }
        let c = &mut self.conns[ci];
        c.tx_payload = None;
        c.tx_busy = false;
        self.reqs[tag as usize].tx_pending = false;
        if res < 0 {
            self.conn_fail(ctx, ci, Error::new(-res, "sending write data"), None);
        }
        self.settle(ctx, tag as usize);
    }
}
