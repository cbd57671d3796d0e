//! Progress of one disk's copy: counters the request tasks add to as they go, read by whoever
//! reports progress (the job's reporter, the restore, `sendense-node copy --progress`), and the
//! transfer rate between two readings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Live counters of one disk's copy, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Size of the source disk (set once connected).
    pub bytes_total: AtomicU64,
    /// Read from the source.
    pub bytes_read: AtomicU64,
    /// Written to the target as data.
    pub bytes_written: AtomicU64,
    /// Written to the target as WRITE_ZEROES (holes, and zero blocks found in data).
    pub bytes_zeroed: AtomicU64,
    /// Not written: holes on a zero target, unchanged areas of an incremental.
    pub bytes_skipped: AtomicU64,
    /// Read for the whole-disk checksum grid only, not written: the unchanged parts of grid
    /// cells an incremental changed elsewhere (counted in `bytes_skipped` too, not in
    /// `bytes_read`).
    pub bytes_read_for_grid: AtomicU64,
    /// Requests sent to the source (READ, BLOCK_STATUS) and not answered yet.
    pub source_waiting: AtomicU64,
    /// Requests sent to the target (WRITE, WRITE_ZEROES, FLUSH) and not answered yet.
    pub target_waiting: AtomicU64,
}

/// One side of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// A request outstanding on one side, counted while it lives (see [`DiskCounters::waiting_on`]).
pub struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A consistent-enough reading of [`DiskCounters`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub bytes_read_for_grid: u64,
    pub taken_at: Instant,
}

impl DiskCounters {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a request outstanding on `side` until the guard is dropped (the stall watchdog
    /// names the side that holds requests when nothing moves).
    pub fn waiting_on(&self, side: Side) -> Waiting<'_> {
        let c = match side {
            Side::Source => &self.source_waiting,
            Side::Target => &self.target_waiting,
        };
        c.fetch_add(1, Ordering::Relaxed);
        Waiting(c)
    }

    /// Every byte the copy has dealt with or read: grows while anything moves.
    pub fn moved(&self) -> u64 {
        [
            &self.bytes_read,
            &self.bytes_written,
            &self.bytes_zeroed,
            &self.bytes_skipped,
            &self.bytes_read_for_grid,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Ordering::Relaxed),
            bytes_skipped: self.bytes_skipped.load(Ordering::Relaxed),
            bytes_read_for_grid: self.bytes_read_for_grid.load(Ordering::Relaxed),
            taken_at: Instant::now(),
        }
    }
}

impl CounterSnapshot {
    /// Bytes of the disk dealt with: written, zeroed or skipped. Equals `bytes_total` at the end
    /// of a successful copy.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_written + self.bytes_zeroed + self.bytes_skipped
    }

    /// Bytes read from the source per second between `earlier` and this snapshot (the transfer
    /// rate; skipped holes do not inflate it).
    pub fn read_rate_since(&self, earlier: &CounterSnapshot) -> f64 {
        let secs = self
            .taken_at
            .saturating_duration_since(earlier.taken_at)
            .as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.bytes_read.saturating_sub(earlier.bytes_read) as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn done_counts_every_kind_and_rate_counts_reads_only() {
        let c = DiskCounters::new();
        let t0 = c.snapshot();
        c.bytes_read.fetch_add(3 << 20, Ordering::Relaxed);
        c.bytes_written.fetch_add(2 << 20, Ordering::Relaxed);
        c.bytes_zeroed.fetch_add(1 << 20, Ordering::Relaxed);
        c.bytes_skipped.fetch_add(10 << 20, Ordering::Relaxed);
        let t1 = CounterSnapshot {
            taken_at: t0.taken_at + Duration::from_secs(2),
            ..c.snapshot()
        };
        assert_eq!(t1.bytes_done(), 13 << 20);
        assert_eq!(t1.read_rate_since(&t0), (3 << 20) as f64 / 2.0);
        // No time between two readings: no rate rather than a division by zero.
        assert_eq!(t0.read_rate_since(&t1), 0.0);
    }
}
