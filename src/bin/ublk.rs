//! `ublk`: create, list and delete ublk devices served by this engine.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use ublk::ctrl::{list_device_ids, Ctrl};
use ublk::state::{StateFile, DEFAULT_STATE_DIR};
use ublk::targets::{LoopBacking, LoopTarget, MemStore, MemTarget, NullTarget};
use ublk::{Device, DeviceConfig, DiscardLimits, Error, QueueInfo, Target, TargetFactory, ZeroCopy};

const USAGE: &str = "\
usage: ublk add null|mem|loop [--queues N] [--depth D] [--size S] [--file F] [--foreground]
                [--max-io-size S] [--logical-block-size N] [--read-only] [--id N]
                [--zero-copy auto|auto-buf-reg|register|user-copy|copy]
       ublk list
       ublk del ID|--all
       ublk features

Sizes take K/M/G/T suffixes (powers of 1024). `add` prints `<id> <path>` once
/dev/ublkbN exists; the server keeps running in the background unless
--foreground is given (then it serves until SIGINT/SIGTERM). --zero-copy
chooses how data moves (default auto: the best the kernel offers; the mem
target always copies); `list` shows the mode of each device.";

/// Exit codes: 0 ok, 1 the operation failed, 2 bad arguments.
enum Fail {
    Usage(String),
    Op(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Op(e.to_string())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("add") => cmd_add(&args[1..]),
        Some("list") => cmd_list(&args[1..]),
        Some("del") => cmd_del(&args[1..]),
        Some("features") => cmd_features(&args[1..]),
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(Fail::Usage(format!("unknown command `{other}`"))),
        None => Err(Fail::Usage("no command given".into())),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Usage(m)) => {
            eprintln!("ublk: {m}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Fail::Op(m)) => {
            eprintln!("ublk: {m}");
            ExitCode::from(1)
        }
    }
}

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
fn format_size(v: u64) -> String {
    for (shift, suf) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if v >= 1 << shift && v % (1 << shift) == 0 {
            return format!("{}{suf}", v >> shift);
        }
    }
    v.to_string()
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, Fail> {
    v.parse().map_err(|_| Fail::Usage(format!("{flag}: invalid number `{v}`")))
}

struct AddArgs {
    target: String,
    cfg: DeviceConfig,
    size: Option<u64>,
    file: Option<PathBuf>,
    foreground: bool,
}

fn parse_add(args: &[String]) -> Result<AddArgs, Fail> {
    let target = args.first().ok_or_else(|| Fail::Usage("add: missing target (null, mem or loop)".into()))?.clone();
    if !["null", "mem", "loop"].contains(&target.as_str()) {
        return Err(Fail::Usage(format!("add: unknown target `{target}` (null, mem or loop)")));
    }
    let mut a = AddArgs { target, cfg: DeviceConfig::default(), size: None, file: None, foreground: false };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (flag.as_str(), None),
        };
        let mut value = || -> Result<String, Fail> {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| Fail::Usage(format!("{flag} needs a value")))
        };
        match flag {
            "--queues" | "-q" => a.cfg.queues = parse_num(flag, &value()?)?,
            "--depth" | "-d" => a.cfg.depth = parse_num(flag, &value()?)?,
            "--size" | "-s" => a.size = Some(parse_size(&value()?).map_err(Fail::Usage)?),
            "--file" | "-f" => a.file = Some(PathBuf::from(value()?)),
            "--max-io-size" => {
                let v = parse_size(&value()?).map_err(Fail::Usage)?;
                a.cfg.max_io_bytes = u32::try_from(v).map_err(|_| Fail::Usage(format!("--max-io-size {v} is too large")))?;
            }
            "--logical-block-size" => a.cfg.logical_block_size = parse_num(flag, &value()?)?,
            "--id" | "-n" => a.cfg.dev_id = Some(parse_num(flag, &value()?)?),
            "--read-only" => a.cfg.read_only = true,
            "--zero-copy" | "-z" => a.cfg.zero_copy = value()?.parse().map_err(|e: Error| Fail::Usage(format!("--zero-copy: {}", e.message())))?,
            "--foreground" => a.foreground = true,
            _ => return Err(Fail::Usage(format!("add: unknown option `{flag}`"))),
        }
    }
    Ok(a)
}

