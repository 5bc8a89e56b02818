//! A disk served over stream sockets with leases: the request buffers go
//! straight to and from the sockets (`Lease::send` / `Lease::recv`), zero
//! copy where the kernel allows. The "remote" side is a thread per queue
//! keeping the blocks in memory, at the other end of one socket pair per tag
//! (so each socket carries one request at a time, in order).
//!
//! ```text
//! netdisk [--size S] [--queues N] [--depth D] [--zero-copy MODE]
//! ```
//!
//! Protocol per request: a 16-byte header (op, length, offset) written by the
//! queue thread, then
//! - READ: the remote sends `length` bytes, received into the request buffer;
//! - WRITE: the request buffer is sent, the remote stores it and answers one
//!   byte (0 = stored); the request completes only after that answer (the
//!   target completes it itself: `Lease::complete_manually`).
//!
//! Prints `<id> <path>` when serving, serves until SIGINT/SIGTERM, then prints
//! the data mode and counters (`copied_bytes`, `lease_ops`) on stderr.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use ublk::{Device, DeviceConfig, Io, Op, QueueCtx, QueueInfo, Target, ZeroCopy};

const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
/// `data` of the ack receive (lease operations use 0).
const ACK: u32 = 1;

fn header(op: u32, len: u32, off: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&op.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&off.to_le_bytes());
    h
}

