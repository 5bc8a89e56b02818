//! Lease rules checked on a real device: a small device whose target, for the
//! test's own probe requests (at `PROBE_OFF`), breaks the rules of
//! [`ublk::Lease`] on purpose and records what the engine answers.
//!
//! ```text
//! lease_check [auto|auto-buf-reg|register|user-copy|copy] [--control]
//! ```
//!
//! Checks (each request comes from this process: O_DIRECT pread/pwrite on the
//! device, the buffer pre-filled with 0xa5):
//! - READ request: `write_from` and `send` fail with EPERM (its buffer is a
//!   destination only); a range past the end and empty ranges fail with
//!   EINVAL; two `read_into` of /dev/zero on the two halves, both in flight at
//!   once, succeed and the reader gets zeroes;
//! - WRITE request: `read_into` and `recv` fail with EPERM (a source only), an
//!   out-of-range `write_from` with EINVAL; a valid `write_from` to a scratch
//!   file, completed by hand while it is in flight; then a lease, a second
//!   completion and `complete_manually` on the completed request fail with
//!   EALREADY; the scratch file holds what the writer wrote;
//! - a `read_into` from a 4 KiB file into an 8 KiB request: the data, then
//!   zeroes (short read zero-filled);
//! - `complete_manually`, the target completing from `lease_done`;
//! - a lease operation that fails (read from a write-only fd): `lease_done`
//!   sees the error and the reader gets EIO.
//!
//! Prints one line per check and `N passed, N failed`; exits 1 on a failure,
//! 2 on a setup error. `--control` expects a wrong errno on purpose (a
//! negative control: it must report exactly one failure).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use ublk::{Device, DeviceConfig, Io, Op, QueueCtx, QueueInfo, Target, ZeroCopy};

/// Only requests at this offset are probes: udev and the partition scan read
/// the device too, elsewhere.
const PROBE_OFF: u64 = 8 << 20;
const DEV_SIZE: u64 = 16 << 20;

// What the next probe request is for (set by main, taken by the target).
const IDLE: u32 = 0;
const READ_RULES: u32 = 1;
const WRITE_RULES: u32 = 2;
const SHORT_READ: u32 = 3;
const MANUAL: u32 = 4;
const FAILING_OP: u32 = 5;

// lease_done data values
const D_HALF1: u32 = 1;
const D_HALF2: u32 = 2;
const D_WRITE: u32 = 3;
const D_SHORT: u32 = 4;
const D_MANUAL: u32 = 5;
const D_FAILING: u32 = 6;

#[derive(Default)]
struct Obs {
    /// What each rule-breaking call returned: 0 or the errno.
    calls: HashMap<&'static str, i32>,
    /// (data, res) of each lease_done.
    done: Vec<(u32, i32)>,
}

struct Shared {
    phase: AtomicU32,
    obs: Mutex<Obs>,
    zero: File,
    scratch: File,
    wronly: File,
}

impl Shared {
    fn rec(&self, name: &'static str, r: ublk::Result<()>) {
        let v = match r {
            Ok(()) => 0,
            Err(e) => e.errno(),
        };
        self.obs.lock().unwrap().calls.insert(name, v);
    }
}

struct CheckTarget {
    s: Arc<Shared>,
}

impl CheckTarget {
    /// The probe the request is, if it is one (each probe is taken once).
    fn probe(&self, io: &Io<'_>) -> u32 {
        if io.offset() != PROBE_OFF {
            return IDLE;
        }
        let p = self.s.phase.load(Ordering::Acquire);
        let want = match p {
            WRITE_RULES => Op::Write,
            IDLE => return IDLE,
            _ => Op::Read,
        };
        if io.op() != want {
            return IDLE;
        }
        self.s.phase.store(IDLE, Ordering::Release);
        p
    }
}

