//! NBD connections: TCP connect plus handshake (blocking, bounded as a
//! whole by a timeout), and reconnection in the background with exponential
//! backoff.

use super::proto::{self, Export};
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if !self.export.is_empty() {
            write!(f, " export '{}'", self.export)?;
        }
        Ok(())
    }
}

/// First backoff delay after a failed reconnect attempt, and the longest.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A socket whose every read and write waits at most until `deadline`:
/// the handshake as a whole is bounded, however the server paces its bytes.
struct Bounded<'a> {
    s: &'a TcpStream,
    deadline: Instant,
}

impl Bounded<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        Ok(left)
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        let mut s = self.s;
        s.read(b)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        let mut s = self.s;
        s.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to `ep` and negotiates the export: for each address, the
/// connect and the whole handshake together must be over within `timeout`
/// (ETIMEDOUT otherwise; resolution aside). The socket is blocking, with
/// TCP_NODELAY.
pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<(OwnedFd, Export)> {
    let addrs: Vec<_> =
        (ep.host.as_str(), ep.port).to_socket_addrs().map_err(|e| Error::new(libc::ENXIO, format!("cannot resolve NBD host '{}': {e}", ep.host)))?.collect();
    let mut last = Error::new(libc::ENXIO, format!("NBD host '{}' has no address", ep.host));
    for a in addrs {
        let deadline = Instant::now() + timeout;
        let s = match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => s,
            Err(e) => {
                last = Error::from_io(e, format!("cannot connect to NBD server {a}"));
                continue;
            }
        };
        s.set_nodelay(true).map_err(|e| Error::from_io(e, "socket options"))?;
        let exp = proto::handshake(&mut Bounded { s: &s, deadline }, &ep.export, deadline).map_err(|e| {
            if matches!(e.errno(), libc::EAGAIN | libc::ETIMEDOUT) {
                Error::new(libc::ETIMEDOUT, format!("NBD handshake with {ep} did not finish within {timeout:?} (a stalled or trickling server)"))
            } else {
                e.context(format!("NBD server {ep}"))
            }
        })?;
        s.set_read_timeout(None).and(s.set_write_timeout(None)).map_err(|e| Error::from_io(e, "socket options"))?;
        return Ok((OwnedFd::from(s), exp));
    }
    Err(last)
}

/// Sends NBD_CMD_DISC on an idle connection, without blocking (best effort).
pub fn say_goodbye(fd: RawFd) {
    let b = proto::encode_disconnect();
    // SAFETY: sends from a local buffer on an fd the caller owns.
    unsafe { libc::send(fd, b.as_ptr() as *const libc::c_void, b.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
}

/// Bytes waiting in a socket's receive queue (0 when it cannot tell).
pub fn readable_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 || n < 0 {
        0
    } else {
        n as usize
    }
}

/// Sets SO_RCVLOWAT: poll reports the socket readable once `n` bytes wait.
pub fn set_rcvlowat(fd: RawFd, n: u32) -> Result<()> {
    let v = n.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: passes one int by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(Error::last_os("setsockopt SO_RCVLOWAT"));
    }
    Ok(())
}

/// Connects, negotiates and leaves at once: what a device is made from.
pub fn probe(ep: &Endpoint, timeout: Duration) -> Result<Export> {
    let (fd, exp) = connect(ep, timeout)?;
    say_goodbye(fd.as_raw_fd());
    Ok(exp)
}

/// The outcome of a background reconnection of connection `index`.
pub struct Reconnected {
    pub index: usize,
    pub fd: OwnedFd,
    pub export: Export,
    pub attempts: u32,
}

/// Decides whether a reconnected export may serve the device (see
/// `Export::check_serves`); its error says why not.
pub type ExportCheck = Arc<dyn Fn(&Export) -> Result<()> + Send + Sync>;

/// Reconnects dropped connections in helper threads (one per dropped
/// connection, until it is back or the reconnector is dropped): connect,
/// handshake and `check` the export, and on failure (a refused export
/// included, so that the backoff keeps growing against a server that
/// comes back changed) wait BACKOFF_MIN, doubling up to BACKOFF_MAX. The
/// queue thread collects the new sockets with `poll` and never blocks.
pub struct Reconnector {
    ep: Arc<Endpoint>,
    timeout: Duration,
    check: ExportCheck,
    tx: Sender<Reconnected>,
    rx: Receiver<Reconnected>,
    stop: Arc<AtomicBool>,
    label: String,
}

impl Reconnector {
    pub fn new(ep: Arc<Endpoint>, timeout: Duration, check: ExportCheck, label: String) -> Reconnector {
        let (tx, rx) = crossbeam_channel::unbounded();
        Reconnector { ep, timeout, check, tx, rx, stop: Arc::new(AtomicBool::new(false)), label }
    }

