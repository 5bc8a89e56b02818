//! C ABI: device configuration and lifecycle.

use super::io::{on_queue_thread_of, FfiQueue, FfiTarget};
use super::{guard, guard_or, null_err, opt_str};
use crate::device::gone_is_done;
use crate::error::Error;
use crate::{Device, DeviceConfig, DiscardLimits, QueueInfo, Recovery, StopHandle, Target, TargetFactory, ZeroCopy};
use parking_lot::Mutex;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;
use std::time::Duration;

/// Device configuration. Initialise with `ublk_dev_config_init()` (defaults),
/// then set fields; fields may be added in the reserved space later.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ublk_dev_config {
    /// Device size in bytes (a multiple of `logical_block_size`). Required.
    pub size: u64,
    /// Logical block size (512..=page size). Default 512.
    pub logical_block_size: u32,
    /// Physical block size (power of two >= logical). Default 4096.
    pub physical_block_size: u32,
    /// Largest request in bytes (4096..=32 MiB). Default 512 KiB.
    pub max_io_bytes: u32,
    /// Queues (1..=4096; the kernel caps it at the CPU count). Default 1.
    pub nr_queues: u16,
    /// Requests in flight per queue (1..=4096). Default 128.
    pub queue_depth: u16,
    /// Device id to ask for; -1 lets the kernel pick (default).
    pub dev_id: i32,
    /// Non-zero: read-only device.
    pub read_only: u8,
    /// Non-zero: rotational device.
    pub rotational: u8,
    /// Non-zero: the device has a volatile cache, FLUSH and FUA are sent.
    pub volatile_cache: u8,
    /// Non-zero: DISCARD and WRITE_ZEROES are sent (limits below).
    pub discard: u8,
    /// Discard granularity in bytes (power of two). Default 4096.
    pub discard_granularity: u32,
    /// Largest DISCARD in 512-byte sectors. Default 2^21.
    pub max_discard_sectors: u32,
    /// Largest WRITE_ZEROES in 512-byte sectors. Default 2^21.
    pub max_write_zeroes_sectors: u32,
    /// Bound on every wait for the kernel, in milliseconds. Default 30000.
    pub timeout_ms: u32,
    /// Extra `UBLK_F_*` bits to request; refused (-EOPNOTSUPP) if the kernel
    /// lacks them. The data-mode bits (ZERO_COPY, USER_COPY, AUTO_BUF_REG,
    /// NEED_GET_DATA) are refused (-EINVAL): use `data_mode`.
    pub flags: u64,
    /// UBLK_DATA_AUTO (default), _AUTO_BUF_REG, _REGISTER, _USER_COPY or _COPY.
    /// A mode the kernel lacks fails `ublk_dev_new` with -EOPNOTSUPP.
    pub data_mode: u32,
    /// Non-zero: `handle_io` reads or writes the data through `ublk_io_buf()`,
    /// which only UBLK_DATA_COPY provides: AUTO then picks COPY and the
    /// other modes are refused (-EINVAL). Zero (default): the target moves
    /// data with the `ublk_io_lease_*` operations (or not at all).
    pub needs_buffer: u8,
    /// Target name recorded in the state file (`ublk list`); NULL = "custom".
    /// Borrowed: read during `ublk_dev_new` only.
    pub target_name: *const c_char,
    /// Directory of the state file; NULL = `$UBLK_STATE_DIR`, else
    /// "/run/ublk". Borrowed, as above.
    pub state_dir: *const c_char,
    /// What happens when the server dies: UBLK_RECOVERY_NONE (default: the
    /// device is stopped), _REISSUE, _FAIL or _WAIT (the device survives and
    /// a new process takes it over with `ublk_dev_recover`).
    pub recovery: u32,
    /// CPUs of each queue thread: UBLK_AFFINITY_SINGLE (default: one CPU of
    /// the set the kernel maps to the queue) or UBLK_AFFINITY_ALL (the set).
    pub cpu_affinity: u32,
    /// The target's own arguments (free text, e.g. "file=/srv/disk.img"),
    /// recorded in the state file so that a recovering process can read them
    /// back (`ublk_dev_target_args`); NULL = none. Borrowed, as above.
    pub target_args: *const c_char,
    /// Must stay zero (room for future fields).
    pub reserved: [u64; 6],
}

