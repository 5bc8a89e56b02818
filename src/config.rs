//! Device configuration: what a device is made with, its checks, the kernel
//! parameters it becomes, and its record in the state file (so that a new
//! server process can recover the device after a crash).

use crate::ctrl::DEFAULT_TIMEOUT;
use crate::device::feature_names;
use crate::error::{Error, Result};
use crate::mode::{ZeroCopy, MODE_FLAGS};
use crate::state::StateFile;
use crate::sys::{self, ublk_params};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What the kernel does with a device whose server died (even `kill -9`).
/// With any policy but `None` the device survives its server: a new process
/// takes it over with [`crate::Device::recover`] (`ublk recover ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recovery {
    /// The device is stopped when its server dies; IO in flight fails.
    #[default]
    None,
    /// `USER_RECOVERY | USER_RECOVERY_REISSUE`: the requests the dead server
    /// held are requeued and sent again to the new server (a write may be
    /// done twice, which is harmless for a block device); new IO waits.
    Reissue,
    /// `USER_RECOVERY | USER_RECOVERY_FAIL_IO`: while no server runs, every
    /// IO fails at once with an IO error (EIO, or EREMOTEIO as the kernel
    /// reports it to readers), the requests the dead server held too.
    Fail,
    /// `USER_RECOVERY`: the requests the dead server held fail (EIO); new
    /// IO waits for the new server.
    Wait,
}

impl Recovery {
    pub const NAMES: [&'static str; 4] = ["none", "reissue", "fail", "wait"];
    /// Every `UBLK_F_*` bit a policy may set.
    pub const FLAGS: u64 = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE | sys::UBLK_F_USER_RECOVERY_FAIL_IO;

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The `UBLK_F_*` bits of the policy.
    pub fn flags(self) -> u64 {
        match self {
            Recovery::None => 0,
            Recovery::Reissue => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
            Recovery::Fail => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_FAIL_IO,
            Recovery::Wait => sys::UBLK_F_USER_RECOVERY,
        }
    }

    /// The policy of a device, from its `UBLK_F_*` bits.
    pub fn from_flags(flags: u64) -> Recovery {
        if flags & sys::UBLK_F_USER_RECOVERY == 0 {
            Recovery::None
        } else if flags & sys::UBLK_F_USER_RECOVERY_REISSUE != 0 {
            Recovery::Reissue
        } else if flags & sys::UBLK_F_USER_RECOVERY_FAIL_IO != 0 {
            Recovery::Fail
        } else {
            Recovery::Wait
        }
    }
}

impl FromStr for Recovery {
    type Err = Error;
    fn from_str(s: &str) -> Result<Recovery> {
        match Self::NAMES.iter().position(|n| *n == s) {
            Some(0) => Ok(Recovery::None),
            Some(1) => Ok(Recovery::Reissue),
            Some(2) => Ok(Recovery::Fail),
            Some(3) => Ok(Recovery::Wait),
            _ => Err(Error::inval(format!("unknown recovery policy '{s}' (want one of {})", Self::NAMES.join(", ")))),
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// What happens when the server dies (see [`Recovery`]).
    pub recovery: Recovery,
    /// Where the state file goes (default: `$UBLK_STATE_DIR`, else `/run/ublk`).
    pub state_dir: PathBuf,
    /// Bound on each wait for the kernel (START, STOP, DEL, device nodes).
    pub timeout: Duration,
    /// Which CPUs each queue thread runs on (see [`Affinity`]).
    pub affinity: Affinity,
}

/// CPU placement of the queue threads (and of the io_uring workers they
/// start, which inherit it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Affinity {
    /// One CPU of the set the kernel maps to the queue (`GET_QUEUE_AFFINITY`),
    /// the one at index `device id mod set size`, so that single-queue
    /// devices spread over the CPUs: the thread keeps its caches and never
    /// migrates (what libublk-rs and rublk do by default). The default.
    #[default]
    Single,
    /// The whole set the kernel maps to the queue: the scheduler places the
    /// thread.
    All,
}

impl Affinity {
    pub fn name(self) -> &'static str {
        match self {
            Affinity::Single => "single",
            Affinity::All => "all",
        }
    }

