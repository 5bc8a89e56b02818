//! `ublk`: create, list and delete ublk devices served by this engine.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use ublk::cli::{format_size, parse_add, AddArgs};
use ublk::ctrl::{list_device_ids, Ctrl};
use ublk::state::{StateFile, DEFAULT_STATE_DIR};
use ublk::targets::nbd::NbdConfig;
use ublk::targets::{LoopBacking, LoopTarget, MemStore, MemTarget, NullTarget};
use ublk::{Device, DeviceConfig, DiscardLimits, Error, QueueInfo, Recovery, Target, TargetFactory, ZeroCopy};

const USAGE: &str = "\
usage: ublk add null|mem|loop [--queues N] [--depth D] [--size S] [--file F] [--foreground]
                [--max-io-size S] [--logical-block-size N] [--read-only] [--id N]
                [--zero-copy auto|auto-buf-reg|register|user-copy|copy]
                [--recovery none|reissue|fail|wait] [--state-dir DIR]
                [--affinity single|all]
       ublk add nbd --host H [--port P] [--export NAME] [--connections N] [--timeout SECS]
                [the common options above but --size and --file]
       ublk recover ID [--foreground] [--state-dir DIR]
       ublk list
       ublk del ID|--all
       ublk features
       ublk owner ublkcN|ublkbN     (for udev: see udev/90-ublk.rules.in)

Sizes take K/M/G/T suffixes (powers of 1024). `add` prints `<id> <path>` once
/dev/ublkbN exists; the server keeps running in the background unless
--foreground is given (then it serves until SIGINT/SIGTERM). --zero-copy
chooses how data moves (default auto: the best the kernel offers; the mem
target always copies); `list` shows the mode of each device.

--affinity: each queue thread runs on one CPU of the set the kernel maps to
its queue (single, the default: index device id mod set size), or on the whole
set (all).

--recovery keeps the device when its server dies (even kill -9): reissue sends
the requests the dead server held to the next server, fail fails all IO until
a server is back, wait fails the held requests and makes new IO wait.
`ublk recover ID` starts a new server for such a device, configured from the
state file written at add time (in --state-dir, else $UBLK_STATE_DIR, else
/run/ublk), and prints `<id> <path>` like add.

`add nbd` serves a remote NBD export (qemu-nbd, nbdkit, nbd-server): size and
flags (read-only, flush, trim, write-zeroes) come from the server; port 10809
and the default export unless given; N TCP connections per queue (default 1).
A dropped connection is reconnected (backoff 100 ms doubling to 5 s) and its
requests are sent again; a request not answered within --timeout seconds
(default 30) of its arrival fails with EIO, so IO never waits forever, and
`ublk del` while the server is away finishes within that time. Each connect
with its whole handshake must also end within --timeout (at most 10 s). A
reconnected export that is smaller, read-only, lacks a command the device
uses (flush, FUA, trim, write-zeroes) or has block sizes its requests break
is not used (a failed attempt: the backoff grows). A flush after a reconnect
cannot cover writes a restarted server lost before they were flushed.

Without root (CAP_SYS_ADMIN) `add` makes an unprivileged device, which only its
owner can open (copy mode, no recovery); /dev/ublk-control must be open to the
user, and udev gives the device nodes to the owner (`ublk owner`, see the rule
file udev/90-ublk.rules.in).";

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
        Some("recover") => cmd_recover(&args[1..]),
        Some("list") => cmd_list(&args[1..]),
        Some("del") => cmd_del(&args[1..]),
        Some("features") => cmd_features(&args[1..]),
        Some("owner") => cmd_owner(&args[1..]),
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

/// Prepares the target and the final config; errors here are bad arguments.
fn prepare(a: &mut AddArgs) -> Result<TargetFactory, Fail> {
    a.cfg.target_name = a.target.clone();
    if a.nbd_flags && a.target != "nbd" {
        return Err(Fail::Usage("--host, --port, --export, --connections and --timeout are only for the nbd target".into()));
    }
    let factory: TargetFactory = match a.target.as_str() {
        "nbd" => {
            if a.file.is_some() || a.size.is_some() {
                return Err(Fail::Usage("nbd: --file and --size do not apply (the size is the export's)".into()));
            }
            a.nbd.validate().map_err(|e| Fail::Usage(e.message().to_string()))?;
            // the rest of the configuration is checked before connecting
            DeviceConfig { size: 1 << 20, ..a.cfg.clone() }.validate().map_err(|e| Fail::Usage(e.to_string()))?;
            // connecting is an operation: its failures are exit 1, not usage
            let export = a.nbd.probe()?;
            a.nbd.configure(&export, &mut a.cfg)?;
            a.nbd.factory(export)
        }
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
            if a.cfg.recovery != Recovery::None {
                return Err(Fail::Usage(format!(
                    "--recovery {}: the mem target keeps its data in the server process, which a crash loses; use loop for a recoverable device",
                    a.cfg.recovery
                )));
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
                Some(s) if s > b.size() => return Err(Fail::Usage(format!("--size {s} is larger than {} ({} bytes)", file.display(), b.size()))),
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
            loop_factory(b)
        }
    };
    a.cfg.validate().map_err(|e| Fail::Usage(e.to_string()))?;
    Ok(factory)
}