/// Prepares the target and the final config; errors here are bad arguments.
fn prepare(a: &mut AddArgs) -> Result<TargetFactory, Fail> {
    a.cfg.target_name = a.target.clone();
    let factory: TargetFactory = match a.target.as_str() {
        "null" => {
            if a.file.is_some() {
                return Err(Fail::Usage("--file is only for the loop target".into()));
            }
            a.cfg.size = a.size.unwrap_or(1 << 30);
            Arc::new(|_: &QueueInfo| Ok(Box::new(NullTarget) as Box<dyn Target>))
        }
        "mem" => {
            if a.file.is_some() {
                return Err(Fail::Usage("--file is only for the loop target".into()));
            }
            a.cfg.size = a.size.unwrap_or(1 << 30);
            a.cfg.discard = Some(DiscardLimits::default());
            // the store serves requests from memory: the data must be in a buffer
            a.cfg.needs_buffer = true;
            if !matches!(a.cfg.zero_copy, ZeroCopy::Auto | ZeroCopy::Copy) {
                return Err(Fail::Usage(format!("--zero-copy {}: the mem target copies data in memory; only auto or copy", a.cfg.zero_copy)));
            }
            a.cfg.validate().map_err(|e| Fail::Usage(e.to_string()))?;
            let store = MemStore::new(a.cfg.size).map_err(|e| Fail::Op(e.to_string()))?;
            Arc::new(move |_: &QueueInfo| Ok(Box::new(MemTarget::new(store.clone())) as Box<dyn Target>))
        }
        _ => {
            let file = a.file.clone().ok_or_else(|| Fail::Usage("loop needs --file F".into()))?;
            let b = LoopBacking::open(&file, a.cfg.read_only).map_err(|e| Fail::Usage(e.to_string()))?;
            a.cfg.logical_block_size = a.cfg.logical_block_size.max(b.block_size());
            a.cfg.physical_block_size = a.cfg.physical_block_size.max(a.cfg.logical_block_size);
            let lbs = a.cfg.logical_block_size as u64;
            a.cfg.size = match a.size {
                Some(s) if s > b.size() => {
                    return Err(Fail::Usage(format!("--size {s} is larger than {} ({} bytes)", file.display(), b.size())))
                }
                Some(s) => s,
                None => b.size() / lbs * lbs,
            };
            if a.cfg.size == 0 {
                if a.size.is_some() {
                    return Err(Fail::Usage("device size must not be zero".into()));
                }
                return Err(Fail::Usage(format!("{} is empty: a loop device needs a non-empty file", file.display())));
            }
            a.cfg.volatile_cache = true;
            a.cfg.discard = Some(DiscardLimits::default());
            let abs = std::fs::canonicalize(&file).unwrap_or(file);
            a.cfg.target_args.push(("file".into(), abs.display().to_string()));
            a.cfg.target_args.push(("direct".into(), b.direct().to_string()));
            Arc::new(move |_: &QueueInfo| Ok(Box::new(LoopTarget::new(b.clone())) as Box<dyn Target>))
        }
    };
    a.cfg.validate().map_err(|e| Fail::Usage(e.to_string()))?;
    Ok(factory)
}

fn start_device(cfg: DeviceConfig, factory: TargetFactory) -> Result<Device, Error> {
    let mut dev = Device::new(cfg)?;
    dev.start(factory)?;
    Ok(dev)
}

fn cmd_add(args: &[String]) -> Result<(), Fail> {
    let mut a = parse_add(args)?;
    let factory = prepare(&mut a)?;
    if a.foreground {
        // Block the stop signals before the device exists (see block_stop_signals).
        let _ = ublk::block_stop_signals();
        let mut dev = start_device(a.cfg, factory)?;
        println!("{} {}", dev.id(), dev.block_path().display());
        let _ = std::io::stdout().flush();
        dev.serve_until_signal()?;
        log_stats(&dev);
        return dev.delete().map_err(Fail::from);
    }
    // Background: fork now, while single-threaded. The child creates and
    // serves the device and reports "OK id path" or "ERR msg" on a pipe.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::last_os("pipe").into());
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child inherits the blocked stop signals; the parent restores its
    // mask (a signal that came meanwhile is delivered to it then).
    let old_mask = ublk::block_stop_signals();
    // SAFETY: no other threads exist yet in this process.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        // SAFETY: restores this (single) thread's previous signal mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
    }
    if pid < 0 {
        return Err(Error::last_os("fork").into());
    }
    if pid > 0 {
        drop(wr);
        let mut msg = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut msg);
        return match msg.split_once(' ') {
            Some(("OK", rest)) => {
                println!("{}", rest.trim_end());
                Ok(())
            }
            Some(("ERR", rest)) => Err(Fail::Op(rest.trim_end().to_string())),
            _ => Err(Fail::Op(format!("the server process (pid {pid}) exited during setup"))),
        };
    }
    drop(rd);
    let code = serve_child(a.cfg, factory, std::fs::File::from(wr));
    std::process::exit(code);
}

fn detach_stdio() {
    // SAFETY: setsid and dup2 on fds we own; the log path is a valid C string.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        let _ = std::fs::create_dir_all(DEFAULT_STATE_DIR);
        let log = libc::open(c"/run/ublk/server.log".as_ptr(), libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o644);
        libc::dup2(null, 0);
        libc::dup2(null, 1);
        libc::dup2(if log >= 0 { log } else { null }, 2);
    }
}