    /// The CPUs a queue thread of device `dev_id` runs on, given the set the
    /// kernel maps to its queue.
    pub fn pick(self, dev_id: u32, set: &[usize]) -> Vec<usize> {
        match (self, set.len()) {
            (Affinity::Single, n) if n > 0 => vec![set[dev_id as usize % n]],
            _ => set.to_vec(),
        }
    }
}

impl std::str::FromStr for Affinity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Affinity> {
        match s {
            "single" => Ok(Affinity::Single),
            "all" => Ok(Affinity::All),
            _ => Err(Error::inval(format!("affinity '{s}': want single or all"))),
        }
    }
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
            recovery: Recovery::None,
            state_dir: crate::state::default_dir(),
            timeout: DEFAULT_TIMEOUT,
            affinity: Affinity::Single,
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
        if self.flags & Recovery::FLAGS != 0 {
            return Err(Error::inval(format!(
                "flags {}: recovery is chosen with the recovery setting, not with UBLK_F_* bits",
                feature_names(self.flags & Recovery::FLAGS).join(", ")
            )));
        }
        if self.recovery != Recovery::None && self.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0 {
            return Err(Error::inval("recovery is not available for unprivileged devices (the kernel allows it to root only)"));
        }
        if self.flags & MODE_FLAGS != 0 {
            return Err(Error::inval(format!(
                "flags {}: the data mode is chosen with zero_copy, not with UBLK_F_* bits",
                feature_names(self.flags & MODE_FLAGS).join(", ")
            )));
        }
        Ok(())
    }

    pub(crate) fn params(&self, max_io_bytes: u32) -> ublk_params {
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

/// Prefix of the target's own entries in the state file.
const ARG_PREFIX: &str = "arg.";

fn parse_field<T: FromStr>(s: &StateFile, key: &str) -> Result<T> {
    let v = s.get(key).ok_or_else(|| Error::inval(format!("the state file has no '{key}'")))?;
    v.parse().map_err(|_| Error::inval(format!("the state file's '{key}' is invalid: '{v}'")))
}

fn flag(v: bool) -> &'static str {
    if v {
        "1"
    } else {
        "0"
    }
}

impl DeviceConfig {
    /// Records the configuration in `s` (the device's state file), so that
    /// [`DeviceConfig::from_state`] gives it back to a recovering process.
    pub fn to_state(&self, s: &mut StateFile) {
        s.set("target", self.target_name.clone());
        s.set("recovery", self.recovery.name());
        s.set("size", self.size.to_string());
        s.set("logical_block_size", self.logical_block_size.to_string());
        s.set("physical_block_size", self.physical_block_size.to_string());
        s.set("queues", self.queues.to_string());
        s.set("depth", self.depth.to_string());
        s.set("max_io_bytes", self.max_io_bytes.to_string());
        s.set("read_only", flag(self.read_only));
        s.set("rotational", flag(self.rotational));
        s.set("volatile_cache", flag(self.volatile_cache));
        let discard = self.discard.map_or("none".to_string(), |d| format!("{},{},{}", d.granularity, d.max_discard_sectors, d.max_write_zeroes_sectors));
        s.set("discard", discard);
        s.set("zero_copy", self.zero_copy.name());
        s.set("needs_buffer", flag(self.needs_buffer));
        s.set("flags", format!("{:#x}", self.flags));
        s.set("timeout_ms", self.timeout.as_millis().to_string());
        s.set("affinity", self.affinity.name());
        for (k, v) in &self.target_args {
            s.set(&format!("{ARG_PREFIX}{k}"), v.clone());
        }
    }

