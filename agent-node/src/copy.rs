//! PLACEHOLDER of the copy engine, with the interface agreed with helper `nbd`, so that jobs and
//! tests of the node can run before the real engine merges. The real `copy.rs` (pipelined, many
//! connections) replaces this file at merge; take theirs on conflict.

use bytes::Bytes;
use sendense_shared::api::{ChecksumRange, ChunkChecksums};
use sendense_shared::nbd::{
    BASE_ALLOCATION, ConnectOptions, NbdAddr, NbdClient, NbdError, STATE_DIRTY, STATE_HOLE,
    STATE_ZERO, dirty_bitmap_context,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Which areas of the source to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentSource {
    /// Allocated data (full backup).
    Allocation,
    /// Blocks set in this QEMU dirty bitmap (incremental).
    DirtyBitmap(String),
}

/// Tuning of one copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub request_size: u32,
    pub target_is_zero: bool,
    pub chunk_size: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            request_size: 4 * 1024 * 1024,
            target_is_zero: true,
            chunk_size: 4 * 1024 * 1024,
        }
    }
}

/// Live counters of one disk's copy.
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub bytes_total: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_zeroed: AtomicU64,
    pub bytes_skipped: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
}

impl DiskCounters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Ordering::Relaxed),
            bytes_skipped: self.bytes_skipped.load(Ordering::Relaxed),
        }
    }
}

/// Result of a finished copy.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub checksums: ChunkChecksums,
    pub elapsed: Duration,
}

/// Why a copy failed.
#[derive(Debug, Error)]
pub enum CopyError {
    #[error("source {addr}: {source}")]
    Source {
        addr: String,
        #[source]
        source: NbdError,
    },
    #[error("target {addr}: {source}")]
    Target {
        addr: String,
        #[source]
        source: NbdError,
    },
    #[error("source is {source_size} bytes, target {target_size}")]
    SizeMismatch { source_size: u64, target_size: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// Copies one disk (sequential placeholder).
pub async fn copy_disk(
    source: &NbdAddr,
    target: &NbdAddr,
    extents: ExtentSource,
    opts: &CopyOptions,
    counters: Arc<DiskCounters>,
    cancel: CancellationToken,
) -> Result<CopyOutcome, CopyError> {
    let start = Instant::now();
    let context = match &extents {
        ExtentSource::Allocation => BASE_ALLOCATION.to_string(),
        ExtentSource::DirtyBitmap(b) => dirty_bitmap_context(b),
    };
    let se = |e: NbdError| CopyError::Source {
        addr: source.to_string(),
        source: e,
    };
    let te = |e: NbdError| CopyError::Target {
        addr: target.to_string(),
        source: e,
    };
    let src = NbdClient::connect(
        source,
        &ConnectOptions {
            meta_contexts: vec![context.clone()],
            ..Default::default()
        },
    )
    .await
    .map_err(se)?;
    let dst = NbdClient::connect(target, &ConnectOptions::default())
        .await
        .map_err(te)?;
    if src.size() != dst.size() {
        return Err(CopyError::SizeMismatch {
            source_size: src.size(),
            target_size: dst.size(),
        });
    }
    let size = src.size();
    counters.bytes_total.store(size, Ordering::Relaxed);
    let mut ranges = Vec::new();
    let mut off = 0u64;
    while off < size {
        if cancel.is_cancelled() {
            return Err(CopyError::Cancelled);
        }
        let len = (size - off).min(1 << 30) as u32;
        let ext = src.block_status(&context, off, len).await.map_err(se)?;
        for e in ext {
            if off >= size {
                break;
            }
            let l = e.length.min(size - off);
            let wanted = match &extents {
                ExtentSource::Allocation => e.flags & STATE_HOLE == 0,
                ExtentSource::DirtyBitmap(_) => e.flags & STATE_DIRTY != 0,
            };
            let zero = matches!(extents, ExtentSource::Allocation) && e.flags & STATE_ZERO != 0;
            if !wanted || (zero && opts.target_is_zero) {
                counters.bytes_skipped.fetch_add(l, Ordering::Relaxed);
            } else {
                let mut p = off;
                while p < off + l {
                    if cancel.is_cancelled() {
                        return Err(CopyError::Cancelled);
                    }
                    let n = (off + l - p).min(opts.request_size as u64) as u32;
                    let data = src.read(p, n).await.map_err(se)?;
                    counters.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    let hash = blake3::hash(&data).to_hex().to_string();
                    if data.iter().all(|&b| b == 0) {
                        dst.write_zeroes(p, n, false).await.map_err(te)?;
                        counters.bytes_zeroed.fetch_add(n as u64, Ordering::Relaxed);
                    } else {
                        dst.write(p, Bytes::from(data.to_vec())).await.map_err(te)?;
                        counters
                            .bytes_written
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    ranges.push(ChecksumRange {
                        offset: p,
                        length: n as u64,
                        blake3: hash,
                    });
                    p += n as u64;
                }
            }
            off += l;
        }
    }
    dst.flush().await.map_err(te)?;
    let s = counters.snapshot();
    Ok(CopyOutcome {
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
        bytes_zeroed: s.bytes_zeroed,
        bytes_skipped: s.bytes_skipped,
        checksums: ChunkChecksums {
            chunk_size: opts.request_size as u64,
            ranges,
        },
        elapsed: start.elapsed(),
    })
}