/// The remote: serves the other ends of a queue's sockets from `store`.
fn remote(socks: Vec<UnixStream>, store: Arc<parking_lot::Mutex<Vec<u8>>>) {
    let mut socks = socks;
    let mut pfds: Vec<libc::pollfd> = socks.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut buf = Vec::new();
    loop {
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for (i, p) in pfds.iter_mut().enumerate() {
            if p.revents == 0 {
                continue;
            }
            p.revents = 0;
            let s = &mut socks[i];
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).is_err() {
                return; // the server closed its ends: done
            }
            let op = u32::from_le_bytes(h[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let off = u64::from_le_bytes(h[8..16].try_into().unwrap()) as usize;
            buf.resize(len, 0);
            let ok = match op {
                OP_READ => {
                    buf.copy_from_slice(&store.lock()[off..off + len]);
                    s.write_all(&buf).is_ok()
                }
                OP_WRITE => {
                    let ok = s.read_exact(&mut buf).is_ok();
                    if ok {
                        store.lock()[off..off + len].copy_from_slice(&buf);
                    }
                    ok && s.write_all(&[0]).is_ok()
                }
                _ => false,
            };
            if !ok {
                return;
            }
        }
    }
}

struct NetTarget {
    /// The server's end of each tag's socket pair.
    socks: Vec<OwnedFd>,
    /// Where each tag's write acknowledgement is received.
    acks: Box<[u8]>,
    /// The tag's request is a WRITE (it waits for an acknowledgement).
    writing: Vec<bool>,
}

impl NetTarget {
    fn send_header(&self, tag: u16, h: &[u8; 16]) -> ublk::Result<()> {
        // The tag's socket is idle (one request per tag at a time): 16 bytes
        // go into its empty send buffer at once.
        // SAFETY: writes 16 bytes from a local to an fd we own.
        let n = unsafe { libc::send(self.socks[tag as usize].as_raw_fd(), h.as_ptr() as *const libc::c_void, 16, libc::MSG_NOSIGNAL) };
        if n != 16 {
            return Err(ublk::Error::new(libc::EIO, "header send failed"));
        }
        Ok(())
    }

    fn fd(&self, tag: u16) -> RawFd {
        self.socks[tag as usize].as_raw_fd()
    }
}

impl Target for NetTarget {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        let (tag, len, off) = (io.tag(), io.len(), io.offset());
        self.writing[tag as usize] = io.op() == Op::Write;
        let r = match io.op() {
            Op::Read => self.send_header(tag, &header(OP_READ, len, off)).and_then(|_| ctx.lease(tag).recv(self.fd(tag), 0..len, 0)),
            Op::Write => self.send_header(tag, &header(OP_WRITE, len, off)).and_then(|_| {
                let mut l = ctx.lease(tag);
                l.complete_manually()?;
                l.send(self.fd(tag), 0..len, 0)
            }),
            Op::Flush => ctx.complete(tag, 0),
            _ => Err(ublk::Error::new(libc::EOPNOTSUPP, "unsupported op")),
        };
        if let Err(e) = r {
            let _ = ctx.complete(tag, e.neg_errno());
        }
    }

    /// The WRITE's data went out: wait for the remote's acknowledgement.
    fn lease_done(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, _data: u32, res: i32) {
        // a READ completes by itself (with the first error, if any)
        if !self.writing[tag as usize] {
            return;
        }
        if res < 0 {
            let _ = ctx.complete(tag, res);
            return;
        }
        let p = &mut self.acks[tag as usize] as *mut u8;
        let e = io_uring::opcode::Recv::new(io_uring::types::Fd(self.fd(tag)), p, 1).build();
        // SAFETY: the ack byte lives in self.acks, which outlives the queue's ops.
        if let Err(e) = unsafe { ctx.submit(e, tag, ACK) } {
            let _ = ctx.complete(tag, e.neg_errno());
        }
    }

    fn backing_complete(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, _data: u32, res: i32) {
        let ok = res == 1 && self.acks[tag as usize] == 0;
        let len = ctx.request_range(tag).map_or(0, |(_, l)| l as i32);
        let _ = ctx.complete(
            tag,
            if ok {
                len
            } else if res < 0 {
                res
            } else {
                -libc::EIO
            },
        );
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("netdisk: {msg}\nusage: netdisk [--size S] [--queues N] [--depth D] [--zero-copy MODE]");
    std::process::exit(2);
}

fn main() {
    let (mut size, mut queues, mut depth, mut zc) = (64u64 << 20, 1u16, 32u16, ZeroCopy::Auto);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--size" => size = v().trim_end_matches('M').parse::<u64>().map(|m| m << 20).unwrap_or_else(|_| usage("--size takes MiB, e.g. 64M")),
            "--queues" => queues = v().parse().unwrap_or_else(|_| usage("bad --queues")),
            "--depth" => depth = v().parse().unwrap_or_else(|_| usage("bad --depth")),
            "--zero-copy" => zc = v().parse().unwrap_or_else(|e: ublk::Error| usage(e.message())),
            _ => usage(&format!("unknown option {a}")),
        }
    }
    let cfg = DeviceConfig { size, queues, depth, zero_copy: zc, volatile_cache: true, target_name: "netdisk".into(), ..Default::default() };
    if let Err(e) = cfg.validate() {
        usage(&e.to_string());
    }
    let _ = ublk::block_stop_signals();
    let store = Arc::new(parking_lot::Mutex::new(vec![0u8; size as usize]));
    let mut dev = Device::new(cfg).unwrap_or_else(|e| {
        eprintln!("netdisk: {e}");
        std::process::exit(1)
    });
    let factory = Arc::new(move |q: &QueueInfo| -> ublk::Result<Box<dyn Target>> {
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..q.depth {
            let (a, b) = UnixStream::pair().map_err(|e| ublk::Error::from_io(e, "socketpair"))?;
            // SAFETY: into_raw_fd hands over ownership of a valid fd.
            mine.push(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(a)) });
            theirs.push(b);
        }
        let st = store.clone();
        std::thread::Builder::new()
            .name(format!("netdisk-remote{}", q.queue_id))
            .spawn(move || remote(theirs, st))
            .map_err(|e| ublk::Error::from_io(e, "spawn"))?;
        Ok(Box::new(NetTarget { socks: mine, acks: vec![0u8; q.depth as usize].into_boxed_slice(), writing: vec![false; q.depth as usize] }))
    });
    if let Err(e) = dev.start(factory) {
        eprintln!("netdisk: {e}");
        std::process::exit(1);
    }
    println!("{} {}", dev.id(), dev.block_path().display());
    let _ = std::io::stdout().flush();
    let r = dev.serve_until_signal();
    let (mut ios, mut copied, mut leases, mut errors) = (0, 0, 0, 0);
    for s in dev.stats() {
        ios += s.ios;
        copied += s.copied_bytes;
        leases += s.lease_ops;
        errors += s.errors;
    }
    eprintln!("netdisk: device {} stopped: mode={} ios={ios} errors={errors} copied_bytes={copied} lease_ops={leases}", dev.id(), dev.data_mode());
    let r = r.and(dev.delete());
    if let Err(e) = r {
        eprintln!("netdisk: {e}");
        std::process::exit(1);
    }
}