impl Target for CheckTarget {
    #[allow(clippy::reversed_empty_ranges)]
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        let s = self.s.clone();
        let (tag, len) = (io.tag(), io.len());
        let (zero, scratch, wronly) = (s.zero.as_raw_fd(), s.scratch.as_raw_fd(), s.wronly.as_raw_fd());
        match self.probe(&io) {
            READ_RULES => {
                let mut l = ctx.lease(tag);
                s.rec("read: write_from", l.write_from(scratch, 0, 0..len, 0));
                s.rec("read: send", l.send(scratch, 0..len, 0));
                s.rec("read: range past the end", l.read_into(zero, 0, len - 96..len + 104, 0));
                s.rec("read: empty range", l.read_into(zero, 0, 100..100, 0));
                s.rec("read: empty range at 0", l.read_into(zero, 0, 0..0, 0));
                s.rec("read: reversed range", l.read_into(zero, 0, 200..100, 0));
                s.rec("read: range starting at the end", l.read_into(zero, 0, len..len + 512, 0));
                s.rec("read: first half", l.read_into(zero, 0, 0..len / 2, D_HALF1));
                s.rec("read: second half", l.read_into(zero, 0, len / 2..len, D_HALF2));
                let n = l.in_flight();
                s.rec("read: two ops in flight", if n == 2 { Ok(()) } else { Err(ublk::Error::new(libc::EPROTO, format!("{n} in flight"))) });
                // no completion: the engine completes with the total bytes
            }
            WRITE_RULES => {
                {
                    let mut l = ctx.lease(tag);
                    s.rec("write: read_into", l.read_into(zero, 0, 0..len, 0));
                    s.rec("write: recv", l.recv(zero, 0..len, 0));
                    s.rec("write: range past the end", l.write_from(scratch, 0, 1..len + 1, 0));
                    s.rec("write: write_from", l.write_from(scratch, 0, 0..len, D_WRITE));
                    s.rec("write: complete_manually", l.complete_manually());
                }
                // held back by the engine until the write above is over
                s.rec("write: complete while in flight", ctx.complete(tag, len as i32));
                s.rec("write: lease after completing", ctx.lease(tag).write_from(scratch, 0, 0..len, 0));
                s.rec("write: complete_manually after completing", ctx.lease(tag).complete_manually());
                s.rec("write: complete twice", ctx.complete(tag, len as i32));
            }
            SHORT_READ => {
                // the scratch file has 4096 bytes; the request is 8192
                s.rec("short: read_into", ctx.lease(tag).read_into(scratch, 0, 0..len, D_SHORT));
            }
            MANUAL => {
                let mut l = ctx.lease(tag);
                s.rec("manual: complete_manually", l.complete_manually());
                s.rec("manual: read_into", l.read_into(zero, 0, 0..len, D_MANUAL));
            }
            FAILING_OP => {
                s.rec("failing: read_into from a write-only fd", ctx.lease(tag).read_into(wronly, 0, 0..len, D_FAILING));
            }
            _ => {
                // everything else: reads give zeroes, writes are dropped
                let r = match io.op() {
                    Op::Read => ctx.lease(tag).read_into(zero, 0, 0..len, 0),
                    Op::Write => ctx.complete(tag, len as i32),
                    _ => ctx.complete(tag, 0),
                };
                if let Err(e) = r {
                    let _ = ctx.complete(tag, e.neg_errno());
                }
            }
        }
    }

    fn lease_done(&mut self, ctx: &mut QueueCtx<'_>, tag: u16, data: u32, res: i32) {
        if data == 0 {
            return;
        }
        self.s.obs.lock().unwrap().done.push((data, res));
        if data == D_MANUAL {
            let r = ctx.complete(tag, res);
            self.s.rec("manual: complete from lease_done", r);
        }
    }
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    p: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        assert!(!p.is_null());
        let mut a = Aligned { p, layout };
        a.as_mut().fill(fill);
        a
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: p points at layout.size() bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.p, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { dealloc(self.p, self.layout) };
    }
}

/// pread/pwrite of `buf` at PROBE_OFF: bytes moved or the errno (negative).
fn probe_io(fd: RawFd, buf: &mut Aligned, write: bool) -> isize {
    let b = buf.as_mut();
    // SAFETY: b is a valid buffer of b.len() bytes.
    let n = unsafe {
        if write {
            libc::pwrite(fd, b.as_ptr() as *const libc::c_void, b.len(), PROBE_OFF as libc::off_t)
        } else {
            libc::pread(fd, b.as_mut_ptr() as *mut libc::c_void, b.len(), PROBE_OFF as libc::off_t)
        }
    };
    if n < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize)
    } else {
        n
    }
}

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
            println!("ok: {name}");
        } else {
            self.failed += 1;
            println!("FAIL: {name}: {}", detail());
        }
    }
}