/// `ublk_dev_config.recovery`: the device is stopped when its server dies.
pub const UBLK_RECOVERY_NONE: u32 = 0;
/// The requests the dead server held are sent again to the next server; new
/// IO waits for it.
pub const UBLK_RECOVERY_REISSUE: u32 = 1;
/// While no server runs, all IO fails at once with an IO error (EIO or
/// EREMOTEIO).
pub const UBLK_RECOVERY_FAIL: u32 = 2;
/// The requests the dead server held fail; new IO waits for the next server.
pub const UBLK_RECOVERY_WAIT: u32 = 3;

/// `ublk_dev_config.cpu_affinity`: each queue thread runs on one CPU of the
/// set the kernel maps to its queue (index: device id mod set size), and
/// never migrates.
pub const UBLK_AFFINITY_SINGLE: u32 = 0;
/// Each queue thread runs on the whole set the kernel maps to its queue.
pub const UBLK_AFFINITY_ALL: u32 = 1;

/// The state-file entry that holds `ublk_dev_config.target_args`.
const C_ARGS_KEY: &str = "c";

/// Fills `*cfg` with the defaults. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_config_init(cfg: *mut ublk_dev_config) -> c_int {
    guard(|| {
        if cfg.is_null() {
            return Err(null_err("cfg"));
        }
        let d = DeviceConfig::default();
        let l = DiscardLimits::default();
        let c = ublk_dev_config {
            size: 0,
            logical_block_size: d.logical_block_size,
            physical_block_size: d.physical_block_size,
            max_io_bytes: d.max_io_bytes,
            nr_queues: d.queues,
            queue_depth: d.depth,
            dev_id: -1,
            read_only: 0,
            rotational: 0,
            volatile_cache: 0,
            discard: 0,
            discard_granularity: l.granularity,
            max_discard_sectors: l.max_discard_sectors,
            max_write_zeroes_sectors: l.max_write_zeroes_sectors,
            timeout_ms: d.timeout.as_millis() as u32,
            flags: 0,
            data_mode: super::UBLK_DATA_AUTO,
            needs_buffer: 0,
            target_name: std::ptr::null(),
            state_dir: std::ptr::null(),
            recovery: UBLK_RECOVERY_NONE,
            cpu_affinity: UBLK_AFFINITY_SINGLE,
            target_args: std::ptr::null(),
            reserved: [0; 6],
        };
        // SAFETY: cfg is non-null and points to a ublk_dev_config (documented).
        unsafe { cfg.write(c) };
        Ok(0)
    })
}

