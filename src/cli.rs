//! Argument parsing of the `ublk` CLI, without side effects (here so that
//! it can be fuzzed: `make fuzz`).

use crate::{DeviceConfig, Error};
use std::path::PathBuf;

/// Parses `4096`, `64K`, `1M`, `2G`, `1T` (also `KB`/`KiB` forms).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suf) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size `{s}`"));
    }
    let n: u64 = num.parse().map_err(|_| format!("invalid size `{s}`"))?;
    let mult: u64 = match suf.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("invalid size suffix in `{s}` (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size `{s}` is too large"))
}

/// Shows a size exactly, with the largest suffix that divides it.
pub fn format_size(v: u64) -> String {
    for (shift, suf) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if v >= 1 << shift && v % (1 << shift) == 0 {
            return format!("{}{suf}", v >> shift);
        }
    }
    v.to_string()
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag}: invalid number `{v}`"))
}

/// What `ublk add` was asked for.
#[derive(Debug)]
pub struct AddArgs {
    /// `null`, `mem`, `loop` or `nbd`.
    pub target: String,
    /// The device configuration the flags set (size and target settings are
    /// completed by the CLI from the target).
    pub cfg: DeviceConfig,
    /// `--size`, if given.
    pub size: Option<u64>,
    /// `--file`, if given.
    pub file: Option<PathBuf>,
    /// The nbd target's `--host`, `--port`, `--export`, `--connections`,
    /// `--timeout`.
    pub nbd: crate::targets::nbd::NbdConfig,
    /// Whether any of the nbd flags was given (they are for nbd only).
    pub nbd_flags: bool,
    pub foreground: bool,
}

/// Parses the arguments of `ublk add` (after `add`). Errors are usage
/// messages.
pub fn parse_add(args: &[String]) -> Result<AddArgs, String> {
    let target = args.first().ok_or_else(|| "add: missing target (null, mem, loop or nbd)".to_string())?.clone();
    if !["null", "mem", "loop", "nbd"].contains(&target.as_str()) {
        return Err(format!("add: unknown target `{target}` (null, mem, loop or nbd)"));
    }
    let mut a = AddArgs { target, cfg: DeviceConfig::default(), size: None, file: None, nbd: Default::default(), nbd_flags: false, foreground: false };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (flag.as_str(), None),
        };
        let mut value = || -> Result<String, String> { inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{flag} needs a value")) };
        match flag {
            "--queues" | "-q" => a.cfg.queues = parse_num(flag, &value()?)?,
            "--depth" | "-d" => a.cfg.depth = parse_num(flag, &value()?)?,
            "--size" | "-s" => a.size = Some(parse_size(&value()?)?),
            "--file" | "-f" => a.file = Some(PathBuf::from(value()?)),
            "--max-io-size" => {
                let v = parse_size(&value()?)?;
                a.cfg.max_io_bytes = u32::try_from(v).map_err(|_| format!("--max-io-size {v} is too large"))?;
            }
            "--logical-block-size" => a.cfg.logical_block_size = parse_num(flag, &value()?)?,
            "--id" | "-n" => a.cfg.dev_id = Some(parse_num(flag, &value()?)?),
            "--read-only" => a.cfg.read_only = true,
            "--zero-copy" | "-z" => a.cfg.zero_copy = value()?.parse().map_err(|e: Error| format!("--zero-copy: {}", e.message()))?,
            "--recovery" | "-r" => a.cfg.recovery = value()?.parse().map_err(|e: Error| format!("--recovery: {}", e.message()))?,
            "--state-dir" => a.cfg.state_dir = PathBuf::from(value()?),
            "--affinity" => a.cfg.affinity = value()?.parse().map_err(|e: Error| format!("--affinity: {}", e.message()))?,
            "--foreground" => a.foreground = true,
            "--host" => {
                a.nbd.host = value()?;
                a.nbd_flags = true;
            }
            "--port" => {
                a.nbd.port = parse_num(flag, &value()?)?;
                a.nbd_flags = true;
            }
            "--export" => {
                a.nbd.export = value()?;
                a.nbd_flags = true;
            }
            "--connections" => {
                a.nbd.connections = parse_num(flag, &value()?)?;
                a.nbd_flags = true;
            }
            "--timeout" => {
                let secs: u64 = parse_num(flag, &value()?)?;
                a.nbd.timeout = std::time::Duration::from_secs(secs.min(1 << 32));
                a.nbd_flags = true;
            }
            _ => return Err(format!("add: unknown option `{flag}`")),
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("3T").unwrap(), 3 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("9999999999T").is_err());
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn add_flags() {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let a = parse_add(&v("loop --recovery=reissue --state-dir /x -z copy")).unwrap();
        assert_eq!(a.cfg.recovery, crate::Recovery::Reissue);
        assert_eq!(a.cfg.state_dir, PathBuf::from("/x"));
        assert!(parse_add(&v("loop --recovery sometimes")).unwrap_err().contains("unknown recovery policy"));
        let a = parse_add(&v("nbd --host 10.0.0.1 --port=10810 --export disk --connections 4 --timeout 5")).unwrap();
        assert_eq!((a.nbd.host.as_str(), a.nbd.port, a.nbd.export.as_str(), a.nbd.connections), ("10.0.0.1", 10810, "disk", 4));
        assert_eq!(a.nbd.timeout, std::time::Duration::from_secs(5));
        assert!(parse_add(&v("nbd --port 70000")).is_err());
        assert!(parse_add(&v("nbd --connections x")).is_err());
        assert!(parse_add(&v("nbd --host")).is_err());
        assert_eq!(parse_add(&v("null")).unwrap().cfg.affinity, crate::Affinity::Single);
        assert_eq!(parse_add(&v("null --affinity all")).unwrap().cfg.affinity, crate::Affinity::All);
        assert!(parse_add(&v("null --affinity some")).unwrap_err().contains("want single or all"));
    }
}
