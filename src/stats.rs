//! Per-queue counters, written by the queue thread only, readable from anywhere.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub(crate) struct QueueStats {
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    copied: AtomicU64,
    lease_ops: AtomicU64,
}

/// A snapshot of one queue's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// Requests completed.
    pub ios: u64,
    /// Bytes of READ/WRITE requests completed successfully.
    pub bytes: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Requests handed to the target and not yet completed.
    pub in_flight: u64,
    /// Request data bytes copied between the request and a server buffer
    /// (by the kernel in copy mode, by pread/pwrite on `/dev/ublkcN` in
    /// user-copy mode); zero-copy leases copy none.
    pub copied_bytes: u64,
    /// Lease operations submitted (continuations of short transfers not counted).
    pub lease_ops: u64,
}

/// Adds to a counter that only the queue thread writes: a plain load and
/// store, no read-modify-write on the hot path.
fn add(c: &AtomicU64, v: u64) {
    c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
}

impl QueueStats {
    pub(crate) fn started(&self) {
        add(&self.in_flight, 1);
    }

    pub(crate) fn completed(&self, res: i32, has_data: bool) {
        add(&self.in_flight, u64::MAX);
        add(&self.ios, 1);
        if res < 0 {
            add(&self.errors, 1);
        } else if has_data {
            add(&self.bytes, res as u64);
        }
    }

    pub(crate) fn copied(&self, n: u64) {
        add(&self.copied, n);
    }

    pub(crate) fn lease_op(&self) {
        add(&self.lease_ops, 1);
    }

    pub(crate) fn snapshot(&self) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            ios: self.ios.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            copied_bytes: self.copied.load(Relaxed),
            lease_ops: self.lease_ops.load(Relaxed),
        }
    }
}
