//! `nbd`: a device served from a remote NBD export (qemu-nbd, nbdkit,
//! nbd-server...). [`NbdConfig`] says where the export is; `probe` connects
//! once to learn its size and flags, `configure` turns those into the
//! device's parameters, and `factory` makes each queue's client (its own
//! `connections` TCP connections, see `crate::nbd::client` for the data path
//! and the reconnect policy).
//!
//! ```no_run
//! use ublk::{Device, DeviceConfig, targets::nbd::NbdConfig};
//! let nbd = NbdConfig { host: "127.0.0.1".into(), port: 10809, ..Default::default() };
//! let export = nbd.probe()?;
//! let mut cfg = DeviceConfig::default();
//! nbd.configure(&export, &mut cfg)?;
//! let mut dev = Device::new(cfg)?;
//! dev.start(nbd.factory(export))?;
//! dev.serve_until_signal()?;
//! # Ok::<(), ublk::Error>(())
//! ```

use crate::config::{DeviceConfig, DiscardLimits};
use crate::error::{Error, Result};
use crate::nbd::client::{Conn, NbdQueue};
use crate::nbd::conn::{self, Endpoint, ExportCheck};
use crate::nbd::proto::{self, Export};
use crate::queue::QueueInfo;
use crate::target::{Target, TargetFactory};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use crate::nbd::proto::Export as NbdExport;

/// The NBD port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// Default bound on how long a request may wait for its reply, reconnects included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections per queue.
pub const MAX_CONNECTIONS: u16 = 16;

/// Where the export is and how to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    pub host: String,
    pub port: u16,
    /// Export name ("" is the server's default export).
    pub export: String,
    /// TCP connections per queue (1..=16).
    pub connections: u16,
    /// A request not answered this long after it arrived fails with EIO
    /// (it is re-sent meanwhile when its connection drops and comes back);
    /// also bounds each connect together with its whole handshake (at most
    /// 10 s). At least 1 s.
    pub timeout: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig { host: String::new(), port: DEFAULT_PORT, export: String::new(), connections: 1, timeout: DEFAULT_TIMEOUT }
    }
}