fn loop_factory(b: Arc<LoopBacking>) -> TargetFactory {
    Arc::new(move |_: &QueueInfo| Ok(Box::new(LoopTarget::new(b.clone())) as Box<dyn Target>))
}

/// The target of a device being recovered, from the configuration its state
/// file recorded.
fn recovery_factory(id: u32, cfg: &DeviceConfig) -> Result<TargetFactory, Error> {
    match cfg.target_name.as_str() {
        "null" => Ok(Arc::new(|_: &QueueInfo| Ok(Box::new(NullTarget) as Box<dyn Target>))),
        "loop" => {
            let file = cfg.target_arg("file").ok_or_else(|| Error::inval(format!("device {id}: the state file names no backing file")))?;
            let b = LoopBacking::open(Path::new(file), cfg.read_only)?;
            if b.size() < cfg.size {
                return Err(Error::inval(format!("device {id}: {file} is now smaller ({} bytes) than the device ({} bytes)", b.size(), cfg.size)));
            }
            Ok(loop_factory(b))
        }
        "nbd" => {
            let n = NbdConfig::from_device(cfg).map_err(|e| e.context(format!("device {id}")))?;
            n.recovery_factory(cfg).map_err(|e| e.context(format!("device {id}")))
        }
        "mem" => Err(Error::new(libc::EOPNOTSUPP, format!("device {id}: a mem device's data died with its server; it cannot be recovered"))),
        t => Err(Error::new(
            libc::EOPNOTSUPP,
            format!("device {id} is served by target '{t}' of another program: recover it with that program (its library call)"),
        )),
    }
}

fn start_device(cfg: DeviceConfig, factory: TargetFactory) -> Result<Device, Error> {
    let mut dev = Device::new(cfg)?;
    dev.start(factory)?;
    Ok(dev)
}

fn recover_device(id: u32, state_dir: &Path) -> Result<Device, Error> {
    let mut dev = Device::recover(id, state_dir)?;
    let factory = recovery_factory(id, dev.config())?;
    dev.start(factory)?;
    Ok(dev)
}

fn cmd_add(args: &[String]) -> Result<(), Fail> {
    let mut a = parse_add(args).map_err(Fail::Usage)?;
    let factory = prepare(&mut a)?;
    let cfg = a.cfg;
    run_server(a.foreground, move || start_device(cfg, factory))
}

fn cmd_recover(args: &[String]) -> Result<(), Fail> {
    let mut id = None;
    let mut foreground = false;
    let mut state_dir = ublk::state::default_dir();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--foreground" => foreground = true,
            "--state-dir" => state_dir = PathBuf::from(it.next().ok_or_else(|| Fail::Usage("--state-dir needs a value".into()))?),
            s if s.starts_with("--state-dir=") => state_dir = PathBuf::from(&s["--state-dir=".len()..]),
            s if id.is_none() && !s.starts_with('-') => id = Some(s.parse::<u32>().map_err(|_| Fail::Usage(format!("recover: invalid device id `{s}`")))?),
            s => return Err(Fail::Usage(format!("recover: unexpected argument `{s}`"))),
        }
    }
    let id = id.ok_or_else(|| Fail::Usage("recover: give a device id".into()))?;
    run_server(foreground, move || recover_device(id, &state_dir))
}

/// Creates (or recovers) a device with `make` and serves it: in this process
/// with `foreground`, else in a forked server that reports back once the
/// device serves. Prints `<id> <path>` then.
fn run_server(foreground: bool, make: impl FnOnce() -> Result<Device, Error>) -> Result<(), Fail> {
    if foreground {
        // Block the stop signals before the device exists (see block_stop_signals).
        let _ = ublk::block_stop_signals();
        let mut dev = make()?;
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
    let code = serve_child(make, std::fs::File::from(wr));
    std::process::exit(code);
}

fn detach_stdio() {
    // SAFETY: setsid and dup2 on fds we own; the log path is a valid C string.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        let dir = if libc::geteuid() == 0 { PathBuf::from(DEFAULT_STATE_DIR) } else { ublk::state::default_dir() };
        // (a directory of another user's, or a symlink as the log: no log)
        let ok = ublk::state::ensure_dir(&dir).is_ok();
        let path = std::ffi::CString::new(dir.join("server.log").into_os_string().into_encoded_bytes()).unwrap_or_default();
        let log = if ok { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o644) } else { -1 };
        libc::dup2(null, 0);
        libc::dup2(null, 1);
        libc::dup2(if log >= 0 { log } else { null }, 2);
    }
}