pub(crate) fn to_config(c: &ublk_dev_config) -> Result<DeviceConfig, Error> {
    if c.reserved.iter().any(|&r| r != 0) {
        return Err(Error::inval("cfg.reserved must be zero (initialise cfg with ublk_dev_config_init)"));
    }
    let dev_id = match c.dev_id {
        -1 => None,
        id if id >= 0 => Some(id as u32),
        id => return Err(Error::inval(format!("dev_id {id} is invalid (-1 or >= 0)"))),
    };
    let mut cfg = DeviceConfig {
        dev_id,
        size: c.size,
        logical_block_size: c.logical_block_size,
        physical_block_size: c.physical_block_size,
        queues: c.nr_queues,
        depth: c.queue_depth,
        max_io_bytes: c.max_io_bytes,
        read_only: c.read_only != 0,
        rotational: c.rotational != 0,
        volatile_cache: c.volatile_cache != 0,
        discard: (c.discard != 0).then_some(DiscardLimits {
            granularity: c.discard_granularity,
            max_discard_sectors: c.max_discard_sectors,
            max_write_zeroes_sectors: c.max_write_zeroes_sectors,
        }),
        flags: c.flags,
        zero_copy: match c.data_mode {
            super::UBLK_DATA_AUTO => ZeroCopy::Auto,
            super::UBLK_DATA_AUTO_BUF_REG => ZeroCopy::AutoBufReg,
            super::UBLK_DATA_REGISTER => ZeroCopy::Register,
            super::UBLK_DATA_USER_COPY => ZeroCopy::UserCopy,
            super::UBLK_DATA_COPY => ZeroCopy::Copy,
            m => return Err(Error::inval(format!("data_mode {m} is not a UBLK_DATA_* value"))),
        },
        needs_buffer: c.needs_buffer != 0,
        recovery: match c.recovery {
            UBLK_RECOVERY_NONE => Recovery::None,
            UBLK_RECOVERY_REISSUE => Recovery::Reissue,
            UBLK_RECOVERY_FAIL => Recovery::Fail,
            UBLK_RECOVERY_WAIT => Recovery::Wait,
            r => return Err(Error::inval(format!("recovery {r} is not a UBLK_RECOVERY_* value"))),
        },
        affinity: match c.cpu_affinity {
            UBLK_AFFINITY_SINGLE => crate::Affinity::Single,
            UBLK_AFFINITY_ALL => crate::Affinity::All,
            a => return Err(Error::inval(format!("cpu_affinity {a} is not a UBLK_AFFINITY_* value"))),
        },
        timeout: Duration::from_millis(c.timeout_ms as u64),
        ..Default::default()
    };
    if let Some(n) = opt_str(c.target_name, "target_name")? {
        cfg.target_name = n;
    }
    if let Some(d) = opt_str(c.state_dir, "state_dir")? {
        cfg.state_dir = d.into();
    }
    if let Some(a) = opt_str(c.target_args, "target_args")? {
        cfg.target_args.push((C_ARGS_KEY.into(), a));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The callbacks of a target. Every callback gets the `user` pointer given to
/// `ublk_dev_new` first. They run on the queue threads of the device.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ublk_target_ops {
    /// Required (unless `handle_batch` is set). One request arrived. Complete it with `ublk_io_complete()`,
    /// now or later from any thread, or lend its buffer to IO on files and
    /// sockets with `ublk_io_lease_read()` & co (it then completes when the
    /// last lease operation is over). `io` stays valid until it is completed.
    pub handle_io: Option<unsafe extern "C" fn(user: *mut c_void, io: *mut ublk_io)>,
    /// Optional. Called on each queue's thread before it serves; may store a
    /// per-queue pointer in `*queue_data` (read back with `ublk_io_queue_data`).
    /// A negative return fails `ublk_dev_start` with that error.
    pub queue_init: Option<unsafe extern "C" fn(user: *mut c_void, queue_id: u16, queue_data: *mut *mut c_void) -> c_int>,
    /// Optional. Called on each queue's thread after it stopped serving.
    pub queue_deinit: Option<unsafe extern "C" fn(user: *mut c_void, queue_id: u16, queue_data: *mut c_void)>,
    /// Optional; replaces `handle_io` when set. The requests that arrived in
    /// one pass over the queue ring, all in one call: `entries[0..n]` (n >=
    /// 1), each with its handle, buffer and description. For each, set
    /// `result` to complete it when this returns, or `lease_fd` to lend it
    /// whole to IO on a file, or leave both and deal with `io` as after
    /// `handle_io` (complete it later from any thread, lease operations with
    /// callbacks, backing IO). `entries` is the engine's and valid during the
    /// call only; the handles as in `handle_io`. For bindings where each call
    /// costs (Python); C targets gain little from it.
    pub handle_batch: Option<unsafe extern "C" fn(user: *mut c_void, entries: *mut super::batch::ublk_io_batch_entry, n: u32)>,
}

pub use super::io::ublk_io;

/// Device facts, filled by `ublk_dev_get_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_dev_info {
    pub dev_id: u32,
    pub nr_queues: u16,
    pub queue_depth: u16,
    pub max_io_bytes: u32,
    /// The mode the device runs in: UBLK_DATA_AUTO_BUF_REG, _REGISTER, _USER_COPY or _COPY.
    pub data_mode: u32,
    /// `UBLK_F_*` bits the device negotiated with the kernel.
    pub flags: u64,
    pub size: u64,
    /// UBLK_RECOVERY_* policy of the device.
    pub recovery: u32,
}