fn serve_child(cfg: DeviceConfig, factory: TargetFactory, mut report: std::fs::File) -> i32 {
    detach_stdio();
    let mut dev = match start_device(cfg, factory) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(report, "ERR {e}");
            return 1;
        }
    };
    let _ = writeln!(report, "OK {} {}", dev.id(), dev.block_path().display());
    drop(report);
    let served = dev.serve_until_signal();
    log_stats(&dev);
    let id = dev.id();
    match served.and(dev.delete()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ublk: device {id}: {e}");
            1
        }
    }
}

/// One line on stderr (the server log in the background) when a device stops:
/// its data mode and counters summed over the queues.
fn log_stats(dev: &Device) {
    let (mut ios, mut bytes, mut errors, mut copied, mut leases) = (0, 0, 0, 0, 0);
    for s in dev.stats() {
        ios += s.ios;
        bytes += s.bytes;
        errors += s.errors;
        copied += s.copied_bytes;
        leases += s.lease_ops;
    }
    eprintln!(
        "ublk: device {} stopped: mode={} ios={ios} bytes={bytes} errors={errors} copied_bytes={copied} lease_ops={leases}",
        dev.id(),
        dev.data_mode()
    );
}

fn state_name(s: u16) -> &'static str {
    match s {
        ublk::sys::UBLK_S_DEV_DEAD => "DEAD",
        ublk::sys::UBLK_S_DEV_LIVE => "LIVE",
        ublk::sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        ublk::sys::UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

fn cmd_list(args: &[String]) -> Result<(), Fail> {
    if let Some(a) = args.first() {
        return Err(Fail::Usage(format!("list: unexpected argument `{a}`")));
    }
    let ctrl = Ctrl::open()?;
    println!("{:<4} {:<14} {:<12} {:>8} {:>6} {:>6} {:<12} {:<9} {:>8}", "ID", "PATH", "TARGET", "SIZE", "QUEUES", "DEPTH", "MODE", "STATE", "PID");
    for id in list_device_ids() {
        let info = match ctrl.get_dev_info(id) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("ublk: device {id}: {e}");
                continue;
            }
        };
        let size = ctrl.get_params(id).map(|p| format_size(p.basic.dev_sectors << 9)).unwrap_or_else(|_| "-".into());
        let state = StateFile::load(std::path::Path::new(DEFAULT_STATE_DIR), id).unwrap_or_default();
        let pid = if info.ublksrv_pid > 0 { info.ublksrv_pid.to_string() } else { "-".into() };
        println!(
            "{:<4} {:<14} {:<12} {:>8} {:>6} {:>6} {:<12} {:<9} {:>8}",
            id,
            format!("/dev/ublkb{id}"),
            state.get("target").unwrap_or("-"),
            size,
            info.nr_hw_queues,
            info.queue_depth,
            ublk::data_mode_name(info.flags),
            state_name(info.state),
            pid
        );
    }
    Ok(())
}

fn cmd_del(args: &[String]) -> Result<(), Fail> {
    let ids: Vec<u32> = match args {
        [a] if a == "--all" || a == "-a" => list_device_ids(),
        [id] => vec![id.parse().map_err(|_| Fail::Usage(format!("del: invalid device id `{id}`")))?],
        [] => return Err(Fail::Usage("del: give a device id or --all".into())),
        _ => return Err(Fail::Usage("del: too many arguments".into())),
    };
    let mut failed = None;
    for id in ids {
        if let Err(e) = ublk::delete_device(id, ublk::ctrl::DEFAULT_TIMEOUT) {
            let e = if e.errno() == libc::ENODEV || e.errno() == libc::ENOENT { e.context(format!("no device {id}")) } else { e };
            eprintln!("ublk: del {id}: {e}");
            failed = Some(Fail::Op(format!("could not delete device {id}")));
        }
    }
    failed.map_or(Ok(()), Err)
}

fn cmd_features(args: &[String]) -> Result<(), Fail> {
    if let Some(a) = args.first() {
        return Err(Fail::Usage(format!("features: unexpected argument `{a}`")));
    }
    let f = ublk::kernel_features()?;
    println!("0x{f:x}");
    for name in ublk::feature_names(f) {
        println!("{name}");
    }
    Ok(())
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
    fn add_args() {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let a = parse_add(&v("mem --queues 2 --depth=64 --size 16M")).ok().unwrap();
        assert_eq!((a.cfg.queues, a.cfg.depth, a.size), (2, 64, Some(16 << 20)));
        assert!(matches!(parse_add(&v("disk")), Err(Fail::Usage(_))));
        assert!(matches!(parse_add(&v("mem --queues")), Err(Fail::Usage(_))));
        assert!(matches!(parse_add(&v("mem --queues x")), Err(Fail::Usage(_))));
        assert!(matches!(parse_add(&v("mem --depth 70000")), Err(Fail::Usage(_))));
        assert!(matches!(parse_add(&v("mem --bogus")), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("null --queues 0")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("null --depth 4097")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("null --size 1000")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("null --size 0")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("loop")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
        let mut a = parse_add(&v("loop --file /nonexistent/file")).ok().unwrap();
        assert!(matches!(prepare(&mut a), Err(Fail::Usage(_))));
    }
}