fn serve_child(make: impl FnOnce() -> Result<Device, Error>, mut report: std::fs::File) -> i32 {
    detach_stdio();
    let mut dev = match make() {
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
    eprintln!("ublk: device {} stopped: mode={} ios={ios} bytes={bytes} errors={errors} copied_bytes={copied} lease_ops={leases}", dev.id(), dev.data_mode());
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
    let mut ctrl = Ctrl::open()?;
    println!(
        "{:<4} {:<14} {:<12} {:>8} {:>6} {:>6} {:<12} {:<9} {:>8} {:<8}",
        "ID", "PATH", "TARGET", "SIZE", "QUEUES", "DEPTH", "MODE", "STATE", "PID", "RECOVERY"
    );
    let state_dir = ublk::state::default_dir();
    for id in list_device_ids() {
        let info = match ctrl.attach(id) {
            Ok(i) => i,
            Err(e) if matches!(e.errno(), libc::EACCES | libc::EPERM) => {
                eprintln!("ublk: device {id}: not shown, it is not yours ({})", ublk::errno_name(e.errno()));
                continue;
            }
            Err(e) => {
                eprintln!("ublk: device {id}: {e}");
                continue;
            }
        };
        let size = ctrl.get_params(id).map(|p| format_size(p.basic.dev_sectors << 9)).unwrap_or_else(|_| "-".into());
        let state = StateFile::load(&state_dir, id).unwrap_or_default();
        // some kernels (6.12) keep a dead server's pid: show only a live one
        let live = info.state == ublk::sys::UBLK_S_DEV_LIVE || info.state == ublk::sys::UBLK_S_DEV_DEAD;
        let pid = if info.ublksrv_pid > 0 && live && pid_alive(info.ublksrv_pid) { info.ublksrv_pid.to_string() } else { "-".into() };
        println!(
            "{:<4} {:<14} {:<12} {:>8} {:>6} {:>6} {:<12} {:<9} {:>8} {:<8}",
            id,
            format!("/dev/ublkb{id}"),
            state.get("target").unwrap_or("-"),
            size,
            info.nr_hw_queues,
            info.queue_depth,
            ublk::data_mode_name(info.flags),
            state_name(info.state),
            pid,
            Recovery::from_flags(info.flags)
        );
    }
    Ok(())
}

/// Whether process `pid` exists (and is not a zombie).
fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')))
        .unwrap_or(false)
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
            let e = match e.errno() {
                libc::ENODEV | libc::ENOENT => e.context(format!("no device {id}")),
                libc::EACCES | libc::EPERM => e.context(format!("device {id} is not yours: only root or the owner of an unprivileged device may delete it")),
                _ => e,
            };
            eprintln!("ublk: del {id}: {e}");
            failed = Some(Fail::Op(format!("could not delete device {id}")));
        }
    }
    failed.map_or(Ok(()), Err)
}

/// `ublk owner ublkcN|ublkbN`, run by udev as root when a device node
/// appears: the nodes of an unprivileged device go to its owner (mode 0600).
fn cmd_owner(args: &[String]) -> Result<(), Fail> {
    let name = match args {
        [n] => n,
        _ => return Err(Fail::Usage("owner: give one device name (ublkcN or ublkbN)".into())),
    };
    let id: u32 = name
        .strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Fail::Usage(format!("owner: `{name}` is not ublkcN or ublkbN")))?;
    let info = Ctrl::open()?.get_dev_info(id)?;
    if info.flags & ublk::sys::UBLK_F_UNPRIVILEGED_DEV == 0 {
        return Ok(());
    }
    for node in [format!("/dev/ublkc{id}"), format!("/dev/ublkb{id}")] {
        let c = std::ffi::CString::new(node.clone()).map_err(|_| Fail::Op("bad path".into()))?;
        // SAFETY: c is a valid NUL-terminated path; chown/chmod have no other preconditions.
        let r = unsafe { libc::chown(c.as_ptr(), info.owner_uid, info.owner_gid) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                continue; // ublkbN exists only once the device started
            }
            return Err(Fail::Op(format!("chown {node}: {e}")));
        }
        // SAFETY: as above.
        if unsafe { libc::chmod(c.as_ptr(), 0o600) } < 0 {
            return Err(Fail::Op(format!("chmod {node}: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
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
    fn add_args() {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let a = parse_add(&v("mem --queues 2 --depth=64 --size 16M")).ok().unwrap();
        assert_eq!((a.cfg.queues, a.cfg.depth, a.size), (2, 64, Some(16 << 20)));
        assert!(parse_add(&v("disk")).is_err());
        assert!(parse_add(&v("mem --queues")).is_err());
        assert!(parse_add(&v("mem --queues x")).is_err());
        assert!(parse_add(&v("mem --depth 70000")).is_err());
        assert!(parse_add(&v("mem --bogus")).is_err());
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
