//! Built-in targets: `null`, `mem` (RAM, sparse) and `loop` (file or block device).

mod loop_file;
mod mem;
mod null;

pub use loop_file::{LoopBacking, LoopTarget};
pub use mem::{MemStore, MemTarget};
pub use null::NullTarget;
