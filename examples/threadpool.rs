//! A RAM disk whose every request is served by a pool of worker threads: the
//! embedding pattern where the queue thread only hands requests off
//! (`ctx.defer(io)`) and other threads complete them (`Completion::complete`).
//!
//! ```text
//! threadpool [--size S] [--queues N] [--depth D] [--workers W] [--delay-us U]
//! ```
//!
//! Prints `<id> <path>` once the device serves IO, then serves until SIGINT or
//! SIGTERM, removes the device and prints per-thread counters on stderr.
//! `--delay-us` makes each worker sleep a random 0..U µs before completing, so
//! completions come back out of order.

use crossbeam_channel::{Receiver, Sender};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ublk::targets::MemStore;
use ublk::{Completion, Device, DeviceConfig, DiscardLimits, Io, QueueCtx, QueueInfo, Target};

/// One request on its way to a worker.
struct Job {
    c: Completion,
    offset: u64,
    len: u32,
}

/// The queue side: never touches data, only defers.
struct PoolTarget {
    tx: Sender<Job>,
    deferred: Arc<AtomicU64>,
}

impl Target for PoolTarget {
    fn handle_io(&mut self, ctx: &mut QueueCtx<'_>, io: Io<'_>) {
        let (offset, len) = (io.offset(), io.len());
        let c = ctx.defer(io);
        self.deferred.fetch_add(1, Ordering::Relaxed);
        // If the pool is gone the job (and its Completion) is dropped, which
        // fails the request with EIO instead of leaving it hanging.
        let _ = self.tx.send(Job { c, offset, len });
    }
}

#[derive(Default)]
struct Counters {
    /// Requests completed by each worker.
    per_worker: Vec<AtomicU64>,
    errors: AtomicU64,
    complete_failed: AtomicU64,
}

/// A tiny xorshift for the optional completion delay.
fn next_rand(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn worker(idx: usize, rx: Receiver<Job>, store: Arc<MemStore>, counters: Arc<Counters>, delay_us: u64) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (idx as u64 + 1);
    while let Ok(mut job) = rx.recv() {
        let op = job.c.op();
        let res = store.apply(op, job.offset, job.len, job.c.buf());
        if res < 0 {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if delay_us > 0 {
            std::thread::sleep(Duration::from_micros(next_rand(&mut seed) % delay_us));
        }
        match job.c.complete(res) {
            Ok(()) => {
                counters.per_worker[idx].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.complete_failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("threadpool: worker {idx}: complete: {e}");
            }
        }
    }
}

fn block_stop_signals() {
    // SAFETY: sigset manipulation on a local; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suf) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match suf.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn usage(msg: &str) -> ! {
    eprintln!("threadpool: {msg}\nusage: threadpool [--size S] [--queues N] [--depth D] [--workers W] [--delay-us U]");
    std::process::exit(2);
}

fn main() {
    let mut size: u64 = 256 << 20;
    let mut queues: u16 = 2;
    let mut depth: u16 = 64;
    let mut workers: usize = 4;
    let mut delay_us: u64 = 0;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--size" => size = parse_size(&val()).unwrap_or_else(|| usage("bad --size")),
            "--queues" => queues = val().parse().unwrap_or_else(|_| usage("bad --queues")),
            "--depth" => depth = val().parse().unwrap_or_else(|_| usage("bad --depth")),
            "--workers" => workers = val().parse().unwrap_or_else(|_| usage("bad --workers")),
            "--delay-us" => delay_us = val().parse().unwrap_or_else(|_| usage("bad --delay-us")),
            other => usage(&format!("unknown option `{other}`")),
        }
    }
    if workers == 0 {
        usage("--workers must be at least 1");
    }

    let store = match MemStore::new(size) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("threadpool: cannot allocate {size} bytes: {e}");
            std::process::exit(1);
        }
    };
    let cfg = DeviceConfig {
        size,
        queues,
        depth,
        target_name: "threadpool".into(),
        // the workers serve requests from memory through Completion::buf
        needs_buffer: true,
        discard: Some(DiscardLimits::default()),
        ..Default::default()
    };
    if let Err(e) = cfg.validate() {
        usage(&e.to_string());
    }

    // Until serve_until_signal installs its handlers, SIGINT/SIGTERM would
    // kill the process by the default action, leaving a half-set-up device
    // behind. Block them now, before any thread exists (every thread started
    // later inherits the mask): one that arrives during setup stays pending,
    // and serve_until_signal (which unblocks them in its thread) takes it at
    // once and removes the device.
    block_stop_signals();

    // The pool: workers outlive the queues (they exit once every sender, i.e.
    // every queue's target, is gone).
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    let counters = Arc::new(Counters { per_worker: (0..workers).map(|_| AtomicU64::new(0)).collect(), ..Default::default() });
    let pool: Vec<_> = (0..workers)
        .map(|i| {
            let (rx, store, counters) = (rx.clone(), store.clone(), counters.clone());
            std::thread::Builder::new().name(format!("pool-{i}")).spawn(move || worker(i, rx, store, counters, delay_us)).expect("spawn a worker")
        })
        .collect();
    drop(rx);

    let deferred = Arc::new(AtomicU64::new(0));
    let code = {
        let (tx, deferred) = (tx.clone(), deferred.clone());
        let factory: ublk::TargetFactory =
            Arc::new(move |_q: &QueueInfo| Ok(Box::new(PoolTarget { tx: tx.clone(), deferred: deferred.clone() }) as Box<dyn Target>));
        let mut queue_ios: Vec<u64> = Vec::new();
        let run = || -> ublk::Result<()> {
            let mut dev = Device::new(cfg)?;
            dev.start(factory)?;
            println!("{} {}", dev.id(), dev.block_path().display());
            let _ = std::io::stdout().flush();
            let served = dev.serve_until_signal();
            queue_ios = dev.stats().iter().map(|s| s.ios).collect();
            served.and(dev.delete())
        };
        let code = match run() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("threadpool: {e}");
                1
            }
        };
        eprintln!("threadpool: queue_ios={queue_ios:?}");
        code
    };
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    let per: Vec<u64> = counters.per_worker.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eprintln!(
        "threadpool: deferred={} completed_by_workers={} per_worker={:?} errors={} complete_failed={}",
        deferred.load(Ordering::Relaxed),
        per.iter().sum::<u64>(),
        per,
        counters.errors.load(Ordering::Relaxed),
        counters.complete_failed.load(Ordering::Relaxed)
    );
    std::process::exit(code);
}