/// Per-queue counters, filled by `ublk_dev_queue_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ublk_queue_stats {
    /// Requests completed.
    pub ios: u64,
    /// Bytes of successful READ/WRITE requests.
    pub bytes: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Requests handed to the target and not completed yet.
    pub in_flight: u64,
    /// Request data bytes copied between a request and a server buffer (copy
    /// and user-copy modes); zero-copy leases copy none.
    pub copied_bytes: u64,
    /// Lease operations submitted.
    pub lease_ops: u64,
}

/// What the queues of a device share with the C side.
pub(crate) struct FfiDevShared {
    pub ops: ublk_target_ops,
    pub user: *mut c_void,
    pub queues: Vec<Arc<FfiQueue>>,
    /// The route table (`ublk_dev_map`).
    pub routes: super::route::Routes,
}

// SAFETY: `user` is the caller's pointer, documented to be usable from the
// device's queue threads; the rest is Send + Sync.
unsafe impl Send for FfiDevShared {}
unsafe impl Sync for FfiDevShared {}

/// A ublk device (opaque). Created by `ublk_dev_new`, freed by `ublk_dev_free`.
pub struct ublk_dev {
    dev: Mutex<Option<Device>>,
    stop: StopHandle,
    /// The thread of a `ublk_dev_stop` called on a queue thread: joined by
    /// `ublk_dev_free`, so no late STOP_DEV can reach a device that got the
    /// freed one's id.
    stopper: Mutex<Option<std::thread::JoinHandle<()>>>,
    shared: Arc<FfiDevShared>,
    info: ublk_dev_info,
    path: CString,
    target_name: CString,
    target_args: Option<CString>,
    /// A built-in target (`ublk_nbd_dev_new`) instead of the C callbacks.
    builtin: Option<TargetFactory>,
    block_size: u32,
}

impl ublk_dev {
    /// Device size and logical block size in bytes.
    pub(crate) fn size_and_block(&self) -> (u64, u32) {
        (self.info.size, self.block_size)
    }

    pub(crate) fn routes(&self) -> &super::route::Routes {
        &self.shared.routes
    }

    /// True for a device with a built-in target (`ublk_nbd_dev_new`).
    pub(crate) fn is_builtin(&self) -> bool {
        self.builtin.is_some()
    }

    pub(crate) fn target_name(&self) -> std::borrow::Cow<'_, str> {
        self.target_name.to_string_lossy()
    }
}

pub(crate) fn dev_ref<'a>(dev: *const ublk_dev) -> Result<&'a ublk_dev, Error> {
    // SAFETY: a non-null dev comes from ublk_dev_new and is valid until
    // ublk_dev_free (documented ownership rule).
    unsafe { dev.as_ref() }.ok_or_else(|| null_err("dev"))
}

/// Creates a device: ADD_DEV, `/dev/ublkcN`, SET_PARAMS. It does not serve
/// yet (see `ublk_dev_start` / `ublk_dev_serve`).
///
/// `cfg` and `ops` are copied. `user` is passed to every callback and must
/// stay valid until `ublk_dev_free` returns. On success `*out` owns the new
/// device: free it with `ublk_dev_free`. Returns 0 or a negative errno
/// (-EINVAL for a bad config, -EOPNOTSUPP for features the kernel lacks,
/// -ENOENT without ublk_drv, -EPERM without privileges…). Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_new(cfg: *const ublk_dev_config, ops: *const ublk_target_ops, user: *mut c_void, out: *mut *mut ublk_dev) -> c_int {
    guard(|| {
        // SAFETY: non-null pointers to the documented types (checked below).
        let (cfg, ops) = unsafe { (cfg.as_ref(), ops.as_ref()) };
        let cfg = cfg.ok_or_else(|| null_err("cfg"))?;
        let ops = *ops.ok_or_else(|| null_err("ops"))?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        if ops.handle_io.is_none() && ops.handle_batch.is_none() {
            return Err(Error::inval("ops.handle_io and ops.handle_batch are both NULL"));
        }
        let dev = Device::new(to_config(cfg)?)?;
        // SAFETY: out is non-null (checked above).
        unsafe { *out = Box::into_raw(wrap(dev, ops, user)) };
        Ok(0)
    })
}

