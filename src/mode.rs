//! Data modes: how request data moves between `/dev/ublkbN` and the server,
//! and how the mode asked for is resolved against the running kernel.

use crate::error::{Error, Result};
use crate::sys;
use std::fmt;
use std::str::FromStr;

/// The data mode a device is asked to use (`--zero-copy MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// The best the kernel offers: auto-buf-reg, then register, then
    /// user-copy, then copy (copy when the target needs the data in memory).
    #[default]
    Auto,
    /// `UBLK_F_AUTO_BUF_REG`: the kernel registers each request's buffer in
    /// the queue ring's buffer table before handing the request over.
    AutoBufReg,
    /// `UBLK_F_SUPPORT_ZERO_COPY`: the engine registers a request's buffer
    /// (`UBLK_U_IO_REGISTER_IO_BUF`) when a lease first uses it.
    Register,
    /// `UBLK_F_USER_COPY`: data is copied with pread/pwrite on `/dev/ublkcN`.
    UserCopy,
    /// The kernel copies data into and out of a per-tag server buffer.
    Copy,
}

impl ZeroCopy {
    pub const NAMES: [&'static str; 5] = ["auto", "auto-buf-reg", "register", "user-copy", "copy"];

    pub fn name(self) -> &'static str {
        match self {
            ZeroCopy::Auto => "auto",
            ZeroCopy::AutoBufReg => "auto-buf-reg",
            ZeroCopy::Register => "register",
            ZeroCopy::UserCopy => "user-copy",
            ZeroCopy::Copy => "copy",
        }
    }
}

impl FromStr for ZeroCopy {
    type Err = Error;
    fn from_str(s: &str) -> Result<ZeroCopy> {
        Ok(match s {
            "auto" => ZeroCopy::Auto,
            "auto-buf-reg" => ZeroCopy::AutoBufReg,
            "register" => ZeroCopy::Register,
            "user-copy" => ZeroCopy::UserCopy,
            "copy" => ZeroCopy::Copy,
            _ => return Err(Error::inval(format!("unknown zero-copy mode '{s}' (want one of {})", ZeroCopy::NAMES.join(", ")))),
        })
    }
}

impl fmt::Display for ZeroCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The data mode a device runs in (what `ZeroCopy` resolved to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    Copy,
    UserCopy,
    Register,
    AutoBufReg,
}

/// `UBLK_F_*` bits that select a data mode; set through `ZeroCopy`, never by hand.
pub(crate) const MODE_FLAGS: u64 = sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_USER_COPY | sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_NEED_GET_DATA;

impl DataMode {
    pub fn name(self) -> &'static str {
        match self {
            DataMode::Copy => "copy",
            DataMode::UserCopy => "user-copy",
            DataMode::Register => "register",
            DataMode::AutoBufReg => "auto-buf-reg",
        }
    }

    /// The mode a device with these negotiated `UBLK_F_*` bits runs in.
    pub fn from_flags(flags: u64) -> DataMode {
        if flags & sys::UBLK_F_AUTO_BUF_REG != 0 {
            DataMode::AutoBufReg
        } else if flags & sys::UBLK_F_SUPPORT_ZERO_COPY != 0 {
            DataMode::Register
        } else if flags & sys::UBLK_F_USER_COPY != 0 {
            DataMode::UserCopy
        } else {
            DataMode::Copy
        }
    }

    /// Zero copy: the server never holds the data, only leases it.
    pub fn is_zero_copy(self) -> bool {
        matches!(self, DataMode::Register | DataMode::AutoBufReg)
    }

    /// Whether the engine keeps a per-tag buffer (the data itself in copy
    /// mode, a bounce buffer in user-copy mode).
    pub(crate) fn has_tag_buffers(self) -> bool {
        matches!(self, DataMode::Copy | DataMode::UserCopy)
    }

    /// `UBLK_F_*` bits to ask ADD_DEV for. auto-buf-reg adds
    /// SUPPORT_ZERO_COPY when the kernel has it, so that a request the kernel
    /// could not register (UBLK_IO_F_NEED_REG_BUF) is registered by hand.
    pub(crate) fn flags(self, kernel: u64) -> u64 {
        match self {
            DataMode::Copy => 0,
            DataMode::UserCopy => sys::UBLK_F_USER_COPY,
            DataMode::Register => sys::UBLK_F_SUPPORT_ZERO_COPY,
            DataMode::AutoBufReg => sys::UBLK_F_AUTO_BUF_REG | (kernel & sys::UBLK_F_SUPPORT_ZERO_COPY),
        }
    }
}

