//! Device lifecycle: add → params → queues fetching → start → serve → stop → delete.

use crate::ctrl::{Ctrl, DEFAULT_TIMEOUT};
use crate::error::{Error, Result};
use crate::io::QueueShared;
use crate::mode::{DataMode, ZeroCopy, MODE_FLAGS};
use crate::queue::{Queue, QueueSetup};
use crate::state::{StateFile, DEFAULT_STATE_DIR};
use crate::stats::QueueStatsSnapshot;
use crate::sys::{self, ublk_params, ublksrv_ctrl_dev_info};
use crate::target::TargetFactory;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Discard / write-zeroes support advertised to the block layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardLimits {
    pub granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

impl Default for DiscardLimits {
    fn default() -> Self {
        DiscardLimits { granularity: 4096, max_discard_sectors: 1 << 21, max_write_zeroes_sectors: 1 << 21 }
    }
}

/// Everything needed to create a device. Start from `Default` and set fields.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device id to ask for; `None` lets the kernel pick.
    pub dev_id: Option<u32>,
    /// Size in bytes (a multiple of the logical block size).
    pub size: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    /// Number of queues (1..=4096; the kernel caps it at the CPU count).
    pub queues: u16,
    /// Requests in flight per queue (1..=4096).
    pub depth: u16,
    /// Largest request in bytes (4 KiB..=32 MiB, rounded down to pages).
    pub max_io_bytes: u32,
    pub read_only: bool,
    pub rotational: bool,
    /// The device has a volatile cache: FLUSH and FUA writes are sent.
    pub volatile_cache: bool,
    /// Discard / write-zeroes support.
    pub discard: Option<DiscardLimits>,
    /// How request data moves (see [`ZeroCopy`]); `Auto` takes the best the
    /// kernel offers. The mode chosen is [`Device::data_mode`].
    pub zero_copy: ZeroCopy,
    /// The target reads and writes request data in memory (`Io::buf`): only
    /// copy mode gives it that, so `Auto` resolves to copy and the other
    /// modes are refused.
    pub needs_buffer: bool,
    /// Extra `UBLK_F_*` bits to request; refused if the kernel lacks them.
    /// The data-mode bits are chosen through `zero_copy`, not here.
    pub flags: u64,
    /// Target name, recorded in the state file (`ublk list` shows it).
    pub target_name: String,
    /// Extra `key=value` pairs recorded in the state file.
    pub target_args: Vec<(String, String)>,
    /// Where the state file goes.
    pub state_dir: PathBuf,
    /// Bound on each wait for the kernel (START, STOP, DEL, device nodes).
    pub timeout: Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            dev_id: None,
            size: 0,
            logical_block_size: 512,
            physical_block_size: 4096,
            queues: 1,
            depth: 128,
            max_io_bytes: 512 << 10,
            read_only: false,
            rotational: false,
            volatile_cache: false,
            discard: None,
            zero_copy: ZeroCopy::Auto,
            needs_buffer: false,
            flags: 0,
            target_name: "custom".into(),
            target_args: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

fn shift_of(v: u32, what: &str) -> Result<u8> {
    if !v.is_power_of_two() {
        return Err(Error::inval(format!("{what} {v} is not a power of two")));
    }
    Ok(v.trailing_zeros() as u8)
}

impl DeviceConfig {
    /// Checks the configuration; every refusal says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let page = crate::buf::page_size() as u32;
        let lbs = shift_of(self.logical_block_size, "logical block size")?;
        let pbs = shift_of(self.physical_block_size, "physical block size")?;
        if !(9..=page.trailing_zeros() as u8).contains(&lbs) {
            return Err(Error::inval(format!("logical block size {} must be 512..={page}", self.logical_block_size)));
        }
        if pbs < lbs || pbs > 20 {
            return Err(Error::inval(format!(
                "physical block size {} must be >= the logical block size {} and <= 1 MiB",
                self.physical_block_size, self.logical_block_size
            )));
        }
        if self.size == 0 {
            return Err(Error::inval("device size must not be zero"));
        }
        if self.size % self.logical_block_size as u64 != 0 {
            return Err(Error::inval(format!("device size {} is not a multiple of the logical block size {}", self.size, self.logical_block_size)));
        }
        if self.queues == 0 || self.queues as u32 > sys::UBLK_MAX_NR_QUEUES {
            return Err(Error::inval(format!("queue count {} must be 1..={}", self.queues, sys::UBLK_MAX_NR_QUEUES)));
        }
        if self.depth == 0 || self.depth as u32 > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::inval(format!("queue depth {} must be 1..={}", self.depth, sys::UBLK_MAX_QUEUE_DEPTH)));
        }
        if self.max_io_bytes < page || self.max_io_bytes > 1 << sys::UBLK_IO_BUF_BITS {
            return Err(Error::inval(format!("max IO size {} must be {page}..={}", self.max_io_bytes, 1u32 << sys::UBLK_IO_BUF_BITS)));
        }
        if let Some(d) = &self.discard {
            if d.granularity == 0 || !d.granularity.is_power_of_two() {
                return Err(Error::inval(format!("discard granularity {} must be a power of two", d.granularity)));
            }
        }
        if self.timeout.is_zero() {
            return Err(Error::inval("timeout must not be zero"));
        }
        if self.flags & MODE_FLAGS != 0 {
            return Err(Error::inval(format!(
                "flags {}: the data mode is chosen with zero_copy, not with UBLK_F_* bits",
                feature_names(self.flags & MODE_FLAGS).join(", ")
            )));
        }
        Ok(())
    }

    fn params(&self, max_io_bytes: u32) -> ublk_params {
        let mut p = ublk_params { types: sys::UBLK_PARAM_TYPE_BASIC, ..Default::default() };
        let b = &mut p.basic;
        if self.read_only {
            b.attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        if self.rotational {
            b.attrs |= sys::UBLK_ATTR_ROTATIONAL;
        }
        if self.volatile_cache {
            b.attrs |= sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        }
        b.logical_bs_shift = self.logical_block_size.trailing_zeros() as u8;
        b.physical_bs_shift = self.physical_block_size.trailing_zeros() as u8;
        b.io_min_shift = b.physical_bs_shift;
        b.io_opt_shift = b.physical_bs_shift;
        b.max_sectors = max_io_bytes >> 9;
        b.dev_sectors = self.size >> 9;
        if let Some(d) = &self.discard {
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard.discard_granularity = d.granularity;
            p.discard.max_discard_sectors = d.max_discard_sectors;
            p.discard.max_write_zeroes_sectors = d.max_write_zeroes_sectors;
            p.discard.max_discard_segments = 1;
        }
        p
    }
}