pub(crate) fn wrap(dev: Device, ops: ublk_target_ops, user: *mut c_void) -> Box<ublk_dev> {
    wrap_with(dev, ops, user, None)
}

/// A device served by a built-in target (no C callbacks).
pub(crate) fn wrap_builtin(dev: Device, factory: TargetFactory) -> Box<ublk_dev> {
    let none = ublk_target_ops { handle_io: None, queue_init: None, queue_deinit: None, handle_batch: None };
    wrap_with(dev, none, std::ptr::null_mut(), Some(factory))
}

fn wrap_with(dev: Device, ops: ublk_target_ops, user: *mut c_void, builtin: Option<TargetFactory>) -> Box<ublk_dev> {
    let i = dev.info();
    let queues = (0..i.nr_hw_queues).map(|q| Arc::new(FfiQueue::new(q, i.queue_depth))).collect();
    let cfg = dev.config();
    let info = ublk_dev_info {
        dev_id: i.dev_id,
        nr_queues: i.nr_hw_queues,
        queue_depth: i.queue_depth,
        max_io_bytes: i.max_io_buf_bytes,
        data_mode: super::data_mode_const(dev.data_mode()),
        flags: i.flags,
        size: cfg.size,
        recovery: cfg.recovery as u32,
    };
    let cstr = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
    let block_size = cfg.logical_block_size;
    Box::new(ublk_dev {
        path: cstr(&dev.block_path().display().to_string()),
        target_name: cstr(&cfg.target_name),
        target_args: cfg.target_arg(C_ARGS_KEY).map(cstr),
        stop: dev.stop_handle(),
        stopper: Mutex::new(None),
        dev: Mutex::new(Some(dev)),
        shared: Arc::new(FfiDevShared { ops, user, queues, routes: Default::default() }),
        info,
        builtin,
        block_size,
    })
}

/// Takes over device `dev_id` after its server process died (even with
/// `kill -9`): the device must have been created with a `recovery` policy.
/// Its configuration comes from the state file written when it was created,
/// in `state_dir` (NULL = `$UBLK_STATE_DIR`, else "/run/ublk"); read the
/// target's own settings back with `ublk_dev_target_name` and
/// `ublk_dev_target_args`. Then `ublk_dev_start` / `ublk_dev_serve` serve it
/// again: the requests the kernel kept for it go to the new callbacks. Waits
/// (at most the recorded timeout) for the old server to be gone.
///
/// `ops`, `user` and `*out` as in `ublk_dev_new`. Errors: -ENOENT (no state
/// file), -ENODEV (no such device, or it was stopped), -EINVAL (created
/// without recovery), -EBUSY (a live server still serves it), -ETIMEDOUT.
/// If the new server fails before it serves (or `ublk_dev_free` comes
/// first), the device is left as it was, for another try. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_recover(dev_id: u32, state_dir: *const c_char, ops: *const ublk_target_ops, user: *mut c_void, out: *mut *mut ublk_dev) -> c_int {
    guard(|| {
        // SAFETY: a non-null pointer to the documented type.
        let ops = *unsafe { ops.as_ref() }.ok_or_else(|| null_err("ops"))?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        if ops.handle_io.is_none() && ops.handle_batch.is_none() {
            return Err(Error::inval("ops.handle_io and ops.handle_batch are both NULL"));
        }
        let dir = opt_str(state_dir, "state_dir")?.map_or_else(crate::state::default_dir, Into::into);
        let dev = Device::recover(dev_id, &dir)?;
        // SAFETY: out is non-null (checked above).
        unsafe { *out = Box::into_raw(wrap(dev, ops, user)) };
        Ok(0)
    })
}

/// The target name the device was created with (`ublk_dev_config.target_name`),
/// owned by `dev` and valid until `ublk_dev_free`; NULL for a NULL dev. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_target_name(dev: *const ublk_dev) -> *const c_char {
    guard_or(std::ptr::null(), || dev_ref(dev).ok().map(|d| d.target_name.as_ptr()))
}