fn errno_str(e: i32) -> String {
    if e == 0 {
        "Ok".into()
    } else {
        ublk::errno_name(e)
    }
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("lease_check: {what}: {e}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut mode = ZeroCopy::Auto;
    let mut control = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--control" => control = true,
            m => match m.parse() {
                Ok(z) => mode = z,
                Err(e) => {
                    eprintln!("usage: lease_check [auto|auto-buf-reg|register|user-copy|copy] [--control]\n{e}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let scratch_path = dir.join(format!("lease_check.{}", std::process::id()));
    let open = |p: &str, w: bool| OpenOptions::new().read(!w).write(w).open(p);
    let (zero, wronly) = match (open("/dev/zero", false), open("/dev/null", true)) {
        (Ok(z), Ok(w)) => (z, w),
        (Err(e), _) | (_, Err(e)) => return setup_err("open /dev/zero, /dev/null", e),
    };
    let scratch = match OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&scratch_path) {
        Ok(f) => f,
        Err(e) => return setup_err(&format!("create {}", scratch_path.display()), e),
    };
    let _ = std::fs::remove_file(&scratch_path); // kept open; gone at exit
    let shared = Arc::new(Shared { phase: AtomicU32::new(IDLE), obs: Mutex::new(Obs::default()), zero, scratch, wronly });

    let cfg = DeviceConfig { size: DEV_SIZE, queues: 1, depth: 4, zero_copy: mode, target_name: "lease_check".into(), ..Default::default() };
    let mut dev = match Device::new(cfg) {
        Ok(d) => d,
        Err(e) => return setup_err(&format!("creating a device in mode {mode}"), e),
    };
    let s2 = shared.clone();
    if let Err(e) = dev.start(Arc::new(move |_: &QueueInfo| Ok(Box::new(CheckTarget { s: s2.clone() }) as Box<dyn Target>))) {
        return setup_err("starting the device", e);
    }
    println!("device {} mode {} (asked for {mode})", dev.block_path().display(), dev.data_mode());
    let mut r = Report { passed: 0, failed: 0 };
    if mode != ZeroCopy::Auto {
        r.check("data mode is the one asked for", dev.data_mode().name() == mode.name(), || format!("got {}", dev.data_mode()));
    }
    let devf = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev.block_path()) {
        Ok(f) => f,
        Err(e) => return setup_err(&format!("open {}", dev.block_path().display()), e),
    };
    let fd = devf.as_raw_fd();

    let take = |s: &Shared| std::mem::take(&mut *s.obs.lock().unwrap());
    let expect = |r: &mut Report, obs: &Obs, name: &'static str, want: i32| {
        let got = obs.calls.get(name).copied();
        r.check(&format!("{name} -> {}", errno_str(want)), got == Some(want), || match got {
            Some(g) => format!("got {}", errno_str(g)),
            None => "never called (the probe did not reach the target)".into(),
        });
    };
    let done_of = |obs: &Obs, data: u32| obs.done.iter().filter(|d| d.0 == data).map(|d| d.1).collect::<Vec<_>>();

    // --- READ request: direction and range rules, two ops in flight
    shared.phase.store(READ_RULES, Ordering::Release);
    let mut buf = Aligned::new(4096, 0xa5);
    let n = probe_io(fd, &mut buf, false);
    let obs = take(&shared);
    // --control: a wrong expectation on purpose, which must be reported
    expect(&mut r, &obs, "read: write_from", if control { libc::EINVAL } else { libc::EPERM });
    expect(&mut r, &obs, "read: send", libc::EPERM);
    expect(&mut r, &obs, "read: range past the end", libc::EINVAL);
    expect(&mut r, &obs, "read: empty range", libc::EINVAL);
    expect(&mut r, &obs, "read: empty range at 0", libc::EINVAL);
    expect(&mut r, &obs, "read: reversed range", libc::EINVAL);
    expect(&mut r, &obs, "read: range starting at the end", libc::EINVAL);
    expect(&mut r, &obs, "read: first half", 0);
    expect(&mut r, &obs, "read: second half", 0);
    expect(&mut r, &obs, "read: two ops in flight", 0);
    r.check("read: lease_done of each half with 2048", done_of(&obs, D_HALF1) == [2048] && done_of(&obs, D_HALF2) == [2048], || {
        format!("lease_done calls {:?}", obs.done)
    });
    r.check("read: reader got 4096 bytes", n == 4096, || format!("pread returned {n}"));
    let nz = buf.as_mut().iter().filter(|&&b| b != 0).count();
    r.check("read: reader got /dev/zero's zeroes", n == 4096 && nz == 0, || format!("{nz} non-zero bytes"));

    // --- WRITE request: direction, range, completion held back, EALREADY
    shared.phase.store(WRITE_RULES, Ordering::Release);
    let mut wbuf = Aligned::new(4096, 0x5a);
    let n = probe_io(fd, &mut wbuf, true);
    let obs = take(&shared);
    expect(&mut r, &obs, "write: read_into", libc::EPERM);
    expect(&mut r, &obs, "write: recv", libc::EPERM);
    expect(&mut r, &obs, "write: range past the end", libc::EINVAL);
    expect(&mut r, &obs, "write: write_from", 0);
    expect(&mut r, &obs, "write: complete_manually", 0);
    expect(&mut r, &obs, "write: complete while in flight", 0);
    expect(&mut r, &obs, "write: lease after completing", libc::EALREADY);
    expect(&mut r, &obs, "write: complete_manually after completing", libc::EALREADY);
    expect(&mut r, &obs, "write: complete twice", libc::EALREADY);
    r.check("write: lease_done of the write with 4096", done_of(&obs, D_WRITE) == [4096], || format!("lease_done calls {:?}", obs.done));
    r.check("write: writer got 4096", n == 4096, || format!("pwrite returned {n}"));
    let mut back = vec![0u8; 8192];
    // SAFETY: back is 8192 bytes.
    let m = unsafe { libc::pread(shared.scratch.as_raw_fd(), back.as_mut_ptr() as *mut libc::c_void, 8192, 0) };
    r.check("write: the scratch file holds the written data", m == 4096 && back[..4096].iter().all(|&b| b == 0x5a), || {
        format!("pread of the scratch file returned {m}, {} bytes differ from 0x5a", back[..4096].iter().filter(|&&b| b != 0x5a).count())
    });

    // --- short read: 4096 bytes of file into an 8192-byte request
    shared.phase.store(SHORT_READ, Ordering::Release);
    let mut buf = Aligned::new(8192, 0xa5);
    let n = probe_io(fd, &mut buf, false);
    let obs = take(&shared);
    expect(&mut r, &obs, "short: read_into", 0);
    r.check("short: lease_done with the whole range (8192)", done_of(&obs, D_SHORT) == [8192], || format!("lease_done calls {:?}", obs.done));
    let b = buf.as_mut();
    let head_bad = b[..4096].iter().filter(|&&x| x != 0x5a).count();
    let tail_bad = b[4096..].iter().filter(|&&x| x != 0).count();
    r.check("short: the file's data, then zeroes", n == 8192 && head_bad == 0 && tail_bad == 0, || {
        format!("pread returned {n}; {head_bad} bytes of the first 4 KiB are not the file's, {tail_bad} of the rest not zero")
    });

    // --- complete_manually: the target completes from lease_done
    shared.phase.store(MANUAL, Ordering::Release);
    let mut buf = Aligned::new(4096, 0xa5);
    let n = probe_io(fd, &mut buf, false);
    let obs = take(&shared);
    expect(&mut r, &obs, "manual: complete_manually", 0);
    expect(&mut r, &obs, "manual: read_into", 0);
    expect(&mut r, &obs, "manual: complete from lease_done", 0);
    let nz = buf.as_mut().iter().filter(|&&x| x != 0).count();
    r.check("manual: reader got 4096 zeroes", n == 4096 && nz == 0, || format!("pread returned {n}, {nz} non-zero bytes"));

    // --- a lease op that fails: lease_done sees the errno, the reader EIO
    shared.phase.store(FAILING_OP, Ordering::Release);
    let mut buf = Aligned::new(4096, 0xa5);
    let n = probe_io(fd, &mut buf, false);
    let obs = take(&shared);
    expect(&mut r, &obs, "failing: read_into from a write-only fd", 0);
    let d = done_of(&obs, D_FAILING);
    r.check("failing: lease_done with EBADF", d == [-libc::EBADF], || format!("lease_done results {d:?}"));
    r.check("failing: the reader gets EIO", n == -(libc::EIO as isize), || format!("pread returned {n}"));

    let st = dev.stats();
    let leases: u64 = st.iter().map(|s| s.lease_ops).sum();
    let copied: u64 = st.iter().map(|s| s.copied_bytes).sum();
    println!("stats: lease_ops={leases} copied_bytes={copied}");
    // the probes alone submitted 2 + 1 + 1 + 1 + 1 operations
    r.check("stats: lease ops counted", leases >= 6, || format!("lease_ops={leases}"));
    if dev.data_mode().is_zero_copy() {
        r.check("stats: zero copy copied nothing", copied == 0, || format!("copied_bytes={copied}"));
    } else {
        r.check("stats: copy modes copied", copied > 0, || format!("copied_bytes={copied}"));
    }

    drop(devf);
    if let Err(e) = dev.delete() {
        r.check("device deleted", false, || e.to_string());
    }
    println!("{} passed, {} failed", r.passed, r.failed);
    if r.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