/// How request data reaches the server, from the device's `UBLK_F_*` bits.
pub fn data_mode_name(flags: u64) -> &'static str {
    DataMode::from_flags(flags).name()
}

/// Names of the set `UBLK_F_*` bits; unknown bits as `bit<N>`.
pub fn feature_names(bits: u64) -> Vec<String> {
    (0..64)
        .filter(|i| bits & (1u64 << i) != 0)
        .map(|i| sys::FEATURE_NAMES.get(i).map_or_else(|| format!("bit{i}"), |(_, n)| n.to_string()))
        .collect()
}

/// The `UBLK_F_*` bits of the running kernel.
pub fn kernel_features() -> Result<u64> {
    Ctrl::open()?.get_features()
}

/// Waits until `path` exists; after half the time, creates it from the sysfs
/// `dev` file (for systems where udev is slow or absent).
fn wait_node(path: &Path, sysfs_dev: &str, char_dev: bool, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut made = false;
    loop {
        if path.exists() {
            return Ok(());
        }
        let waited = start.elapsed();
        if !made && waited >= timeout / 2 {
            made = true;
            if let Ok(s) = std::fs::read_to_string(sysfs_dev) {
                if let Some((ma, mi)) = s.trim().split_once(':') {
                    let (ma, mi): (u32, u32) = (ma.parse().unwrap_or(0), mi.parse().unwrap_or(0));
                    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::inval("bad path"))?;
                    let kind = if char_dev { libc::S_IFCHR } else { libc::S_IFBLK };
                    // SAFETY: c is a valid NUL-terminated path.
                    unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(ma, mi)) };
                }
            }
        }
        if waited >= timeout {
            return Err(Error::new(libc::ETIMEDOUT, format!("{} did not appear within {timeout:?}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops a device from any thread (a signal handler thread, a supervisor).
#[derive(Clone)]
pub struct StopHandle {
    dev_id: u32,
    force_exit: Arc<AtomicBool>,
    shared: Arc<parking_lot::Mutex<Vec<Arc<QueueShared>>>>,
    timeout: Duration,
}

impl StopHandle {
    /// Sends STOP_DEV; pending requests are aborted and the queues wind down.
    pub fn stop(&self) -> Result<()> {
        let r = Ctrl::open().and_then(|c| c.stop_dev(self.dev_id, self.timeout));
        if r.is_err() {
            self.force();
        }
        r
    }

    /// Whether the device's queues were started.
    pub fn is_started(&self) -> bool {
        !self.shared.lock().is_empty()
    }

    /// Makes the queue threads exit without waiting for the kernel.
    pub(crate) fn force(&self) {
        self.force_exit.store(true, Ordering::Release);
        for s in self.shared.lock().iter() {
            s.wake_pending.store(false, Ordering::Release);
            s.wake();
        }
    }
}

/// A ublk device owned by this process. Dropping it stops and deletes it.
pub struct Device {
    ctrl: Ctrl,
    info: ublksrv_ctrl_dev_info,
    features: u64,
    mode: DataMode,
    cfg: DeviceConfig,
    char_file: Option<File>,
    stop: StopHandle,
    exits: Option<Receiver<(u16, Result<()>)>>,
    running: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Device {
    /// ADD_DEV, open `/dev/ublkcN`, SET_PARAMS, write the state file.
    pub fn new(cfg: DeviceConfig) -> Result<Device> {
        cfg.validate()?;
        let mut ctrl = Ctrl::open()?;
        let features = ctrl.get_features()?;
        let unprivileged = cfg.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0;
        let mode = crate::mode::resolve(cfg.zero_copy, features, cfg.needs_buffer, unprivileged)?;
        let want_flags = cfg.flags | mode.flags(features);
        let missing = cfg.flags & !features;
        if missing != 0 {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                format!("the running kernel lacks ublk features {}", feature_names(missing).join(", ")),
            ));
        }
        let page = crate::buf::page_size() as u32;
        let mut info = ublksrv_ctrl_dev_info {
            nr_hw_queues: cfg.queues,
            queue_depth: cfg.depth,
            max_io_buf_bytes: cfg.max_io_bytes / page * page,
            dev_id: cfg.dev_id.unwrap_or(u32::MAX),
            flags: want_flags,
            ..Default::default()
        };
        ctrl.add_dev(&mut info)?;
        let mut dev = Device {
            ctrl,
            info,
            features,
            mode,
            stop: StopHandle {
                dev_id: info.dev_id,
                force_exit: Arc::new(AtomicBool::new(false)),
                shared: Default::default(),
                timeout: cfg.timeout,
            },
            cfg,
            char_file: None,
            exits: None,
            running: 0,
            threads: Vec::new(),
        };
        // From here on, Drop deletes the device if anything fails.
        let dropped = want_flags & !info.flags;
        if dropped != 0 {
            return Err(Error::new(libc::EOPNOTSUPP, format!("the kernel refused ublk features {}", feature_names(dropped).join(", "))));
        }
        let char_path = dev.char_path();
        wait_node(&char_path, &format!("/sys/class/ublk-char/ublkc{}/dev", info.dev_id), true, dev.cfg.timeout)?;
        let deadline = Instant::now() + dev.cfg.timeout;
        let file = loop {
            match OpenOptions::new().read(true).write(true).open(&char_path) {
                Ok(f) => break f,
                // udev may still be setting permissions
                Err(e) if Instant::now() < deadline && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::ENOENT) | Some(libc::EBUSY)) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(Error::from_io(e, format!("cannot open {}", char_path.display()))),
            }
        };
        dev.char_file = Some(file);
        dev.ctrl.set_params(info.dev_id, &dev.cfg.params(info.max_io_buf_bytes))?;
        dev.write_state()?;
        Ok(dev)
    }

    fn write_state(&self) -> Result<()> {
        let mut s = StateFile::default();
        s.set("target", self.cfg.target_name.clone());
        s.set("pid", std::process::id().to_string());
        s.set("mode", data_mode_name(self.info.flags));
        for (k, v) in &self.cfg.target_args {
            s.set(k, v.clone());
        }
        s.store(&self.cfg.state_dir, self.info.dev_id)
    }

    pub fn id(&self) -> u32 {
        self.info.dev_id
    }

    /// Device info as the kernel returned it from ADD_DEV.
    pub fn info(&self) -> &ublksrv_ctrl_dev_info {
        &self.info
    }

    /// The running kernel's `UBLK_F_*` bits.
    pub fn kernel_features(&self) -> u64 {
        self.features
    }

    /// The data mode the device runs in.
    pub fn data_mode(&self) -> DataMode {
        self.mode
    }

    pub fn block_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.info.dev_id))
    }

    pub fn char_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkc{}", self.info.dev_id))
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Per-queue counters.
    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        self.stop.shared.lock().iter().map(|s| s.stats.snapshot()).collect()
    }

    /// Starts one thread per queue (each FETCHes all its tags), then
    /// START_DEV, then waits for `/dev/ublkbN`. Returns once the device serves IO.
    pub fn start(&mut self, factory: TargetFactory) -> Result<()> {
        if self.exits.is_some() {
            return Err(Error::new(libc::EALREADY, "device already started"));
        }
        let char_fd = self.char_file.as_ref().map(|f| f.as_raw_fd()).ok_or_else(|| Error::new(libc::EBADF, "device has no char fd"))?;
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        let nq = self.info.nr_hw_queues;
        for q in 0..nq {
            let affinity = self.ctrl.get_queue_affinity(self.info.dev_id, q).unwrap_or_default();
            let setup = QueueSetup {
                dev_id: self.info.dev_id,
                q_id: q,
                depth: self.info.queue_depth,
                buf_bytes: self.info.max_io_buf_bytes,
                char_fd,
                affinity,
                mode: self.mode,
                flags: self.info.flags,
                force_exit: self.stop.force_exit.clone(),
            };
            let (ready_tx, exit_tx, factory) = (ready_tx.clone(), exit_tx.clone(), factory.clone());
            let t = std::thread::Builder::new()
                .name(format!("ublk{}-q{q}", self.info.dev_id))
                .spawn(move || {
                    // Queue threads never take SIGINT/SIGTERM: the thread that
                    // serves the device (or the application) decides.
                    crate::signals::block_stop_signals();
                    crate::signals::block_sigpipe();
                    match Queue::new(&setup, &factory) {
                        Ok((queue, shared)) => {
                            let _ = ready_tx.send(Ok(shared));
                            drop(ready_tx);
                            let r = queue.run();
                            let _ = exit_tx.send((q, r));
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            let _ = exit_tx.send((q, Ok(())));
                        }
                    }
                })
                .map_err(|e| Error::from_io(e, "cannot spawn a queue thread"))?;
            self.threads.push(t);
            self.running += 1;
        }
        self.exits = Some(exit_rx);
        let mut first_err = None;
        for _ in 0..nq {
            match ready_rx.recv_timeout(self.cfg.timeout) {
                Ok(Ok(shared)) => self.stop.shared.lock().push(shared),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::new(libc::ETIMEDOUT, "a queue thread did not get ready"));
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            self.stop.force();
            return Err(e);
        }
        if let Err(e) = self.ctrl.start_dev(self.info.dev_id, std::process::id() as i32, self.cfg.timeout) {
            self.stop.force();
            return Err(e);
        }
        wait_node(&self.block_path(), &format!("/sys/block/ublkb{}/dev", self.info.dev_id), false, self.cfg.timeout)
    }

    /// Blocks until every queue has exited (the device was stopped or deleted),
    /// or `timeout` passed (returns false then).
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let Some(rx) = &self.exits else { return true };
        let deadline = Instant::now() + timeout;
        while self.running > 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((q, r)) => {
                    self.running -= 1;
                    if let Err(e) = r {
                        eprintln!("ublk: device {} queue {q}: {e}", self.info.dev_id);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => self.running = 0,
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        true
    }

    /// Blocks until the device stops.
    pub fn wait(&mut self) {
        while !self.wait_timeout(Duration::from_secs(3600)) {}
    }

    /// Serves until the device stops or SIGINT/SIGTERM arrives (then stops it).
    /// While it serves, those signals only set a flag (in any thread), and the
    /// previous handlers come back afterwards. They are unblocked in the
    /// calling thread meanwhile, so an application may keep them blocked from
    /// before the device exists: one that arrived during setup is pending and
    /// stops the device as soon as this starts (instead of the default action
    /// killing the process during setup with the device left behind).
    pub fn serve_until_signal(&mut self) -> Result<()> {
        let signals = crate::signals::StopSignals::install();
        let old_mask = crate::signals::set_stop_signals_mask(libc::SIG_UNBLOCK);
        let r = loop {
            if self.wait_timeout(Duration::from_millis(200)) {
                break Ok(());
            }
            if signals.fired().is_some() {
                break self.stop();
            }
        };
        // SAFETY: restores this thread's previous mask (before the handler goes).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
        drop(signals);
        r
    }

    /// STOP_DEV, then waits for the queues (forcing them out after the timeout).
    pub fn stop(&mut self) -> Result<()> {
        if self.exits.is_none() {
            return Ok(());
        }
        let r = self.stop.stop();
        if !self.wait_timeout(self.cfg.timeout) {
            self.stop.force();
            if !self.wait_timeout(self.cfg.timeout) {
                return Err(Error::new(libc::ETIMEDOUT, "queue threads did not exit"));
            }
        }
        match r {
            Err(e) if e.errno() != libc::ENODEV && e.errno() != libc::ENOENT => Err(e),
            _ => Ok(()),
        }
    }

    /// Stops (if started) and deletes the device.
    pub fn delete(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let stopped = self.stop();
        if !self.threads.is_empty() {
            // Queue threads still use the char fd and its mappings: closing it
            // now would leave DEL_DEV waiting for nothing. Leak the device.
            return stopped;
        }
        self.char_file = None;
        StateFile::remove(&self.cfg.state_dir, self.info.dev_id);
        let del = match self.ctrl.del_dev(self.info.dev_id, self.cfg.timeout) {
            Err(e) if e.errno() == libc::ENODEV || e.errno() == libc::ENOENT => Ok(()),
            r => r,
        };
        self.exits = None;
        self.info.dev_id = u32::MAX;
        stopped.and(del)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.info.dev_id != u32::MAX {
            if let Err(e) = self.teardown() {
                eprintln!("ublk: removing device {}: {e}", self.info.dev_id);
            }
        }
    }
}

/// Deletes a device by id (any owner), waiting at most `timeout`.
pub fn delete_device(dev_id: u32, timeout: Duration) -> Result<()> {
    let ctrl = Ctrl::open()?;
    let r = ctrl.del_dev(dev_id, timeout);
    if r.is_ok() {
        StateFile::remove(Path::new(DEFAULT_STATE_DIR), dev_id);
    }
    r
}