/// The target arguments the device was created with
/// (`ublk_dev_config.target_args`; after `ublk_dev_recover`: as recorded in
/// its state file), owned by `dev` and valid until `ublk_dev_free`; NULL when
/// there are none or for a NULL dev. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_target_args(dev: *const ublk_dev) -> *const c_char {
    guard_or(std::ptr::null(), || dev_ref(dev).ok().and_then(|d| d.target_args.as_ref().map(|a| a.as_ptr())))
}

/// Starts serving in background threads (one per queue) and returns once
/// `/dev/ublkbN` exists. Callbacks run on those threads from now on.
/// Returns 0, -EALREADY if already started, or a negative errno.
/// Not concurrently with serve/wait/free on the same device.
#[no_mangle]
pub extern "C" fn ublk_dev_start(dev: *mut ublk_dev) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        let shared = d.shared.clone();
        let factory: TargetFactory = match &d.builtin {
            Some(f) => f.clone(),
            None => Arc::new(move |q: &QueueInfo| Ok(Box::new(FfiTarget::new(shared.clone(), q.queue_id)?) as Box<dyn Target>)),
        };
        let mut g = d.dev.lock();
        let dev = g.as_mut().ok_or_else(|| Error::new(libc::ESHUTDOWN, "device was deleted"))?;
        dev.start(factory)?;
        Ok(0)
    })
}

/// -EDEADLK for the calls that wait for the queue threads, made on one.
fn not_on_queue_thread(d: &ublk_dev, what: &str) -> Result<(), Error> {
    if on_queue_thread_of(&d.shared) {
        return Err(Error::new(libc::EDEADLK, format!("{what} on a queue thread of the device would wait for itself")));
    }
    Ok(())
}

/// Starts the device if needed, then blocks serving it until it is stopped
/// (`ublk_dev_stop`, `ublk del`) or SIGINT/SIGTERM arrives (then stops it).
/// Returns 0 or a negative errno (the start's; -EDEADLK on a queue thread of
/// the device). Not concurrently with start/wait/free.
#[no_mangle]
pub extern "C" fn ublk_dev_serve(dev: *mut ublk_dev) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        not_on_queue_thread(d, "ublk_dev_serve")?;
        if !d.stop.is_started() {
            let r = ublk_dev_start(dev);
            if r < 0 && r != -libc::EALREADY {
                return Ok(r);
            }
        }
        let mut g = d.dev.lock();
        let dev = g.as_mut().ok_or_else(|| Error::new(libc::ESHUTDOWN, "device was deleted"))?;
        dev.serve_until_signal()?;
        Ok(0)
    })
}

/// Waits until the device stops serving, at most `timeout_ms` (-1: forever).
/// Returns 0 once stopped, -ETIMEDOUT otherwise (-EDEADLK on a queue thread
/// of the device). Not concurrently with start/serve/free.
#[no_mangle]
pub extern "C" fn ublk_dev_wait(dev: *mut ublk_dev, timeout_ms: c_int) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        not_on_queue_thread(d, "ublk_dev_wait")?;
        let mut g = d.dev.lock();
        let dev = g.as_mut().ok_or_else(|| Error::new(libc::ESHUTDOWN, "device was deleted"))?;
        let done = if timeout_ms < 0 {
            dev.wait();
            true
        } else {
            dev.wait_timeout(Duration::from_millis(timeout_ms as u64))
        };
        if done {
            Ok(0)
        } else {
            Err(Error::new(libc::ETIMEDOUT, "device still serving"))
        }
    })
}

/// Stops the device (STOP_DEV): pending requests fail, the queue threads exit,
/// `ublk_dev_serve` returns. Any thread, also while another thread serves.
/// STOP_DEV waits for the requests in flight: those the target still holds 5 s
/// after the stop began (a stuck worker, a dead backend) are failed with EIO
/// by the engine (after their lease operations), and the target's own
/// completion of one then gives -EALREADY, -ESTALE or -ESHUTDOWN.
/// On a queue thread of the device (a callback that decides to stop it) the
/// stop runs on a thread of its own and this returns at once: STOP_DEV waits
/// for the requests in flight, which that queue thread serves once the
/// callback returns. Returns 0 or a negative errno (-EALREADY if it was
/// never started).
#[no_mangle]
pub extern "C" fn ublk_dev_stop(dev: *mut ublk_dev) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        if !d.stop.is_started() {
            return Err(Error::new(libc::EALREADY, "device is not serving"));
        }
        if on_queue_thread_of(&d.shared) {
            let mut stopper = d.stopper.lock();
            if stopper.is_some() {
                return Ok(0); // (one is on its way)
            }
            let stop = d.stop.clone();
            let t = std::thread::Builder::new()
                .name("ublk-stop".into())
                .spawn(move || {
                    if let Err(e) = gone_is_done(stop.stop()) {
                        eprintln!("ublk: ublk_dev_stop: {e}");
                    }
                })
                .map_err(|e| Error::from_io(e, "cannot spawn the thread that stops the device"))?;
            *stopper = Some(t);
            return Ok(0);
        }
        gone_is_done(d.stop.stop())?;
        Ok(0)
    })
}

