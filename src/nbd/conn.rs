//! NBD connections: TCP connect plus handshake (blocking, bounded by a
//! timeout), and reconnection in the background with exponential backoff.

use super::proto::{self, Export};
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
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

/// Connects to `ep` and negotiates the export; every step (resolution
/// aside) is bounded by `timeout`. The socket is blocking, with TCP_NODELAY.
pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<(OwnedFd, Export)> {
    let addrs: Vec<_> =
        (ep.host.as_str(), ep.port).to_socket_addrs().map_err(|e| Error::new(libc::ENXIO, format!("cannot resolve NBD host '{}': {e}", ep.host)))?.collect();
    let mut last = Error::new(libc::ENXIO, format!("NBD host '{}' has no address", ep.host));
    for a in addrs {
        let s = match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => s,
            Err(e) => {
                last = Error::from_io(e, format!("cannot connect to NBD server {a}"));
                continue;
            }
        };
        let setup = |s: &TcpStream| s.set_read_timeout(Some(timeout)).and(s.set_write_timeout(Some(timeout))).and(s.set_nodelay(true));
        setup(&s).map_err(|e| Error::from_io(e, "socket options"))?;
        let mut s = s;
        let exp = proto::handshake(&mut s, &ep.export).map_err(|e| {
            if matches!(e.errno(), libc::EAGAIN | libc::ETIMEDOUT) {
                Error::new(libc::ETIMEDOUT, format!("NBD handshake with {ep} timed out after {timeout:?}"))
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

/// Reconnects dropped connections in helper threads (one per dropped
/// connection, until it is back or the reconnector is dropped): connect and
/// handshake, and on failure wait BACKOFF_MIN, doubling up to BACKOFF_MAX.
/// The queue thread collects the new sockets with `poll` and never blocks.
pub struct Reconnector {
    ep: Arc<Endpoint>,
    timeout: Duration,
    tx: Sender<Reconnected>,
    rx: Receiver<Reconnected>,
    stop: Arc<AtomicBool>,
    label: String,
}

impl Reconnector {
    pub fn new(ep: Arc<Endpoint>, timeout: Duration, label: String) -> Reconnector {
        let (tx, rx) = crossbeam_channel::unbounded();
        Reconnector { ep, timeout, tx, rx, stop: Arc::new(AtomicBool::new(false)), label }
    }

    /// Starts reconnecting connection `index`.
    pub fn start(&self, index: usize) {
        let (ep, timeout, tx, stop) = (self.ep.clone(), self.timeout, self.tx.clone(), self.stop.clone());
        let label = format!("{} conn {index}", self.label);
        let spawned = std::thread::Builder::new().name(format!("nbd-reconnect{index}")).spawn(move || {
            let mut delay = BACKOFF_MIN;
            let mut attempts = 0u32;
            let t0 = Instant::now();
            while !stop.load(Ordering::Acquire) {
                attempts += 1;
                match connect(&ep, timeout) {
                    Ok((fd, export)) => {
                        eprintln!("ublk nbd: {label}: reconnected to {ep} after {attempts} attempt(s), {:.1}s", t0.elapsed().as_secs_f64());
                        let _ = tx.send(Reconnected { index, fd, export, attempts });
                        return;
                    }
                    Err(e) if attempts == 1 || attempts % 10 == 0 => eprintln!("ublk nbd: {label}: reconnect attempt {attempts} failed: {e}"),
                    Err(_) => {}
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
