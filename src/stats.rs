//! Per-queue counters, written by the queue thread, readable from anywhere.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub(crate) struct QueueStats {
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
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
}

impl QueueStats {
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    pub(crate) fn completed(&self, res: i32, has_data: bool) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.ios.fetch_add(1, Relaxed);
        if res < 0 {
            self.errors.fetch_add(1, Relaxed);
        } else if has_data {
            self.bytes.fetch_add(res as u64, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            ios: self.ios.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }
}