    /// The configuration recorded by [`DeviceConfig::to_state`].
    pub fn from_state(s: &StateFile) -> Result<DeviceConfig> {
        let b = |key: &str| -> Result<bool> { Ok(parse_field::<u8>(s, key)? != 0) };
        let discard = match s.get("discard") {
            None | Some("none") => None,
            Some(v) => {
                let n: Vec<u32> = v
                    .split(',')
                    .map(|x| x.parse())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| Error::inval(format!("the state file's 'discard' is invalid: '{v}'")))?;
                match n[..] {
                    [g, d, w] => Some(DiscardLimits { granularity: g, max_discard_sectors: d, max_write_zeroes_sectors: w }),
                    _ => return Err(Error::inval(format!("the state file's 'discard' is invalid: '{v}'"))),
                }
            }
        };
        let flags = s.get("flags").unwrap_or("0");
        let flags =
            u64::from_str_radix(flags.trim_start_matches("0x"), 16).map_err(|_| Error::inval(format!("the state file's 'flags' is invalid: '{flags}'")))?;
        let cfg = DeviceConfig {
            dev_id: None,
            size: parse_field(s, "size")?,
            logical_block_size: parse_field(s, "logical_block_size")?,
            physical_block_size: parse_field(s, "physical_block_size")?,
            queues: parse_field(s, "queues")?,
            depth: parse_field(s, "depth")?,
            max_io_bytes: parse_field(s, "max_io_bytes")?,
            read_only: b("read_only")?,
            rotational: b("rotational")?,
            volatile_cache: b("volatile_cache")?,
            discard,
            zero_copy: parse_field(s, "zero_copy")?,
            needs_buffer: b("needs_buffer")?,
            flags,
            target_name: s.get("target").unwrap_or("custom").to_string(),
            target_args: s.entries.iter().filter_map(|(k, v)| Some((k.strip_prefix(ARG_PREFIX)?.to_string(), v.clone()))).collect(),
            recovery: parse_field(s, "recovery")?,
            state_dir: crate::state::default_dir(),
            timeout: Duration::from_millis(parse_field(s, "timeout_ms")?),
            // (state files written before the field existed: the default)
            affinity: match s.get("affinity") {
                None => Affinity::default(),
                Some(_) => parse_field(s, "affinity")?,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The value of the target argument `key` (see `target_args`).
    pub fn target_arg(&self, key: &str) -> Option<&str> {
        self.target_args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_names_and_flags() {
        for name in Recovery::NAMES {
            let r: Recovery = name.parse().unwrap();
            assert_eq!(r.name(), name);
            assert_eq!(Recovery::from_flags(r.flags()), r);
        }
        assert_eq!("restart".parse::<Recovery>().unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn state_round_trip() {
        let cfg = DeviceConfig {
            size: 1 << 30,
            queues: 2,
            depth: 64,
            read_only: true,
            discard: Some(DiscardLimits::default()),
            zero_copy: ZeroCopy::Register,
            recovery: Recovery::Reissue,
            target_name: "loop".into(),
            target_args: vec![("file".into(), "/tmp/a b=c".into()), ("size".into(), "3".into())],
            timeout: Duration::from_millis(1500),
            ..Default::default()
        };
        let mut s = StateFile::default();
        s.set("pid", "1");
        cfg.to_state(&mut s);
        let back = DeviceConfig::from_state(&StateFile::parse(&s.render())).unwrap();
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        assert_eq!(back.target_arg("file"), Some("/tmp/a b=c"));
        s.set("queues", "many");
        assert_eq!(DeviceConfig::from_state(&s).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn recovery_flags_are_not_raw_flags() {
        let cfg = DeviceConfig { size: 1 << 20, flags: sys::UBLK_F_USER_RECOVERY, ..Default::default() };
        assert_eq!(cfg.validate().unwrap_err().errno(), libc::EINVAL);
        let cfg = DeviceConfig { size: 1 << 20, recovery: Recovery::Wait, flags: sys::UBLK_F_UNPRIVILEGED_DEV, ..Default::default() };
        assert_eq!(cfg.validate().unwrap_err().errno(), libc::EINVAL);
    }
}