impl NbdConfig {
    pub fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::inval("nbd: no host given"));
        }
        if self.port == 0 {
            return Err(Error::inval("nbd: port 0 is invalid"));
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(Error::inval(format!("nbd: connections {} must be 1..={MAX_CONNECTIONS}", self.connections)));
        }
        if self.timeout < Duration::from_secs(1) {
            return Err(Error::inval("nbd: the timeout must be at least 1 s (the device must never wait forever, nor fail at once)"));
        }
        if self.export.len() > 4096 {
            return Err(Error::inval("nbd: export name longer than 4096 bytes"));
        }
        Ok(())
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint { host: self.host.clone(), port: self.port, export: self.export.clone() }
    }

    fn handshake_timeout(&self) -> Duration {
        self.timeout.min(Duration::from_secs(10))
    }

    /// Connects once, negotiates, disconnects: the export's size and flags.
    /// Errors: ECONNREFUSED & co (unreachable), ENXIO (unknown host), ENOENT
    /// (no such export), EOPNOTSUPP (no fixed newstyle, TLS required),
    /// EPROTO (not speaking NBD properly), ETIMEDOUT.
    pub fn probe(&self) -> Result<Export> {
        self.validate()?;
        conn::probe(&self.endpoint(), self.handshake_timeout())
    }

    /// Sets the device's size and parameters from the export: size (rounded
    /// down to the logical block size), read-only, rotational, volatile
    /// cache (FLUSH/FUA) when the server takes FLUSH, discard when it takes
    /// TRIM, write-zeroes when it takes WRITE_ZEROES, block sizes and the
    /// largest request from its block-size constraints; records the target
    /// arguments (`ublk recover` rebuilds the target from them). Refuses
    /// several connections (queues x connections) to a server that does not
    /// allow them (no NBD_FLAG_CAN_MULTI_CONN: a FLUSH on one connection
    /// would not cover the writes of the others), and an export whose
    /// minimum block size is over a page or whose maximum payload is under
    /// one (ublk requests can be a page long, whatever the device's limits).
    pub fn configure(&self, e: &Export, cfg: &mut DeviceConfig) -> Result<()> {
        self.validate()?;
        let total = cfg.queues as u32 * self.connections as u32;
        if total > 1 && !e.has(proto::TFLAG_CAN_MULTI_CONN) && !e.has(proto::TFLAG_READ_ONLY) {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "the NBD server does not allow several connections to this export (no NBD_FLAG_CAN_MULTI_CONN), and {} queue(s) x {} connection(s) need {total}: use --queues 1 --connections 1",
                    cfg.queues, self.connections
                ),
            ));
        }
        if let Some((min, _pref, max)) = e.block_sizes {
            let page = crate::buf::page_size() as u32;
            if min > page {
                return Err(Error::new(libc::EOPNOTSUPP, format!("the export's minimum block size {min} is larger than a page")));
            }
            if max < page {
                return Err(Error::new(
                    libc::EOPNOTSUPP,
                    format!("the export's maximum payload {max} bytes is smaller than a page ({page} bytes): ublk cannot keep requests that small"),
                ));
            }
            cfg.logical_block_size = cfg.logical_block_size.max(min);
            cfg.physical_block_size = cfg.physical_block_size.max(cfg.logical_block_size);
            cfg.max_io_bytes = cfg.max_io_bytes.min(max / page * page);
        }
        let lbs = cfg.logical_block_size as u64;
        cfg.size = e.size / lbs * lbs;
        if cfg.size == 0 {
            return Err(Error::inval(format!("the NBD export is empty ({} bytes)", e.size)));
        }
        if e.has(proto::TFLAG_READ_ONLY) {
            cfg.read_only = true;
        }
        cfg.rotational = e.has(proto::TFLAG_ROTATIONAL);
        cfg.volatile_cache = e.has(proto::TFLAG_SEND_FLUSH);
        let trim = e.has(proto::TFLAG_SEND_TRIM);
        let zeroes = e.has(proto::TFLAG_SEND_WRITE_ZEROES);
        cfg.discard = (trim || zeroes).then(|| {
            let d = DiscardLimits::default();
            let g = e.block_sizes.map_or(d.granularity, |(min, pref, _)| pref.max(min).clamp(512, 1 << 20));
            DiscardLimits {
                granularity: g,
                max_discard_sectors: if trim { d.max_discard_sectors } else { 0 },
                max_write_zeroes_sectors: if zeroes { d.max_write_zeroes_sectors } else { 0 },
            }
        });
        cfg.target_name = "nbd".into();
        cfg.target_args.retain(|(k, _)| !matches!(k.as_str(), "host" | "port" | "export" | "connections" | "timeout_ms"));
        cfg.target_args.extend(self.target_args());
        Ok(())
    }

    /// The state-file record of this configuration.
    pub fn target_args(&self) -> Vec<(String, String)> {
        vec![
            ("host".into(), self.host.clone()),
            ("port".into(), self.port.to_string()),
            ("export".into(), self.export.clone()),
            ("connections".into(), self.connections.to_string()),
            ("timeout_ms".into(), self.timeout.as_millis().to_string()),
        ]
    }

    /// The configuration recorded in a device's state file (recovery).
    pub fn from_device(cfg: &DeviceConfig) -> Result<NbdConfig> {
        let get = |k: &str| cfg.target_arg(k).ok_or_else(|| Error::inval(format!("the state file has no nbd '{k}'")));
        let num = |k: &str| -> Result<u64> { get(k)?.parse().map_err(|_| Error::inval(format!("the state file's nbd '{k}' is invalid"))) };
        let n = NbdConfig {
            host: get("host")?.to_string(),
            port: u16::try_from(num("port")?).map_err(|_| Error::inval("the state file's nbd 'port' is invalid"))?,
            export: get("export")?.to_string(),
            connections: u16::try_from(num("connections")?).map_err(|_| Error::inval("the state file's nbd 'connections' is invalid"))?,
            timeout: Duration::from_millis(num("timeout_ms")?),
        };
        n.validate()?;
        Ok(n)
    }

    /// What a device made by [`configure`](Self::configure) needs of its
    /// export, rebuilt from the device's configuration (recovery: the first
    /// handshake's export is not recorded): its size, the commands it was
    /// set up to send (FLUSH for a volatile cache, TRIM for discard,
    /// WRITE_ZEROES), and whether it was writable. FUA is not required: a
    /// FUA write goes as a write and a FLUSH to a server without it.
    pub fn device_needs(cfg: &DeviceConfig) -> Export {
        let mut flags = proto::TFLAG_HAS_FLAGS;
        let d = cfg.discard.unwrap_or(DiscardLimits { granularity: 0, max_discard_sectors: 0, max_write_zeroes_sectors: 0 });
        for (on, f) in [
            (cfg.read_only, proto::TFLAG_READ_ONLY),
            (cfg.volatile_cache, proto::TFLAG_SEND_FLUSH),
            (d.max_discard_sectors > 0, proto::TFLAG_SEND_TRIM),
            (d.max_write_zeroes_sectors > 0, proto::TFLAG_SEND_WRITE_ZEROES),
        ] {
            if on {
                flags |= f;
            }
        }
        Export { size: cfg.size, flags, structured: false, block_sizes: None }
    }

    /// The target factory of a device being recovered (`cfg` from its state
    /// file): the export is probed and must still serve the device as it was
    /// set up (EIO otherwise: smaller, read-only under a writable device, a
    /// command the device sends no longer offered, block sizes its requests
    /// break; EOPNOTSUPP when its queues x connections are no longer
    /// allowed), before any queue connects.
    pub fn recovery_factory(&self, cfg: &DeviceConfig) -> Result<TargetFactory> {
        let export = self.probe()?;
        let mut fresh = cfg.clone();
        self.configure(&export, &mut fresh)?;
        export.check_serves(&Self::device_needs(cfg), cfg.logical_block_size, cfg.max_io_bytes)?;
        Ok(self.factory(export))
    }

    /// The target of each queue: `connections` connections made on the
    /// queue thread (a failure fails the device's start), each checked
    /// against `export` as every later reconnection is
    /// (`Export::check_serves`: not smaller, not read-only, the commands
    /// the device sends still offered, block sizes its requests fit).
    pub fn factory(&self, export: Export) -> TargetFactory {
        let me = self.clone();
        let ep = Arc::new(self.endpoint());
        // one per device: once a server refuses a DF read, no queue sends DF
        let no_df = Arc::new(AtomicBool::new(false));
        Arc::new(move |q: &QueueInfo| -> Result<Box<dyn Target>> {
            let (lbs, max_io) = (q.logical_block_size, q.max_io_bytes);
            let check: ExportCheck = Arc::new(move |e: &Export| e.check_serves(&export, lbs, max_io));
            let mut conns = Vec::new();
            for _ in 0..me.connections {
                let (fd, e) = conn::connect(&ep, me.handshake_timeout())?;
                if let Err(err) = check(&e) {
                    conn::say_goodbye(std::os::fd::AsRawFd::as_raw_fd(&fd));
                    return Err(err.context(format!("NBD server {ep}")));
                }
                conns.push(Conn::new(fd, &e));
            }
            let label = format!("ublk{} q{}", q.dev_id, q.queue_id);
            Ok(Box::new(NbdQueue::new(ep.clone(), export, me.timeout, check, no_df.clone(), conns, q.depth, label)?) as Box<dyn Target>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(flags: u16) -> Export {
        Export { size: (1 << 30) + 100, flags: proto::TFLAG_HAS_FLAGS | flags, structured: true, block_sizes: None }
    }

    #[test]
    fn device_needs_what_it_was_set_up_with() {
        let n = NbdConfig { host: "h".into(), ..Default::default() };
        let all = proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
        let mut c = DeviceConfig::default();
        n.configure(&export(all), &mut c).unwrap();
        let needs = NbdConfig::device_needs(&c);
        let (lbs, max) = (c.logical_block_size, c.max_io_bytes);
        // the same export, or one offering more, serves the device
        export(all).check_serves(&needs, lbs, max).unwrap();
        export(all | proto::TFLAG_CAN_MULTI_CONN).check_serves(&needs, lbs, max).unwrap();
        // without FUA: FUA writes go as write + FLUSH
        export(all & !proto::TFLAG_SEND_FUA).check_serves(&needs, lbs, max).unwrap();
        // a command the device sends, gone; read-only; smaller
        for lost in [proto::TFLAG_SEND_FLUSH, proto::TFLAG_SEND_TRIM, proto::TFLAG_SEND_WRITE_ZEROES] {
            assert_eq!(export(all & !lost).check_serves(&needs, lbs, max).unwrap_err().errno(), libc::EIO, "{lost:#x}");
        }
        assert_eq!(export(all | proto::TFLAG_READ_ONLY).check_serves(&needs, lbs, max).unwrap_err().errno(), libc::EIO);
        let small = Export { size: c.size - 512, ..export(all) };
        assert_eq!(small.check_serves(&needs, lbs, max).unwrap_err().errno(), libc::EIO);
        // a device set up read-only without commands needs none of them
        let mut ro = DeviceConfig::default();
        n.configure(&export(proto::TFLAG_READ_ONLY), &mut ro).unwrap();
        export(proto::TFLAG_READ_ONLY).check_serves(&NbdConfig::device_needs(&ro), lbs, max).unwrap();
    }

    #[test]
    fn configure_maps_flags() {
        let n = NbdConfig { host: "h".into(), ..Default::default() };
        let mut c = DeviceConfig::default();
        n.configure(&export(proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM), &mut c).unwrap();
        assert_eq!(c.size, 1 << 30);
        assert!(c.volatile_cache && !c.read_only);
        let d = c.discard.unwrap();
        assert!(d.max_discard_sectors > 0 && d.max_write_zeroes_sectors == 0);
        assert_eq!(c.target_arg("host"), Some("h"));
        assert_eq!(NbdConfig::from_device(&c).unwrap(), n);

        let mut c = DeviceConfig::default();
        n.configure(&export(proto::TFLAG_READ_ONLY), &mut c).unwrap();
        assert!(c.read_only && !c.volatile_cache && c.discard.is_none());

        // several connections need CAN_MULTI_CONN
        let n2 = NbdConfig { connections: 2, ..n.clone() };
        let mut c = DeviceConfig::default();
        assert_eq!(n2.configure(&export(0), &mut c).unwrap_err().errno(), libc::EOPNOTSUPP);
        n2.configure(&export(proto::TFLAG_CAN_MULTI_CONN), &mut c).unwrap();

        // block sizes
        let mut e = export(0);
        e.block_sizes = Some((4096, 4096, 1 << 20));
        let mut c = DeviceConfig { max_io_bytes: 4 << 20, ..Default::default() };
        n.configure(&e, &mut c).unwrap();
        assert_eq!((c.logical_block_size, c.max_io_bytes), (4096, 1 << 20));
        e.size = 100;
        assert!(n.configure(&e, &mut DeviceConfig::default()).is_err());

        // a maximum payload under a page: refused, ublk cannot keep requests that small
        let page = crate::buf::page_size() as u32;
        let mut e = export(0);
        for max in [512, 2048, page - 1] {
            e.block_sizes = Some((512, 512, max));
            let err = n.configure(&e, &mut DeviceConfig::default()).unwrap_err();
            assert_eq!(err.errno(), libc::EOPNOTSUPP);
            assert!(err.message().contains("maximum payload"), "{err}");
        }
        // exactly a page, or a bit more: requests of a page (rounded down)
        e.block_sizes = Some((512, 512, page + 512));
        let mut c = DeviceConfig::default();
        n.configure(&e, &mut c).unwrap();
        assert_eq!(c.max_io_bytes, page);
    }

    #[test]
    fn validation() {
        let ok = NbdConfig { host: "h".into(), ..Default::default() };
        ok.validate().unwrap();
        assert!(NbdConfig { host: String::new(), ..ok.clone() }.validate().is_err());
        assert!(NbdConfig { port: 0, ..ok.clone() }.validate().is_err());
        assert!(NbdConfig { connections: 0, ..ok.clone() }.validate().is_err());
        assert!(NbdConfig { connections: 17, ..ok.clone() }.validate().is_err());
        assert!(NbdConfig { timeout: Duration::from_millis(10), ..ok.clone() }.validate().is_err());
    }

    #[test]
    fn probe_errors() {
        // nothing listens on this port of the loopback: refused, not a hang
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let n = NbdConfig { host: "127.0.0.1".into(), port, ..Default::default() };
        assert_eq!(n.probe().unwrap_err().errno(), libc::ECONNREFUSED);
        // a server that greets with garbage
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n");
        });
        let n = NbdConfig { host: "127.0.0.1".into(), port, ..Default::default() };
        assert_eq!(n.probe().unwrap_err().errno(), libc::EPROTO);
        t.join().unwrap();
    }
}
