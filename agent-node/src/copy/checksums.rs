//! Checksums of a copy ([`sendense_shared::api::ChunkChecksums`]): the BLAKE3 of every range
//! written, per cell of the `checksum_chunk_size` grid.
//!
//! Data is hashed as the source held it, on a thread of its own ([`start`]): a hash of a few MiB
//! would hold up the reader and writer tasks. A data range is announced ([`Checksums::range`])
//! before its first piece is sent ([`Checksums::piece`]); pieces come in any order and are put
//! together front to back. Zero ranges use a cached hash of zeroes ([`Checksums::zero_ranges`]).

use super::CopyError;
use super::plan;
use bytes::Bytes;
use sendense_shared::api::ChecksumRange;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// To the hashing thread, in any order except that a range is announced before its pieces
/// are sent.
enum HashMsg {
    /// A checksum range (inside one grid cell) that data pieces will fill.
    Range { offset: u64, length: u64 },
    /// Bytes the source held at `offset`.
    Piece {
        offset: u64,
        data: Bytes,
        _permit: Arc<OwnedSemaphorePermit>,
    },
}

/// The request tasks' side: announce ranges, hand over data, hash zeroes. Dropping the last
/// one lets the thread finish ([`HashThread::finish`]).
pub(super) struct Checksums {
    tx: mpsc::UnboundedSender<HashMsg>,
    zero_hashes: Mutex<HashMap<u64, String>>,
}

/// The hashing thread; it returns its ranges when every [`Checksums`] is gone.
pub(super) struct HashThread(std::thread::JoinHandle<Result<Vec<ChecksumRange>, String>>);

/// Starts the hashing thread.
pub(super) fn start() -> (Checksums, HashThread) {
    let (tx, rx) = mpsc::unbounded_channel::<HashMsg>();
    let handle = std::thread::spawn(move || hash_all(rx));
    let checksums = Checksums {
        tx,
        zero_hashes: Mutex::new(HashMap::new()),
    };
    (checksums, HashThread(handle))
}

impl Checksums {
    /// Announces a data range that pieces will fill.
    pub(super) fn range(&self, offset: u64, length: u64) {
        let _ = self.tx.send(HashMsg::Range { offset, length });
    }

    /// Hands over the bytes the source held at `offset`. The message holds the in-flight
    /// permit, so hashing that falls behind slows the reads down.
    pub(super) fn piece(&self, offset: u64, data: Bytes, permit: Arc<OwnedSemaphorePermit>) {
        let _ = self.tx.send(HashMsg::Piece {
            offset,
            data,
            _permit: permit,
        });
    }

    /// The checksum ranges of zeroes written at `offset..offset+length`, one per grid cell.
    pub(super) fn zero_ranges(&self, offset: u64, length: u64, chunk: u64) -> Vec<ChecksumRange> {
        plan::pieces(offset, length, u64::MAX, chunk)
            .map(|(offset, length)| ChecksumRange {
                offset,
                length,
                blake3: self.zero_hash(length),
            })
            .collect()
    }

    fn zero_hash(&self, len: u64) -> String {
        if let Some(h) = self
            .zero_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&len)
        {
            return h.clone();
        }
        let mut h = blake3::Hasher::new();
        let block = [0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            h.update(&block[..n]);
            left -= n as u64;
        }
        let hex = h.finalize().to_hex().to_string();
        self.zero_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(len, hex.clone());
        hex
    }
}

impl HashThread {
    /// Waits for the thread (every [`Checksums`] must be dropped first) and takes its ranges.
    pub(super) async fn finish(self) -> Result<Vec<ChecksumRange>, CopyError> {
        let handle = self.0;
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| CopyError::Task {
                reason: e.to_string(),
            })?
            .map_err(|_| CopyError::Task {
                reason: "the hashing thread panicked".into(),
            })?
            .map_err(|reason| CopyError::Task { reason })
    }
}

