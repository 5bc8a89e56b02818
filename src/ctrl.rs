//! The control device `/dev/ublk-control`: every command is a `URING_CMD` on an
//! SQE128 ring, and every command has a timeout.
//!
//! A ring is made per command: control commands are rare, and a private ring
//! means a command that timed out (left blocked in an io-wq worker) can never
//! hold up another one.

use crate::error::{Error, Result};
use crate::sys::{self, ublk_params, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::time::Duration;

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Default timeout of a control command. START_DEV / DEL_DEV may legitimately
/// wait on the server; nothing else should take long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An open `/dev/ublk-control`.
pub struct Ctrl {
    file: File,
    legacy: bool,
    /// The device commands are for an unprivileged device: each one carries
    /// the device's char path, which the kernel checks the caller may open.
    unprivileged: bool,
}

/// Bytes the char-device path takes at the start of a command's buffer
/// (unprivileged devices, GET_DEV_INFO2): the NUL-padded path, a multiple
/// of 8 so that the payload after it stays aligned.
const DEV_PATH_LEN: usize = 32;

/// What a command carries in `ctrl_cmd.addr`.
enum Payload<'a> {
    None,
    In(&'a [u8]),
    Out(&'a mut [u8]),
}

impl Ctrl {
    /// Opens the control device. A missing node gets a message naming the module.
    pub fn open() -> Result<Ctrl> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL_PATH).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => " (is the ublk_drv module loaded? try `modprobe ublk_drv`)",
                Some(libc::EACCES) | Some(libc::EPERM) => " (ublk needs root, or a udev rule for unprivileged devices)",
                _ => "",
            };
            Error::from_io(e, format!("cannot open {CONTROL_PATH}{hint}"))
        })?;
        Ok(Ctrl { file, legacy: false, unprivileged: false })
    }

    /// Whether the device commands are for an unprivileged device
    /// (`UBLK_F_UNPRIVILEGED_DEV`): they then carry its char path.
    pub fn set_unprivileged(&mut self, on: bool) {
        self.unprivileged = on;
    }

    /// Learns from the kernel whether `dev_id` is an unprivileged device, and
    /// sends its commands accordingly from now on. Returns its info.
    pub fn attach(&mut self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        let info = self.get_dev_info(dev_id)?;
        self.unprivileged = info.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0;
        Ok(info)
    }

    /// Sends one command and waits for its completion for at most `timeout`.
    /// Returns the CQE result (>= 0) or the kernel's error.
    fn command(&self, name: &str, op: u32, mut cmd: ublksrv_ctrl_cmd, payload: Payload<'_>, timeout: Duration) -> Result<i32> {
        // The payload is copied into a heap buffer that is leaked if the command
        // cannot be confirmed finished: the kernel may still write to it.
        // Device commands of unprivileged devices (and GET_DEV_INFO2) start
        // it with the char-device path, checked by the kernel.
        let with_path = op == sys::UBLK_U_CMD_GET_DEV_INFO2 || (self.unprivileged && op != sys::UBLK_U_CMD_ADD_DEV && op != sys::UBLK_U_CMD_GET_FEATURES);
        let skip = if with_path { DEV_PATH_LEN } else { 0 };
        let mut buf = vec![0u8; skip];
        if with_path {
            let p = format!("/dev/ublkc{}", cmd.dev_id);
            buf[..p.len()].copy_from_slice(p.as_bytes());
            cmd.dev_path_len = DEV_PATH_LEN as u16;
        }
        match &payload {
            Payload::None => {}
            Payload::In(b) => buf.extend_from_slice(b),
            Payload::Out(b) => buf.extend_from_slice(b),
        }
        if !buf.is_empty() {
            cmd.addr = buf.as_mut_ptr() as u64;
            cmd.len = u16::try_from(buf.len()).map_err(|_| Error::inval(format!("{name}: payload too large")))?;
        }
        let mut raw = [0u8; 80];
        // SAFETY: ublksrv_ctrl_cmd is a 32-byte plain-data repr(C) struct; 80 >= 32.
        unsafe { std::ptr::write_unaligned(raw.as_mut_ptr() as *mut ublksrv_ctrl_cmd, cmd) };
        let opcode = if self.legacy { sys::legacy_opcode(op) } else { op };
        let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
            IoUring::builder().build(4).map_err(|e| Error::from_io(e, format!("{name}: cannot create the control io_uring")))?;
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), opcode).cmd(raw).build().user_data(1);
        // SAFETY: the SQE references `buf`, which outlives the command (leaked on timeout).
        unsafe { ring.submission().push(&sqe) }.map_err(|_| Error::new(libc::EBUSY, format!("{name}: control ring full")))?;

        let deadline = std::time::Instant::now() + timeout;
        let res = loop {
            if let Some(cqe) = ring.completion().next() {
                break Some(cqe.result());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break None;
            }
            let left = deadline - now;
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
                Err(e) => {
                    std::mem::forget(buf);
                    return Err(Error::from_io(e, format!("{name}: io_uring_enter failed")));
                }
            }
        };
        let res = match res {
            Some(r) => r,
            None => {
                // Ask io_uring to cancel it; dropping the ring cancels it anyway.
                let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
                let cancel = squeue::Entry128::from(cancel);
                // SAFETY: AsyncCancel references no memory.
                let _ = unsafe { ring.submission().push(&cancel) };
                let ts = types::Timespec::new().sec(1);
                let _ = ring.submitter().submit_with_args(2, &types::SubmitArgs::new().timespec(&ts));
                let done = ring.completion().any(|c| c.user_data() == 1);
                if !done {
                    std::mem::forget(buf);
                }
                return Err(Error::new(libc::ETIMEDOUT, format!("{name}: no answer from the kernel within {timeout:?}")));
            }
        };
        if res < 0 {
            return Err(Error::new(-res, format!("{name} refused by the kernel")));
        }
        if let Payload::Out(b) = payload {
            b.copy_from_slice(&buf[skip..]);
        }
        Ok(res)
    }

    fn dev_cmd(dev_id: u32) -> ublksrv_ctrl_cmd {
        ublksrv_ctrl_cmd { dev_id, queue_id: u16::MAX, ..Default::default() }
    }

    /// `UBLK_U_CMD_GET_FEATURES`: the kernel's `UBLK_F_*` bits.
    pub fn get_features(&mut self) -> Result<u64> {
        let mut out = [0u8; 8];
        match self.command("GET_FEATURES", sys::UBLK_U_CMD_GET_FEATURES, Self::dev_cmd(u32::MAX), Payload::Out(&mut out), DEFAULT_TIMEOUT) {
            Ok(_) => Ok(u64::from_ne_bytes(out)),
            Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::EINVAL => {
                // Before 6.5 there is no GET_FEATURES. Find out whether encoded
                // opcodes work at all (6.4) so later commands can fall back.
                let probe =
                    self.command("GET_DEV_INFO", sys::UBLK_U_CMD_GET_DEV_INFO, Self::dev_cmd(u32::MAX - 1), Payload::Out(&mut [0u8; 64]), DEFAULT_TIMEOUT);
                if matches!(&probe, Err(p) if p.errno() == libc::EOPNOTSUPP) {
                    self.legacy = true;
                }
                Err(Error::new(libc::EOPNOTSUPP, "the running kernel has no GET_FEATURES: ublk needs Linux 6.5 or newer"))
            }
            Err(e) => Err(e),
        }
    }

    /// `UBLK_U_CMD_ADD_DEV`. `info` goes in and comes back as the kernel set it.
    pub fn add_dev(&self, info: &mut ublksrv_ctrl_dev_info) -> Result<()> {
        let cmd = ublksrv_ctrl_cmd { dev_id: info.dev_id, queue_id: u16::MAX, ..Default::default() };
        self.command("ADD_DEV", sys::UBLK_U_CMD_ADD_DEV, cmd, Payload::Out(as_bytes_mut(info)), DEFAULT_TIMEOUT).map(drop)
    }

    /// `UBLK_U_CMD_DEL_DEV`: waits until the server has released `/dev/ublkcN`.
    pub fn del_dev(&self, dev_id: u32, timeout: Duration) -> Result<()> {
        self.command("DEL_DEV", sys::UBLK_U_CMD_DEL_DEV, Self::dev_cmd(dev_id), Payload::None, timeout).map(drop)
    }

    /// `UBLK_U_CMD_DEL_DEV_ASYNC` (6.9+): deletes without waiting for the
    /// server to release `/dev/ublkcN`; the id stays taken until it does.
    pub fn del_dev_async(&self, dev_id: u32, timeout: Duration) -> Result<()> {
        self.command("DEL_DEV_ASYNC", sys::UBLK_U_CMD_DEL_DEV_ASYNC, Self::dev_cmd(dev_id), Payload::None, timeout).map(drop)
    }

    /// `UBLK_U_CMD_START_DEV`: blocks until every tag has been fetched.
    pub fn start_dev(&self, dev_id: u32, pid: i32, timeout: Duration) -> Result<()> {
        let mut cmd = Self::dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.command("START_DEV", sys::UBLK_U_CMD_START_DEV, cmd, Payload::None, timeout).map(drop)
    }

    /// `UBLK_U_CMD_STOP_DEV`.
    pub fn stop_dev(&self, dev_id: u32, timeout: Duration) -> Result<()> {
        self.command("STOP_DEV", sys::UBLK_U_CMD_STOP_DEV, Self::dev_cmd(dev_id), Payload::None, timeout).map(drop)
    }

    /// `UBLK_U_CMD_SET_PARAMS` (only before START_DEV).
    pub fn set_params(&self, dev_id: u32, params: &ublk_params) -> Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<ublk_params>() as u32;
        self.command("SET_PARAMS", sys::UBLK_U_CMD_SET_PARAMS, Self::dev_cmd(dev_id), Payload::In(as_bytes_mut(&mut p)), DEFAULT_TIMEOUT).map(drop)
    }

    /// `UBLK_U_CMD_GET_PARAMS`.
    pub fn get_params(&self, dev_id: u32) -> Result<ublk_params> {
        let mut p = ublk_params { len: std::mem::size_of::<ublk_params>() as u32, ..Default::default() };
        self.command("GET_PARAMS", sys::UBLK_U_CMD_GET_PARAMS, Self::dev_cmd(dev_id), Payload::Out(as_bytes_mut(&mut p)), DEFAULT_TIMEOUT)?;
        Ok(p)
    }

    /// `UBLK_U_CMD_GET_DEV_INFO2`: the device info, for anyone who may
    /// open `/dev/ublkcN` (root, or the owner of an unprivileged device).
    /// Without that node in this mount namespace, `GET_DEV_INFO` (root only).
    pub fn get_dev_info(&self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        let mut info = ublksrv_ctrl_dev_info::default();
        let r = self.command("GET_DEV_INFO2", sys::UBLK_U_CMD_GET_DEV_INFO2, Self::dev_cmd(dev_id), Payload::Out(as_bytes_mut(&mut info)), DEFAULT_TIMEOUT);
        match r {
            Err(e) if e.errno() == libc::ENOENT && !self.unprivileged => {
                self.command("GET_DEV_INFO", sys::UBLK_U_CMD_GET_DEV_INFO, Self::dev_cmd(dev_id), Payload::Out(as_bytes_mut(&mut info)), DEFAULT_TIMEOUT)?;
            }
            r => {
                r?;
            }
        }
        Ok(info)
    }

    /// `UBLK_U_CMD_GET_QUEUE_AFFINITY`: the CPUs the kernel maps to a queue.
    pub fn get_queue_affinity(&self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let mut cmd = Self::dev_cmd(dev_id);
        cmd.data[0] = q_id as u64;
        let mut mask = vec![0u8; 1024]; // 8192 CPUs, a multiple of sizeof(long)
        self.command("GET_QUEUE_AFFINITY", sys::UBLK_U_CMD_GET_QUEUE_AFFINITY, cmd, Payload::Out(&mut mask), DEFAULT_TIMEOUT)?;
        Ok((0..mask.len() * 8).filter(|cpu| mask[cpu / 8] & (1 << (cpu % 8)) != 0).collect())
    }

    /// `UBLK_U_CMD_START_USER_RECOVERY`.
    pub fn start_user_recovery(&self, dev_id: u32) -> Result<()> {
        self.command("START_USER_RECOVERY", sys::UBLK_U_CMD_START_USER_RECOVERY, Self::dev_cmd(dev_id), Payload::None, DEFAULT_TIMEOUT).map(drop)
    }

    /// `UBLK_U_CMD_END_USER_RECOVERY`: blocks until the new server fetched every tag.
    pub fn end_user_recovery(&self, dev_id: u32, pid: i32, timeout: Duration) -> Result<()> {
        let mut cmd = Self::dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.command("END_USER_RECOVERY", sys::UBLK_U_CMD_END_USER_RECOVERY, cmd, Payload::None, timeout).map(drop)
    }
}

/// Views a plain-data repr(C) kernel struct as bytes.
fn as_bytes_mut<T: Copy>(v: &mut T) -> &mut [u8] {
    // SAFETY: only used with the repr(C) integer-only structs of `sys`, which have
    // no padding-dependent invariants; any byte pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(v as *mut T as *mut u8, std::mem::size_of::<T>()) }
}

/// Ids of the ublk devices that exist now (from sysfs), sorted.
pub fn list_device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}
