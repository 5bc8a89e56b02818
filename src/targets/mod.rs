//! Built-in targets: `null`, `mem` (RAM, sparse), `loop` (file or block device)
//! and `nbd` (a remote NBD export).

mod loop_file;
mod mem;
pub mod nbd;
mod null;

pub use loop_file::{LoopBacking, LoopTarget};
pub use mem::{MemStore, MemTarget};
pub use null::NullTarget;