/// The thread's loop. Each announced range is hashed front to back as its pieces come in;
/// pieces ahead of the one being waited for are kept (they hold their in-flight permits, so
/// this is bounded). Since requests are issued in offset order, the piece waited for is always
/// already in flight. Returns the ranges when the channel closes, or what was left incomplete.
fn hash_all(mut rx: mpsc::UnboundedReceiver<HashMsg>) -> Result<Vec<ChecksumRange>, String> {
    let mut done = Vec::new();
    let mut announced: VecDeque<(u64, u64)> = Default::default();
    let mut waiting: BTreeMap<u64, HashMsg> = Default::default();
    // (range offset, range end, next offset to hash, hasher)
    let mut current: Option<(u64, u64, u64, blake3::Hasher)> = None;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            HashMsg::Range { offset, length } => announced.push_back((offset, length)),
            HashMsg::Piece { offset, .. } => {
                waiting.insert(offset, msg);
            }
        }
        loop {
            if current.is_none() {
                match announced.pop_front() {
                    Some((o, l)) => current = Some((o, o + l, o, blake3::Hasher::new())),
                    None => break,
                }
            }
            let (start, end, next, hasher) = current.as_mut().expect("set above");
            while *next < *end {
                let Some(HashMsg::Piece { data, .. }) = waiting.remove(next) else {
                    break;
                };
                hasher.update(&data);
                *next += data.len() as u64;
            }
            if *next < *end {
                break;
            }
            if *next > *end {
                return Err(format!("pieces overran the checksum range at {start}"));
            }
            done.push(ChecksumRange {
                offset: *start,
                length: *end - *start,
                blake3: hasher.finalize().to_hex().to_string(),
            });
            current = None;
        }
    }
    match (current, announced.front(), waiting.keys().next()) {
        (None, None, None) => Ok(done),
        (Some((start, _, next, _)), _, _) => Err(format!(
            "checksum range at {start} incomplete: no data at {next}"
        )),
        (None, Some((o, _)), _) => Err(format!("checksum range at {o} never started")),
        (None, None, Some(o)) => Err(format!("data at {o} outside every checksum range")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn permit() -> Arc<OwnedSemaphorePermit> {
        Arc::new(Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap())
    }

    #[tokio::test]
    async fn pieces_out_of_order_hash_as_their_range() {
        let (c, thread) = start();
        c.range(0, 8);
        c.range(8, 4);
        c.piece(4, Bytes::from_static(b"efgh"), permit());
        c.piece(8, Bytes::from_static(b"ijkl"), permit());
        c.piece(0, Bytes::from_static(b"abcd"), permit());
        drop(c);
        let ranges = thread.finish().await.unwrap();
        assert_eq!(
            ranges,
            [
                ChecksumRange {
                    offset: 0,
                    length: 8,
                    blake3: blake3::hash(b"abcdefgh").to_hex().to_string(),
                },
                ChecksumRange {
                    offset: 8,
                    length: 4,
                    blake3: blake3::hash(b"ijkl").to_hex().to_string(),
                },
            ]
        );
    }

    #[tokio::test]
    async fn an_incomplete_range_is_an_error() {
        let (c, thread) = start();
        c.range(0, 8);
        c.piece(0, Bytes::from_static(b"abcd"), permit());
        drop(c);
        let e = thread.finish().await.unwrap_err().to_string();
        assert!(
            e.contains("checksum range at 0 incomplete: no data at 4"),
            "{e}"
        );
    }

    #[test]
    fn zero_ranges_follow_the_grid_and_hash_zeroes() {
        let (c, _thread) = start();
        let r = c.zero_ranges(4096, 3 * 4096, 8192);
        let zeroes = |n: usize| blake3::hash(&vec![0u8; n]).to_hex().to_string();
        assert_eq!(
            r,
            [
                ChecksumRange {
                    offset: 4096,
                    length: 4096,
                    blake3: zeroes(4096),
                },
                ChecksumRange {
                    offset: 8192,
                    length: 8192,
                    blake3: zeroes(8192),
                },
            ]
        );
    }
}
