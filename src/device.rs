//! Device lifecycle: add → params → queues fetching → start → serve → stop → delete.

use crate::config::DeviceConfig;
use crate::ctrl::Ctrl;
use crate::error::{Error, Result};
use crate::io::QueueShared;
use crate::mode::DataMode;
use crate::queue::{Queue, QueueSetup};
use crate::state::StateFile;
use crate::stats::QueueStatsSnapshot;
use crate::sys::{self, ublksrv_ctrl_dev_info};
use crate::target::TargetFactory;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How request data reaches the server, from the device's `UBLK_F_*` bits.
pub fn data_mode_name(flags: u64) -> &'static str {
    DataMode::from_flags(flags).name()
}

/// Names of the set `UBLK_F_*` bits; unknown bits as `bit<N>`.
pub fn feature_names(bits: u64) -> Vec<String> {
    (0..64).filter(|i| bits & (1u64 << i) != 0).map(|i| sys::FEATURE_NAMES.get(i).map_or_else(|| format!("bit{i}"), |(_, n)| n.to_string())).collect()
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

/// Whether this process lacks CAP_SYS_ADMIN (ublk then lets it create only
/// unprivileged devices, and manage only those).
pub(crate) fn lacks_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    // SAFETY: geteuid has no preconditions.
    eff.map_or(unsafe { libc::geteuid() } != 0, |c| c & (1 << CAP_SYS_ADMIN) == 0)
}

/// Opens `/dev/ublkcN`, retrying until `deadline` while udev sets its
/// permissions or (recovery) the old server's open is being released.
fn open_char(path: &Path, deadline: Instant) -> Result<File> {
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() < deadline && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::ENOENT) | Some(libc::EBUSY)) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(Error::from_io(e, format!("cannot open {}", path.display()))),
        }
    }
}

/// Stops a device from any thread (a signal handler thread, a supervisor).
#[derive(Clone)]
pub struct StopHandle {
    dev_id: u32,
    unprivileged: bool,
    force_exit: Arc<AtomicBool>,
    shared: Arc<parking_lot::Mutex<Vec<Arc<QueueShared>>>>,
    timeout: Duration,
}

impl StopHandle {
    /// Sends STOP_DEV; pending requests are aborted and the queues wind down.
    pub fn stop(&self) -> Result<()> {
        // (the queue threads fail what their targets still hold after
        // STOP_GRACE: STOP_DEV waits for every request in flight)
        self.wake_queues(|s| s.stopping.store(true, Ordering::Release));
        let r = Ctrl::open().and_then(|mut c| {
            c.set_unprivileged(self.unprivileged);
            c.stop_dev(self.dev_id, self.timeout)
        });
        if r.is_err() {
            self.force();
        }
        r
    }

    /// The counters of queue `q_id`, once it started.
    pub(crate) fn queue_stats(&self, q_id: u16) -> Option<QueueStatsSnapshot> {
        self.shared.lock().iter().find(|s| s.q_id == q_id).map(|s| s.stats.snapshot())
    }

    /// Whether the device's queues were started.
    pub fn is_started(&self) -> bool {
        !self.shared.lock().is_empty()
    }

    /// Makes the queue threads exit without waiting for the kernel.
    pub(crate) fn force(&self) {
        self.force_exit.store(true, Ordering::Release);
        self.wake_queues(|_| {});
    }