/// Stops (if serving) and deletes the device, then frees `dev` (a device
/// from `ublk_dev_recover` that never served is left for another try, not
/// deleted). Returns once no callback runs any more: it waits for a callback
/// that does not return (saying so on stderr every 10 s), since `user` may
/// be freed right after. NULL is a no-op. Every `ublk_io` handle of the device becomes invalid. Call it from
/// a thread that is not a queue thread of this device (there it would wait
/// for itself: it reports that on stderr and frees nothing), and not
/// concurrently with any other call on `dev`.
#[no_mangle]
pub extern "C" fn ublk_dev_free(dev: *mut ublk_dev) {
    guard(|| {
        if dev.is_null() {
            return Ok(0);
        }
        if let Err(e) = dev_ref(dev).and_then(|d| not_on_queue_thread(d, "ublk_dev_free")) {
            eprintln!("ublk: {e}: nothing freed");
            return Err(e);
        }
        // SAFETY: dev comes from ublk_dev_new (Box::into_raw) and is freed once.
        let d = unsafe { Box::from_raw(dev) };
        if let Some(t) = d.stopper.lock().take() {
            let _ = t.join();
        }
        if let Some(device) = d.dev.lock().take() {
            // `user` must outlive the callbacks: a queue thread stuck in one
            // is waited for, not left running on memory the caller frees next
            device.delete_waiting()?;
        }
        Ok(0)
    });
}

/// The device id (>= 0), or -EINVAL for NULL. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_id(dev: *const ublk_dev) -> c_int {
    guard(|| Ok(dev_ref(dev)?.info.dev_id as c_int))
}

/// The block device path ("/dev/ublkbN"), owned by `dev` and valid until
/// `ublk_dev_free`; NULL for a NULL dev. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_path(dev: *const ublk_dev) -> *const c_char {
    guard_or(std::ptr::null(), || dev_ref(dev).ok().map(|d| d.path.as_ptr()))
}

/// Fills `*out` with the device facts. Returns 0 or a negative errno. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_get_info(dev: *const ublk_dev, out: *mut ublk_dev_info) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        // SAFETY: out is non-null and points to a ublk_dev_info.
        unsafe { out.write(d.info) };
        Ok(0)
    })
}

/// Fills `*out` with the counters of queue `queue_id`. Returns 0, -EINVAL for a
/// bad queue, or -EAGAIN before that queue started. Any thread.
#[no_mangle]
pub extern "C" fn ublk_dev_queue_stats(dev: *const ublk_dev, queue_id: u16, out: *mut ublk_queue_stats) -> c_int {
    guard(|| {
        let d = dev_ref(dev)?;
        if out.is_null() {
            return Err(null_err("out"));
        }
        let q = d.shared.queues.get(queue_id as usize).ok_or_else(|| Error::inval(format!("no queue {queue_id}")))?;
        let s = q.stats().or_else(|| d.stop.queue_stats(queue_id)).ok_or_else(|| Error::new(libc::EAGAIN, "queue not started"))?;
        // SAFETY: out is non-null and points to a ublk_queue_stats.
        unsafe {
            out.write(ublk_queue_stats {
                ios: s.ios,
                bytes: s.bytes,
                errors: s.errors,
                in_flight: s.in_flight,
                copied_bytes: s.copied_bytes,
                lease_ops: s.lease_ops,
            })
        };
        Ok(0)
    })
}
