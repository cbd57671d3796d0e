//! Read-back verification of a copy, for both agents: every range the writer checksummed is
//! read back through an NBD connection and hashed (BLAKE3) again. The hub verifies a backup in
//! its repository this way, the node a restored image.
//!
//! Read through the NBD server that already has the image open rather than with `qemu-img`: it
//! holds the image's lock (a second opener would have to break it with `-U` and could read
//! metadata the server has not flushed), and it serves exactly what the writer wrote. qemu-nbd
//! runs with `--shared=N`, so this connection coexists with a writer that is still connected.
//!
//! Reads are pipelined: up to [`PARALLEL`] ranges are in flight on the one connection (an
//! [`NbdClient`] multiplexes requests), so the read-back is not one round trip per range.
//! Results are taken in the order of the report, so the first mismatch reported is the one
//! with the lowest position in the list, whatever the server's reply order.

use super::{ConnectOptions, NbdAddr, NbdClient, NbdError};
use crate::api::{ChecksumRange, ChunkChecksums};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Ranges read at once: enough to keep qemu-nbd busy, few enough to bound memory
/// (`PARALLEL` × [`MAX_READ`]).
pub const PARALLEL: usize = 4;
/// Largest single NBD read (qemu-nbd accepts 32 MiB).
pub const MAX_READ: u64 = 8 << 20;

/// Why a read-back failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open {addr} to read back")]
    Connect {
        addr: String,
        #[source]
        source: NbdError,
    },
    #[error("reading back {offset}+{length}")]
    Read {
        offset: u64,
        length: u64,
        #[source]
        source: NbdError,
    },
    #[error("range {offset}+{length} is outside the {size}-byte target")]
    OutOfBounds { offset: u64, length: u64, size: u64 },
    #[error("verification interrupted by a cancel")]
    Cancelled,
    #[error(
        "checksum mismatch at {offset}+{length}: the writer computed {expected}, the target \
         holds {actual}"
    )]
    Mismatch {
        offset: u64,
        length: u64,
        expected: String,
        actual: String,
    },
}

/// What was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifySummary {
    pub ranges: usize,
    pub bytes: u64,
}

/// Connects to `addr` and verifies every range of `sums` (see [`verify_ranges`]).
pub async fn verify_disk(
    addr: &NbdAddr,
    sums: &ChunkChecksums,
    cancel: &CancellationToken,
) -> Result<VerifySummary, VerifyError> {
    verify_export(addr, &sums.ranges, cancel, None).await
}

/// Connects to `addr`, verifies `ranges` and disconnects; `verified` (when given) counts the
/// ranges found equal as they are.
pub async fn verify_export(
    addr: &NbdAddr,
    ranges: &[ChecksumRange],
    cancel: &CancellationToken,
    verified: Option<&AtomicU64>,
) -> Result<VerifySummary, VerifyError> {
    let client = NbdClient::connect(addr, &ConnectOptions::default())
        .await
        .map_err(|source| VerifyError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let result = verify_ranges(&client, ranges, cancel, verified).await;
    let _ = client.disconnect().await;
    result
}

/// Reads each range back through `client` and compares its BLAKE3 with the recorded one; the
/// first mismatch (in the order of `ranges`) is the error. Every range is checked against the
/// export's size before anything is read. A cancel is honoured between reads: reading back a
/// large disk takes minutes.
pub async fn verify_ranges(
    client: &NbdClient,
    ranges: &[ChecksumRange],
    cancel: &CancellationToken,
    verified: Option<&AtomicU64>,
) -> Result<VerifySummary, VerifyError> {
    let size = client.size();
    for r in ranges {
        if r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            return Err(VerifyError::OutOfBounds {
                offset: r.offset,
                length: r.length,
                size,
            });
        }
    }
    // Owned ranges in each future: a future borrowing the report trips the compiler's
    // higher-ranked lifetime check when a caller's whole job future must be `Send`.
    let mut results = futures_util::stream::iter(ranges.iter().cloned().map(|r| {
        let client = client.clone();
        async move {
            let actual = hash_range(&client, r.offset, r.length).await?;
            if !actual.eq_ignore_ascii_case(&r.blake3) {
                return Err(VerifyError::Mismatch {
                    offset: r.offset,
                    length: r.length,
                    expected: r.blake3,
                    actual,
                });
            }
            Ok(r.length)
        }
    }))
    .buffered(PARALLEL);
    let mut bytes = 0;
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(VerifyError::Cancelled),
            n = results.next() => n,
        };
        match next {
            Some(r) => {
                bytes += r?;
                if let Some(v) = verified {
                    v.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => break,
        }
    }
    Ok(VerifySummary {
        ranges: ranges.len(),
        bytes,
    })
}

/// BLAKE3 (lower-case hex) of `length` bytes at `offset`, read in pieces of at most
/// [`MAX_READ`].
pub async fn hash_range(
    client: &NbdClient,
    offset: u64,
    length: u64,
) -> Result<String, VerifyError> {
    Ok(hash_range_raw(client, offset, length)
        .await?
        .to_hex()
        .to_string())
}

/// [`hash_range`] as the hash itself.
pub async fn hash_range_raw(
    client: &NbdClient,
    offset: u64,
    length: u64,
) -> Result<blake3::Hash, VerifyError> {
    let mut h = blake3::Hasher::new();
    let mut at = offset;
    let end = offset + length;
    while at < end {
        let n = (end - at).min(MAX_READ);
        let data = client
            .read(at, n as u32)
            .await
            .map_err(|source| VerifyError::Read {
                offset: at,
                length: n,
                source,
            })?;
        h.update(&data);
        at += n;
    }
    Ok(h.finalize())
}