    /// Starts reconnecting connection `index`.
    pub fn start(&self, index: usize) {
        let (ep, timeout, check, tx, stop) = (self.ep.clone(), self.timeout, self.check.clone(), self.tx.clone(), self.stop.clone());
        let label = format!("{} conn {index}", self.label);
        let spawned = std::thread::Builder::new().name(format!("nbd-reconnect{index}")).spawn(move || {
            let mut delay = BACKOFF_MIN;
            let mut attempts = 0u32;
            let mut last_why = String::new();
            let t0 = Instant::now();
            while !stop.load(Ordering::Acquire) {
                attempts += 1;
                let got = connect(&ep, timeout).and_then(|(fd, export)| match check(&export) {
                    Ok(()) => Ok((fd, export)),
                    Err(e) => {
                        say_goodbye(fd.as_raw_fd());
                        Err(e.context(format!("NBD server {ep}")))
                    }
                });
                match got {
                    Ok((fd, export)) => {
                        eprintln!("ublk nbd: {label}: reconnected to {ep} after {attempts} attempt(s), {:.1}s", t0.elapsed().as_secs_f64());
                        let _ = tx.send(Reconnected { index, fd, export, attempts });
                        return;
                    }
                    // the first failure, each new reason, and every 10th
                    Err(e) => {
                        let why = e.to_string();
                        if attempts == 1 || attempts % 10 == 0 || why != last_why {
                            eprintln!("ublk nbd: {label}: reconnect attempt {attempts} failed: {why}");
                        }
                        last_why = why;
                    }
                }
                let until = Instant::now() + delay;
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
                }
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        });
        if let Err(e) = spawned {
            eprintln!("ublk nbd: {}: cannot start a reconnect thread: {e}", self.label);
        }
    }

    /// Connections that came back since the last call.
    pub fn poll(&self) -> Vec<Reconnected> {
        self.rx.try_iter().collect()
    }

    /// Stops every reconnect attempt (their threads end within ~20 ms, or
    /// after the connect or handshake under way).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Drop for Reconnector {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A minimal NBD server on one accepted socket: the handshake (GO,
    /// structured replies) for an export of `size` bytes, then it waits for
    /// the client to leave.
    fn serve(mut s: TcpStream, size: u64) {
        let mut greet = proto::NBDMAGIC.to_be_bytes().to_vec();
        greet.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greet.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        let reply = |s: &mut TcpStream, opt: u32, typ: u32, data: &[u8]| {
            let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&opt.to_be_bytes());
            v.extend_from_slice(&typ.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
            s.write_all(&v)
        };
        let mut run = || -> std::io::Result<()> {
            s.write_all(&greet)?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            loop {
                let mut h = [0u8; 16];
                s.read_exact(&mut h)?;
                let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                let mut data = vec![0u8; u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize];
                s.read_exact(&mut data)?;
                if opt == proto::OPT_GO {
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&size.to_be_bytes());
                    info.extend_from_slice(&proto::TFLAG_HAS_FLAGS.to_be_bytes());
                    reply(&mut s, opt, proto::REP_INFO, &info)?;
                    reply(&mut s, opt, proto::REP_ACK, &[])?;
                    break;
                }
                reply(&mut s, opt, proto::REP_ACK, &[])?;
            }
            let _ = s.read_to_end(&mut Vec::new());
            Ok(())
        };
        let _ = run();
    }

    fn local(l: &TcpListener) -> Arc<Endpoint> {
        Arc::new(Endpoint { host: "127.0.0.1".into(), port: l.local_addr().unwrap().port(), export: String::new() })
    }

    #[test]
    fn refused_exports_keep_the_backoff_growing() {
        // the server came back smaller: every attempt is refused, and the
        // attempts come 100, 200, 400 ms apart (not every 100 ms)
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = local(&l);
        let server = std::thread::spawn(move || {
            let mut at = Vec::new();
            for _ in 0..4 {
                let (s, _) = l.accept().unwrap();
                at.push(Instant::now());
                std::thread::spawn(move || serve(s, 1 << 20));
            }
            at
        });
        let first = Export { size: 2 << 20, flags: proto::TFLAG_HAS_FLAGS, ..Default::default() };
        let check: ExportCheck = Arc::new(move |e: &Export| e.check_serves(&first, 512, 4096));
        let r = Reconnector::new(ep, Duration::from_secs(5), check, "test".into());
        r.start(0);
        let at = server.join().unwrap();
        r.stop();
        assert!(r.poll().is_empty(), "a refused export was handed over");
        let gaps: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, g) in gaps.iter().enumerate() {
            assert!(*g >= BACKOFF_MIN * (1 << i) * 9 / 10, "gaps {gaps:?}");
        }
    }

    #[test]
    fn reconnect_hands_over_an_export_that_passes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = local(&l);
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve(s, 2 << 20);
        });
        let first = Export { size: 2 << 20, flags: proto::TFLAG_HAS_FLAGS, ..Default::default() };
        let check: ExportCheck = Arc::new(move |e: &Export| e.check_serves(&first, 512, 4096));
        let r = Reconnector::new(ep, Duration::from_secs(5), check, "test".into());
        r.start(3);
        let t0 = Instant::now();
        let got = loop {
            if let Some(rc) = r.poll().pop() {
                break rc;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no reconnection");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!((got.index, got.export.size, got.attempts), (3, 2 << 20, 1));
    }

    #[test]
    fn trickling_server_is_cut_off_at_the_deadline() {
        // a greeting byte every 50 ms, forever: no read waits long, but the
        // handshake as a whole must end within the timeout
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = local(&l);
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for b in proto::NBDMAGIC.to_be_bytes().iter().cycle() {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t0 = Instant::now();
        let e = connect(&ep, Duration::from_millis(400)).unwrap_err();
        assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
        assert!(e.message().contains("did not finish within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
