//! libublk: a Linux ublk (userspace block device) server engine.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ublk::{Device, DeviceConfig, targets::NullTarget};
//! let cfg = DeviceConfig { size: 1 << 30, queues: 2, ..Default::default() };
//! let mut dev = Device::new(cfg)?;
//! dev.start(Arc::new(|_q: &ublk::QueueInfo| Ok(Box::new(NullTarget) as Box<dyn ublk::Target>)))?;
//! println!("serving {}", dev.block_path().display());
//! dev.serve_until_signal()?;
//! # Ok::<(), ublk::Error>(())
//! ```

/// `$build` with `$f` bound to `fd` as the queue ring's fixed file when the
/// target registered it (`QueueCtx::register_fd`), else as a plain fd: the
/// two are different types for the io_uring opcode builders.
macro_rules! on_fd {
    ($core:expr, $fd:expr, |$f:ident| $build:expr) => {
        match $core.fixed_slot($fd) {
            Some(slot) => {
                let $f = io_uring::types::Fixed(slot);
                $build
            }
            None => {
                let $f = io_uring::types::Fd($fd);
                $build
            }
        }
    };
}

mod buf;
pub mod cli;
mod config;
pub mod ctrl;
mod device;
mod error;
pub mod ffi;
mod io;
mod lease;
pub mod mode;
pub mod nbd;
mod posted;
mod queue;
mod signals;
mod slab;
pub mod state;
mod stats;
pub mod sys;
mod target;
pub mod targets;

pub use config::{Affinity, DeviceConfig, DiscardLimits, Recovery};
pub use device::{data_mode_name, delete_device, feature_names, kernel_features, Device, StopHandle};
pub use error::{errno_name, strerror, Error, Result};
pub use io::{Completion, Io, IoFlags, Op, Request};
pub use lease::Lease;
pub use mode::{DataMode, ZeroCopy};
pub use queue::{QueueCtx, QueueInfo};
pub use signals::block_stop_signals;
pub use stats::QueueStatsSnapshot;
pub use target::{Target, TargetFactory};
