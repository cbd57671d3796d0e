//! Verification of a copy: every range the writer checksummed is read back from the target and
//! hashed (BLAKE3) again.
//!
//! Read through the job's still-running qemu-nbd rather than with `qemu-img`: that process
//! already has the image open (a second opener would have to break qemu's image lock with
//! `-U` and could read metadata the writer's qemu-nbd has not flushed), and it serves exactly
//! what the writer wrote, through the same code path a restore will use. qemu-nbd runs with
//! `--shared=N`, so this connection coexists with a writer that is still connected.

use futures_util::StreamExt;
use sendense_shared::api::ChunkChecksums;
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient, NbdError};

/// Reads in flight at once: enough to keep qemu-nbd busy, few enough to bound memory.
const PARALLEL: usize = 4;
/// Largest single NBD read (qemu-nbd accepts 32 MiB).
const MAX_READ: u64 = 8 << 20;

/// Why a disk failed verification.
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
#[derive(Debug, Clone, Copy)]
pub struct VerifySummary {
    pub ranges: usize,
    pub bytes: u64,
}

/// Reads each range of `sums` from `addr` and compares; the first mismatch (by offset order of
/// the report) is the error.
pub async fn verify_disk(
    addr: &NbdAddr,
    sums: &ChunkChecksums,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<VerifySummary, VerifyError> {
    let client = NbdClient::connect(addr, &ConnectOptions::default())
        .await
        .map_err(|source| VerifyError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let size = client.size();
    for r in &sums.ranges {
        if r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            return Err(VerifyError::OutOfBounds {
                offset: r.offset,
                length: r.length,
                size,
            });
        }
    }
    // Owned ranges: a stream of futures borrowing the report trips the compiler's
    // higher-ranked lifetime check when the whole job future must be `Send`.
    let mut results = futures_util::stream::iter(sums.ranges.clone().into_iter().map(|r| {
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
        // Cancel is honoured between reads: reading back a large disk takes minutes.
        let next = tokio::select! {
            _ = cancel.cancelled() => return Err(VerifyError::Cancelled),
            n = results.next() => n,
        };
        match next {
            Some(r) => bytes += r?,
            None => break,
        }
    }
    drop(results);
    let _ = client.disconnect().await;
    Ok(VerifySummary {
        ranges: sums.ranges.len(),
        bytes,
    })
}

async fn hash_range(client: &NbdClient, offset: u64, length: u64) -> Result<String, VerifyError> {
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
    Ok(h.finalize().to_hex().to_string())
}