impl fmt::Display for DataMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Resolves the mode asked for against the kernel's `UBLK_F_*` bits.
/// `needs_buffer`: the target reads or writes request data with the CPU
/// (`Io::buf`), which only copy mode allows. `unprivileged`: the kernel
/// refuses every mode but copy for unprivileged devices.
pub fn resolve(want: ZeroCopy, kernel: u64, needs_buffer: bool, unprivileged: bool) -> Result<DataMode> {
    let need = |bit: u64, mode: DataMode| -> Result<DataMode> {
        if needs_buffer {
            return Err(Error::inval(format!("data mode {mode}: this target reads and writes request data in memory, which only copy mode allows")));
        }
        if unprivileged {
            return Err(Error::new(libc::EPERM, format!("data mode {mode} is not allowed for unprivileged devices (copy only)")));
        }
        if kernel & bit == 0 {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                format!("data mode {mode}: the running kernel lacks ublk feature {}", crate::device::feature_names(bit).join("")),
            ));
        }
        Ok(mode)
    };
    match want {
        ZeroCopy::Copy => Ok(DataMode::Copy),
        ZeroCopy::UserCopy => need(sys::UBLK_F_USER_COPY, DataMode::UserCopy),
        ZeroCopy::Register => need(sys::UBLK_F_SUPPORT_ZERO_COPY, DataMode::Register),
        ZeroCopy::AutoBufReg => need(sys::UBLK_F_AUTO_BUF_REG, DataMode::AutoBufReg),
        ZeroCopy::Auto if needs_buffer || unprivileged => Ok(DataMode::Copy),
        ZeroCopy::Auto => Ok([
            (sys::UBLK_F_AUTO_BUF_REG, DataMode::AutoBufReg),
            (sys::UBLK_F_SUPPORT_ZERO_COPY, DataMode::Register),
            (sys::UBLK_F_USER_COPY, DataMode::UserCopy),
        ]
        .into_iter()
        .find(|(bit, _)| kernel & bit != 0)
        .map_or(DataMode::Copy, |(_, m)| m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K73: u64 = 0x1fffff;
    const K612: u64 = 0x1fe;

    #[test]
    fn names_round_trip() {
        for n in ZeroCopy::NAMES {
            assert_eq!(n.parse::<ZeroCopy>().unwrap().name(), n);
        }
        assert_eq!("zc".parse::<ZeroCopy>().unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn auto_takes_the_best_the_kernel_has() {
        assert_eq!(resolve(ZeroCopy::Auto, K73, false, false).unwrap(), DataMode::AutoBufReg);
        assert_eq!(resolve(ZeroCopy::Auto, K73 & !sys::UBLK_F_AUTO_BUF_REG, false, false).unwrap(), DataMode::Register);
        assert_eq!(resolve(ZeroCopy::Auto, K612, false, false).unwrap(), DataMode::UserCopy);
        assert_eq!(resolve(ZeroCopy::Auto, 0, false, false).unwrap(), DataMode::Copy);
        assert_eq!(resolve(ZeroCopy::Auto, K73, true, false).unwrap(), DataMode::Copy);
        assert_eq!(resolve(ZeroCopy::Auto, K73, false, true).unwrap(), DataMode::Copy);
    }

    #[test]
    fn explicit_modes_are_checked() {
        assert_eq!(resolve(ZeroCopy::Register, K612, false, false).unwrap_err().errno(), libc::EOPNOTSUPP);
        assert_eq!(resolve(ZeroCopy::UserCopy, K612, false, false).unwrap(), DataMode::UserCopy);
        assert_eq!(resolve(ZeroCopy::AutoBufReg, K73, true, false).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(resolve(ZeroCopy::UserCopy, K73, false, true).unwrap_err().errno(), libc::EPERM);
        assert_eq!(resolve(ZeroCopy::Copy, 0, true, true).unwrap(), DataMode::Copy);
    }

    #[test]
    fn flags_match_modes() {
        for m in [DataMode::Copy, DataMode::UserCopy, DataMode::Register, DataMode::AutoBufReg] {
            assert_eq!(DataMode::from_flags(m.flags(K73)), m);
            assert_eq!(m.flags(K73) & !MODE_FLAGS, 0);
        }
        assert_eq!(DataMode::AutoBufReg.flags(K73), sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY);
        assert_eq!(DataMode::AutoBufReg.flags(sys::UBLK_F_AUTO_BUF_REG), sys::UBLK_F_AUTO_BUF_REG);
    }
}
