//! Many devices served by one process, created and deleted in cycles: the
//! stress test drives it (`tests/device/t_stress.sh`) and counts this
//! process's fds, threads and memory between cycles, to find leaks.
//!
//! ```text
//! multi [--devices N] [--cycles C] [--size S] [--queues Q] [--depth D]
//! ```
//!
//! Each cycle creates N `mem` devices (S bytes each, default 64 MiB), starts
//! them, prints `cycle <c> <id> <path>` per device and then `ready <c>`, and
//! waits for a line on stdin: then it deletes them all, prints `deleted <c>`
//! and waits for another line before the next cycle (so that the caller can
//! check that the devices are gone, and count this process's resources while
//! it holds none). EOF on stdin ends it (after deleting the devices of the
//! current cycle). Exits 0, or 1 with a message when a device cannot be
//! created, started or deleted.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;
use ublk::targets::{MemStore, MemTarget};
use ublk::{Device, DeviceConfig, QueueInfo, Target, ZeroCopy};

struct Opts {
    devices: usize,
    cycles: usize,
    size: u64,
    queues: u16,
    depth: u16,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts { devices: 8, cycles: 1, size: 64 << 20, queues: 1, depth: 64 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        let bad = |_| format!("{a}: invalid value `{v}`");
        match a.as_str() {
            "--devices" => o.devices = v.parse().map_err(bad)?,
            "--cycles" => o.cycles = v.parse().map_err(bad)?,
            "--size" => o.size = v.parse::<u64>().map_err(bad)? << 20,
            "--queues" => o.queues = v.parse().map_err(bad)?,
            "--depth" => o.depth = v.parse().map_err(bad)?,
            _ => return Err(format!("unknown option `{a}`")),
        }
    }
    if o.devices == 0 || o.devices > 64 {
        return Err("--devices must be 1..=64".into());
    }
    Ok(o)
}

fn make(o: &Opts) -> ublk::Result<Device> {
    let cfg = DeviceConfig {
        size: o.size,
        queues: o.queues,
        depth: o.depth,
        needs_buffer: true,
        zero_copy: ZeroCopy::Copy,
        target_name: "multi".into(),
        ..Default::default()
    };
    let store = MemStore::new(cfg.size)?;
    let mut dev = Device::new(cfg)?;
    dev.start(Arc::new(move |_: &QueueInfo| Ok(Box::new(MemTarget::new(store.clone())) as Box<dyn Target>)))?;
    Ok(dev)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("multi: {e}");
            return ExitCode::from(2);
        }
    };
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut out = std::io::stdout();
    for c in 1..=o.cycles {
        let mut devs = Vec::with_capacity(o.devices);
        for _ in 0..o.devices {
            match make(&o) {
                Ok(d) => devs.push(d),
                Err(e) => {
                    eprintln!("multi: cycle {c}: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        for d in &devs {
            let _ = writeln!(out, "cycle {c} {} {}", d.id(), d.block_path().display());
        }
        let _ = writeln!(out, "ready {c}");
        let _ = out.flush();
        line.clear();
        let eof = matches!(stdin.lock().read_line(&mut line), Ok(0) | Err(_));
        for d in devs {
            let id = d.id();
            if let Err(e) = d.delete() {
                eprintln!("multi: cycle {c}: deleting device {id}: {e}");
                return ExitCode::from(1);
            }
        }
        let _ = writeln!(out, "deleted {c}");
        let _ = out.flush();
        line.clear();
        if eof || matches!(stdin.lock().read_line(&mut line), Ok(0) | Err(_)) {
            break;
        }
    }
    ExitCode::SUCCESS
}