    /// Applies `mark` to each started queue, then wakes its thread (also when
    /// it is awake: it then sees the mark before it sleeps again).
    fn wake_queues(&self, mark: impl Fn(&QueueShared)) {
        for s in self.shared.lock().iter() {
            mark(s);
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
    /// Made by [`Device::recover`] and not serving yet: `start` ends the
    /// recovery, and a failure before that leaves the device to a later try
    /// instead of deleting it.
    recovering: bool,
    /// A start of this (new, not recovering) device failed: the kernel keeps
    /// the cancelled queues, so it cannot be started again; only deleted.
    start_failed: bool,
}

impl Device {
    /// ADD_DEV, open `/dev/ublkcN`, SET_PARAMS, write the state file.
    /// A process without CAP_SYS_ADMIN makes an unprivileged device
    /// (`UBLK_F_UNPRIVILEGED_DEV`, set here): it belongs to the caller's uid
    /// and gid, runs in copy mode and has no recovery.
    pub fn new(mut cfg: DeviceConfig) -> Result<Device> {
        if lacks_cap_sys_admin() {
            cfg.flags |= sys::UBLK_F_UNPRIVILEGED_DEV;
        }
        cfg.validate()?;
        let mut ctrl = Ctrl::open()?;
        let features = ctrl.get_features()?;
        let unprivileged = cfg.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0;
        let mode = crate::mode::resolve(cfg.zero_copy, features, cfg.needs_buffer, unprivileged)?;
        let asked = cfg.flags | cfg.recovery.flags();
        let want_flags = asked | mode.flags(features);
        let missing = asked & !features;
        if missing != 0 {
            return Err(Error::new(libc::EOPNOTSUPP, format!("the running kernel lacks ublk features {}", feature_names(missing).join(", "))));
        }
        let page = crate::buf::page_size() as u32;
        let mut info = ublksrv_ctrl_dev_info {
            nr_hw_queues: cfg.queues,
            queue_depth: cfg.depth,
            max_io_buf_bytes: cfg.max_io_bytes / page * page,
            dev_id: cfg.dev_id.unwrap_or(u32::MAX),
            flags: want_flags,
            // server-private, kept by the kernel: names this device among
            // all that ever had its id (see `recover`)
            ublksrv_flags: crate::state::new_token(),
            ..Default::default()
        };
        ctrl.add_dev(&mut info)?;
        // the kernel drops UNPRIVILEGED_DEV for a CAP_SYS_ADMIN caller
        let unprivileged = info.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0;
        ctrl.set_unprivileged(unprivileged);
        let mut dev = Device::assemble(ctrl, info, features, mode, cfg, false);
        // From here on, Drop deletes the device if anything fails.
        let dropped = want_flags & !info.flags & !sys::UBLK_F_UNPRIVILEGED_DEV;
        if dropped != 0 {
            return Err(Error::new(libc::EOPNOTSUPP, format!("the kernel refused ublk features {}", feature_names(dropped).join(", "))));
        }
        let char_path = dev.char_path();
        wait_node(&char_path, &format!("/sys/class/ublk-char/ublkc{}/dev", info.dev_id), true, dev.cfg.timeout)?;
        dev.char_file = Some(open_char(&char_path, Instant::now() + dev.cfg.timeout)?);
        dev.ctrl.set_params(info.dev_id, &dev.cfg.params(info.max_io_buf_bytes))?;
        dev.write_state()?;
        Ok(dev)
    }

    /// A device known to the kernel as `info`, not serving yet.
    fn assemble(ctrl: Ctrl, info: ublksrv_ctrl_dev_info, features: u64, mode: DataMode, cfg: DeviceConfig, recovering: bool) -> Device {
        Device {
            ctrl,
            info,
            features,
            mode,
            stop: StopHandle {
                dev_id: info.dev_id,
                unprivileged: info.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0,
                force_exit: Arc::new(AtomicBool::new(false)),
                shared: Default::default(),
                timeout: cfg.timeout,
            },
            cfg,
            char_file: None,
            exits: None,
            running: 0,
            threads: Vec::new(),
            recovering,
            start_failed: false,
        }
    }

    /// Writes the state file: the serving pid, the data mode and the whole
    /// configuration (what `recover` needs), atomically.
    fn write_state(&self) -> Result<()> {
        let mut s = StateFile::default();
        s.set("pid", std::process::id().to_string());
        s.set("mode", data_mode_name(self.info.flags));
        s.set("token", format!("{:#x}", self.info.ublksrv_flags));
        self.cfg.to_state(&mut s);
        s.store(&self.cfg.state_dir, self.info.dev_id)
    }

    /// Takes over device `dev_id` after its server died: its configuration
    /// comes from the state file in `state_dir` (written when it was added),
    /// and [`Device::start`] then serves it again (START_USER_RECOVERY, new
    /// queues, END_USER_RECOVERY). Until `start`, nothing is sent to the
    /// kernel: dropping the Device then leaves the device as it was. The device must have been
    /// added with a [`Recovery`] policy; waits (at most the configured
    /// timeout) for the old server to be gone. Errors: ENOENT (no state
    /// file), ENODEV (no such device), EINVAL (not added with recovery),
    /// ESTALE (the state file is of an earlier device that had this id),
    /// EBUSY (a live server still serves it). A failure leaves the
    /// device as it was, for another try or `ublk del`.
    pub fn recover(dev_id: u32, state_dir: &Path) -> Result<Device> {
        let state = StateFile::load(state_dir, dev_id).map_err(|e| e.context(format!("device {dev_id} cannot be recovered without its state file")))?;
        let mut cfg = DeviceConfig::from_state(&state)?;
        cfg.dev_id = Some(dev_id);
        cfg.state_dir = state_dir.to_path_buf();
        let mut ctrl = Ctrl::open()?;
        let features = ctrl.get_features()?;
        let deadline = Instant::now() + cfg.timeout;
        // The kernel quiesces the device once the old server's char fd is
        // released (the process fully exited).
        let info = loop {
            let info = ctrl.get_dev_info(dev_id).map_err(|e| e.context(format!("device {dev_id}")))?;
            if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
                return Err(Error::inval(format!("device {dev_id} was not added with recovery (--recovery): it cannot be recovered")));
            }
            check_state_is_of(&state, &info)?;
            match info.state {
                sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => break info,
                sys::UBLK_S_DEV_DEAD => return Err(Error::new(libc::ENODEV, format!("device {dev_id} is stopped (DEAD): nothing to recover; delete it"))),
                _ if Instant::now() >= deadline => {
                    return Err(Error::new(
                        libc::EBUSY,
                        format!("device {dev_id} is still served by pid {} (state LIVE): stop that server first", info.ublksrv_pid),
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mode = DataMode::from_flags(info.flags);
        if cfg.needs_buffer && mode != DataMode::Copy {
            return Err(Error::inval(format!("device {dev_id} runs in {} mode: this target needs copy mode", mode.name())));
        }
        // START_USER_RECOVERY and the char device wait for `start`: a
        // Device dropped before then leaves the kernel untouched (some
        // kernels, 6.12, refuse a second START_USER_RECOVERY after an
        // abandoned one).
        Ok(Device::assemble(ctrl, info, features, mode, cfg, true))
    }

    /// The kernel half of a recovery, when it starts serving:
    /// START_USER_RECOVERY (EBUSY until the old server has released
    /// /dev/ublkcN), then our own open of /dev/ublkcN.
    fn begin_recovery(&mut self) -> Result<()> {
        let dev_id = self.info.dev_id;
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.ctrl.start_user_recovery(dev_id) {
                Ok(()) => break,
                Err(e) if e.errno() == libc::EBUSY && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e.context(format!("device {dev_id}"))),
            }
        }
        self.char_file = Some(open_char(&self.char_path(), deadline)?);
        Ok(())
    }

    /// The configuration the device was made with (after [`Device::recover`]:
    /// the one read from its state file, target arguments included).
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Whether the device was made by [`Device::recover`] and not started yet.
    pub fn is_recovering(&self) -> bool {
        self.recovering
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
        if self.start_failed {
            return Err(Error::inval("the device failed to start before and cannot start again: delete it and add a new one"));
        }
        self.stop.force_exit.store(false, Ordering::Release);
        if self.recovering && self.char_file.is_none() {
            self.begin_recovery()?;
        }
        let char_fd = self.char_file.as_ref().map(|f| f.as_raw_fd()).ok_or_else(|| Error::new(libc::EBADF, "device has no char fd"))?;
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        let nq = self.info.nr_hw_queues;
        for q in 0..nq {
            let set = self.ctrl.get_queue_affinity(self.info.dev_id, q).unwrap_or_default();
            let affinity = self.cfg.affinity.pick(self.info.dev_id, &set);
            let setup = QueueSetup {
                dev_id: self.info.dev_id,
                q_id: q,
                depth: self.info.queue_depth,
                buf_bytes: self.info.max_io_buf_bytes,
                logical_block_size: self.cfg.logical_block_size,
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
            self.abort_start();
            return Err(e);
        }
        let pid = std::process::id() as i32;
        let r = if self.recovering {
            self.ctrl.end_user_recovery(self.info.dev_id, pid, self.cfg.timeout)
        } else {
            self.ctrl.start_dev(self.info.dev_id, pid, self.cfg.timeout)
        };
        if let Err(e) = r {
            self.abort_start();
            return Err(e);
        }
        let recovered = self.recovering;
        if recovered {
            self.recovering = false;
            self.info.state = sys::UBLK_S_DEV_LIVE;
            self.info.ublksrv_pid = pid;
            // the new pid; the device serves even if this fails
            if let Err(e) = self.write_state() {
                eprintln!("ublk: device {}: {e}", self.info.dev_id);
            }
        }
        let node = wait_node(&self.block_path(), &format!("/sys/block/ublkb{}/dev", self.info.dev_id), false, self.cfg.timeout);
        match node {
            // Serving again: the block device node was there all along, and a
            // failure here must not make the caller drop (delete) the device.
            Err(e) if recovered => {
                eprintln!("ublk: device {}: recovered, but {e}", self.info.dev_id);
                Ok(())
            }
            r => r,
        }
    }

    /// After a failed start: makes the queue threads exit and joins them, so
    /// that the device is as before the call. No STOP_DEV for a device that
    /// never served: a recovering one stays quiesced for another try (the
    /// next start begins the recovery again, on a fresh char fd), a new one
    /// is deleted by `delete`/drop. Threads that do not exit (a callback that
    /// never returns) stay counted: teardown then leaks the device.
    fn abort_start(&mut self) {
        self.stop.force();
        if !self.wait_timeout(self.cfg.timeout) {
            return;
        }
        self.exits = None;
        self.stop.shared.lock().clear();
        if self.recovering {
            self.char_file = None;
        } else {
            self.start_failed = true;
        }
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
        let r = if self.recovering {
            // a recovery that has not served: STOP_DEV would end the very
            // device it is for (it stays quiesced for another try)
            self.stop.force();
            Ok(())
        } else {
            self.stop.stop()
        };
        if !self.wait_timeout(self.cfg.timeout) {
            self.stop.force();
            if !self.wait_timeout(self.cfg.timeout) {
                return Err(Error::new(libc::ETIMEDOUT, "queue threads did not exit"));
            }
        }
        gone_is_done(r)
    }

    /// Stops (if started) and deletes the device.
    pub fn delete(mut self) -> Result<()> {
        self.teardown(false)
    }

    /// `delete`, but a queue thread that does not exit (stuck in a target
    /// callback) is waited for, saying so on stderr every 10 s, instead of
    /// the device being leaked with the thread still running: for the C
    /// API, whose callbacks use memory the caller frees once this returns.
    pub(crate) fn delete_waiting(mut self) -> Result<()> {
        self.teardown(true)
    }

    fn teardown(&mut self, wait_stuck: bool) -> Result<()> {
        let stopped = self.stop();
        while wait_stuck && !self.threads.is_empty() && !self.wait_timeout(Duration::from_secs(10)) {
            eprintln!("ublk: device {}: a queue thread is still in a callback; waiting for it", self.info.dev_id);
        }
        if !self.threads.is_empty() {
            // Queue threads still use the char fd and its mappings: closing it
            // now would leave DEL_DEV waiting for nothing. Leak the device.
            return stopped;
        }
        if self.recovering {
            // A recovery that did not get to serve: the device stays for
            // another `recover` (or `ublk del`), with its state file.
            self.char_file = None;
            self.info.dev_id = u32::MAX;
            self.exits = None;
            return stopped;
        }
        // While this process holds /dev/ublkcN the id cannot go to another
        // device (the kernel frees it once the char device is released), so
        // the state file and the id are surely still this device's here. So
        // the state file goes first, and the delete is sent before the char
        // fd closes (DEL_DEV_ASYNC; DEL_DEV itself would wait for that
        // close): after an outside `ublk del`, DEL_DEV sent after the close
        // could delete a new device that took the id meanwhile.
        let id = self.info.dev_id;
        StateFile::remove(&self.cfg.state_dir, id);
        let sent = gone_is_done(self.ctrl.del_dev_async(id, self.cfg.timeout));
        self.char_file = None;
        // a kernel before 6.9 (or one refusing it): the old order
        let del = sent.or_else(|_| gone_is_done(self.ctrl.del_dev(id, self.cfg.timeout)));
        self.exits = None;
        self.info.dev_id = u32::MAX;
        stopped.and(del)
    }
}

/// Whether a state file describes the device the kernel knows as `info`:
/// the token `add` gave the kernel (`ublksrv_flags`) and recorded in the
/// file, and the queue count and depth. A file left by an earlier device
/// with this id (deleted by another tool, or a `--state-dir` that `ublk del`
/// does not know) would otherwise serve another device's data (ESTALE).
fn check_state_is_of(state: &StateFile, info: &ublksrv_ctrl_dev_info) -> Result<()> {
    let id = info.dev_id;
    let stale =
        |why: String| Err(Error::new(libc::ESTALE, format!("device {id}: its state file is of an earlier device with this id ({why}): delete the file")));
    if let Some(t) = state.get("token") {
        let t =
            u64::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| Error::inval(format!("device {id}: the state file's token '{t}' is invalid")))?;
        if t != info.ublksrv_flags {
            return stale(format!("token {t:#x}, the device's {:#x}", info.ublksrv_flags));
        }
    }
    let (q, d) = (state.get("queues").unwrap_or(""), state.get("depth").unwrap_or(""));
    if q != info.nr_hw_queues.to_string() || d != info.queue_depth.to_string() {
        return stale(format!("{q} queue(s) of depth {d}, the device has {} of depth {}", info.nr_hw_queues, info.queue_depth));
    }
    Ok(())
}

/// A STOP_DEV or DEL_DEV result, with a device already gone (ENODEV,
/// ENOENT) counted as done.
pub(crate) fn gone_is_done(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.errno() == libc::ENODEV || e.errno() == libc::ENOENT => Ok(()),
        r => r,
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.info.dev_id != u32::MAX {
            if let Err(e) = self.teardown(false) {
                eprintln!("ublk: removing device {}: {e}", self.info.dev_id);
            }
        }
    }
}

/// Deletes a device by id (root: any device; others: their own unprivileged
/// devices), waiting at most `timeout`.
pub fn delete_device(dev_id: u32, timeout: Duration) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    ctrl.attach(dev_id)?;
    // The state file is set aside while device `dev_id` still holds the id:
    // once DEL_DEV returns, a new device may take the id and write its own.
    let dir = crate::state::default_dir();
    let aside = StateFile::set_aside(&dir, dev_id);
    let r = ctrl.del_dev(dev_id, timeout);
    if let Some(a) = aside {
        StateFile::put_back(&dir, dev_id, &a, r.is_err());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_of_an_earlier_device_is_stale() {
        let info = ublksrv_ctrl_dev_info { dev_id: 4, nr_hw_queues: 2, queue_depth: 64, ublksrv_flags: 0xabc, ..Default::default() };
        let mut s = StateFile::default();
        s.set("queues", "2");
        s.set("depth", "64");
        // no token (a file of an older version): the shape decides
        check_state_is_of(&s, &info).unwrap();
        s.set("token", "0xabc");
        check_state_is_of(&s, &info).unwrap();
        s.set("token", "0xabd");
        let e = check_state_is_of(&s, &info).unwrap_err();
        assert_eq!(e.errno(), libc::ESTALE);
        assert!(e.to_string().contains("earlier device"), "{e}");
        s.set("token", "0xabc");
        s.set("depth", "128");
        assert_eq!(check_state_is_of(&s, &info).unwrap_err().errno(), libc::ESTALE);
        s.set("depth", "64");
        s.set("token", "zz");
        assert_eq!(check_state_is_of(&s, &info).unwrap_err().errno(), libc::EINVAL);
    }
}
