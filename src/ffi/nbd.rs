//! C ABI: devices served by the built-in NBD client (`ublk add nbd`).

use super::device::{to_config, ublk_dev, ublk_dev_config, wrap_builtin};
use super::{guard, null_err, opt_str};
use crate::error::Error;
use crate::targets::nbd::{NbdConfig, DEFAULT_PORT, DEFAULT_TIMEOUT};
use crate::Device;
use std::ffi::{c_char, c_int};
use std::time::Duration;

/// Where an NBD export is, for `ublk_nbd_dev_new`. Initialise with
/// `ublk_nbd_config_init()` (defaults), then set fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ublk_nbd_config {
    /// Server host name or address. Required. Borrowed during the call.
    pub host: *const c_char,
    /// Export name; NULL or "" is the server's default export. Borrowed.
    pub export_name: *const c_char,
    /// TCP port. Default 10809.
    pub port: u16,
    /// TCP connections per queue (1..=16). Default 1.
    pub connections: u16,
    /// A request not answered this long after it arrived fails with EIO
    /// (a dropped connection is reconnected meanwhile and its requests are
    /// sent again). Also bounds each connect and handshake (at most 10 s).
    /// At least 1000. Default 30000.
    pub timeout_ms: u32,
    /// Must stay zero.
    pub reserved: [u64; 4],
}

/// Fills `*nbd` with the defaults. Any thread.
#[no_mangle]
pub extern "C" fn ublk_nbd_config_init(nbd: *mut ublk_nbd_config) -> c_int {
    guard(|| {
        if nbd.is_null() {
            return Err(null_err("nbd"));
        }
        let c = ublk_nbd_config {
            host: std::ptr::null(),
            export_name: std::ptr::null(),
            port: DEFAULT_PORT,
            connections: 1,
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u32,
            reserved: [0; 4],
        };
        // SAFETY: nbd is non-null and points to a ublk_nbd_config (documented).
        unsafe { nbd.write(c) };
        Ok(0)
    })
}

/// Creates a device served by the built-in NBD client: connects to the
/// export once to learn its size and flags, then ADD_DEV & co as
/// `ublk_dev_new`. The device's size is the export's (`cfg->size` must be 0),
/// and read-only, FLUSH/FUA, discard and write-zeroes follow the export;
/// `cfg->target_name` and `cfg->target_args` are replaced ("nbd" and the
/// export's address, recorded for `ublk recover`). `cfg` NULL: the defaults
/// of `ublk_dev_config_init`. Serve it with `ublk_dev_start` or
/// `ublk_dev_serve` (each queue then opens `connections` TCP connections),
/// free it with `ublk_dev_free`; `*out` owns the new device.
///
/// Errors: -EINVAL (bad configuration), -ECONNREFUSED & co (server
/// unreachable), -ENXIO (unknown host), -ENOENT (no such export),
/// -EOPNOTSUPP (server without fixed newstyle, TLS required, or several
/// connections to a server that does not allow them), -EPROTO (the server
/// does not speak NBD properly), -ETIMEDOUT, and those of `ublk_dev_new`.
/// Any thread.
#[no_mangle]
pub extern "C" fn ublk_nbd_dev_new(cfg: *const ublk_dev_config, nbd: *const ublk_nbd_config, out: *mut *mut ublk_dev) -> c_int {
    guard(|| {
        // SAFETY: non-null pointers to the documented types.
        let nbd = *unsafe { nbd.as_ref() }.ok_or_else(|| null_err("nbd"))?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        if nbd.reserved.iter().any(|&r| r != 0) {
            return Err(Error::inval("nbd.reserved must be zero (initialise it with ublk_nbd_config_init)"));
        }
        // SAFETY: a NULL or valid pointer to a ublk_dev_config (documented).
        let mut c = match unsafe { cfg.as_ref() } {
            Some(c) => *c,
            None => {
                let mut c = std::mem::MaybeUninit::<ublk_dev_config>::uninit();
                let r = super::device::ublk_dev_config_init(c.as_mut_ptr());
                if r < 0 {
                    return Err(Error::new(-r, "ublk_dev_config_init failed"));
                }
                // SAFETY: initialised by ublk_dev_config_init (r >= 0).
                unsafe { c.assume_init() }
            }
        };
        if c.size != 0 {
            return Err(Error::inval("cfg.size must be 0: an nbd device has its export's size"));
        }
        c.size = 1 << 20; // replaced by the export's size below
        c.target_name = std::ptr::null();
        c.target_args = std::ptr::null();
        let mut dcfg = to_config(&c)?;
        let n = NbdConfig {
            host: opt_str(nbd.host, "nbd.host")?.ok_or_else(|| null_err("nbd.host"))?,
            export: opt_str(nbd.export_name, "nbd.export_name")?.unwrap_or_default(),
            port: nbd.port,
            connections: nbd.connections,
            timeout: Duration::from_millis(nbd.timeout_ms as u64),
        };
        let export = n.probe()?;
        n.configure(&export, &mut dcfg)?;
        let dev = Device::new(dcfg)?;
        // SAFETY: out is non-null (checked above).
        unsafe { *out = Box::into_raw(wrap_builtin(dev, n.factory(export))) };
        Ok(0)
    })
}
