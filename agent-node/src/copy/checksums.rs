//! Checksums of a copy: the BLAKE3 of every range written, per cell of the
//! `checksum_chunk_size` grid ([`sendense_shared::api::ChunkChecksums`]), and when asked the
//! whole-disk grid ([`sendense_shared::api::GridChecksums`], put together by
//! [`super::grid::GridBuilder`]).
//!
//! Data is hashed as the source held it, on a thread of its own ([`start`]): a hash of a few MiB
//! would hold up the reader and writer tasks. The dispatcher announces the disk front to back:
//! data ranges ([`Checksums::range`], [`Checksums::grid_read`]) before their first piece is sent
//! ([`Checksums::piece`]), and for the grid also zeroes and unchanged areas
//! ([`Checksums::grid_zero`], [`Checksums::grid_unchanged`]). Pieces come in any order and are
//! put together front to back. Zero ranges of the written list use a cached hash of zeroes
//! ([`Checksums::zero_ranges`]).

use super::CopyError;
use super::grid::GridBuilder;
use super::plan;
use bytes::Bytes;
use sendense_shared::api::{ChecksumRange, GridChecksums};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// To the hashing thread, in any order except that spans are announced in offset order and a
/// range before its pieces are sent.
enum HashMsg {
    Span(Span),
    /// Bytes the source held at `offset`.
    Piece {
        offset: u64,
        data: Bytes,
        _permit: Arc<OwnedSemaphorePermit>,
    },
}

/// A part of the disk, announced in offset order.
#[derive(Debug, Clone, Copy)]
enum Span {
    /// Data pieces will fill it. `listed`: a written range (inside one chunk cell) whose
    /// checksum is listed; otherwise read for the grid only.
    Bytes {
        offset: u64,
        length: u64,
        listed: bool,
    },
    /// Reads as zeroes (grid only).
    Zero { offset: u64, length: u64 },
    /// Unchanged since the parent (grid only).
    Unchanged { offset: u64, length: u64 },
}

/// The request tasks' side: announce ranges, hand over data, hash zeroes. Dropping the last
/// one lets the thread finish ([`HashThread::finish`]).
pub(super) struct Checksums {
    tx: mpsc::UnboundedSender<HashMsg>,
    zero_hashes: Mutex<HashMap<u64, String>>,
    grid: bool,
}

/// What the hashing thread hands over: the written ranges, and the grid when one was asked for.
type Hashed = (Vec<ChecksumRange>, Option<GridChecksums>);

/// The hashing thread; it returns its ranges when every [`Checksums`] is gone.
pub(super) struct HashThread(std::thread::JoinHandle<Result<Hashed, String>>);

/// Starts the hashing thread; `grid`: `(cell size, disk size)` of the whole-disk grid to build.
pub(super) fn start(grid: Option<(u64, u64)>) -> (Checksums, HashThread) {
    let (tx, rx) = mpsc::unbounded_channel::<HashMsg>();
    let builder = grid.map(|(cell, size)| GridBuilder::new(cell, size));
    let handle = std::thread::spawn(move || hash_all(rx, builder));
    let checksums = Checksums {
        tx,
        zero_hashes: Mutex::new(HashMap::new()),
        grid: grid.is_some(),
    };
    (checksums, HashThread(handle))
}

impl Checksums {
    fn span(&self, span: Span) {
        let _ = self.tx.send(HashMsg::Span(span));
    }

    /// Announces a written data range (inside one chunk cell) that pieces will fill.
    pub(super) fn range(&self, offset: u64, length: u64) {
        self.span(Span::Bytes {
            offset,
            length,
            listed: true,
        });
    }

    /// Announces a range read for the grid only (not written, not listed).
    pub(super) fn grid_read(&self, offset: u64, length: u64) {
        self.span(Span::Bytes {
            offset,
            length,
            listed: false,
        });
    }

    /// For the grid: the source reads as zeroes there.
    pub(super) fn grid_zero(&self, offset: u64, length: u64) {
        if self.grid {
            self.span(Span::Zero { offset, length });
        }
    }

    /// For the grid: unchanged since the parent there.
    pub(super) fn grid_unchanged(&self, offset: u64, length: u64) {
        if self.grid {
            self.span(Span::Unchanged { offset, length });
        }
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
    /// Waits for the thread (every [`Checksums`] must be dropped first) and takes its ranges
    /// and grid.
    pub(super) async fn finish(self) -> Result<Hashed, CopyError> {
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

/// The data span being put together.
struct Current {
    start: u64,
    end: u64,
    /// Next offset to hash.
    next: u64,
    /// For a listed range.
    hasher: Option<blake3::Hasher>,
    /// The listed range is exactly the grid's next cell: one hash serves both.
    whole_cell: bool,
}

/// The thread's loop. Each announced span is taken front to back; a data span as its pieces
/// come in. Pieces ahead of the one being waited for are kept (they hold their in-flight
/// permits, so this is bounded). Since requests are issued in offset order, the piece waited
/// for is always already in flight. Returns the ranges and the grid when the channel closes,
/// or what was left incomplete.
fn hash_all(
    mut rx: mpsc::UnboundedReceiver<HashMsg>,
    mut grid: Option<GridBuilder>,
) -> Result<Hashed, String> {
    let mut done = Vec::new();
    let mut announced: VecDeque<Span> = Default::default();
    let mut waiting: BTreeMap<u64, Bytes> = Default::default();
    let mut current: Option<Current> = None;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            HashMsg::Span(s) => announced.push_back(s),
            HashMsg::Piece { offset, data, .. } => {
                // The permit goes with the message: only the bytes wait here.
                waiting.insert(offset, data);
            }
        }
        loop {
            if current.is_none() {
                match announced.pop_front() {
                    Some(Span::Zero { offset, length }) => {
                        if let Some(g) = &mut grid {
                            g.zero(offset, length)?;
                        }
                        continue;
                    }
                    Some(Span::Unchanged { offset, length }) => {
                        if let Some(g) = &mut grid {
                            g.unchanged(offset, length)?;
                        }
                        continue;
                    }
                    Some(Span::Bytes {
                        offset,
                        length,
                        listed,
                    }) => {
                        let end = offset + length;
                        current = Some(Current {
                            start: offset,
                            end,
                            next: offset,
                            hasher: listed.then(blake3::Hasher::new),
                            whole_cell: listed
                                && grid.as_ref().is_some_and(|g| g.is_next_cell(offset, end)),
                        });
                    }
                    None => break,
                }
            }
            let c = current.as_mut().expect("set above");
            while c.next < c.end {
                let Some(data) = waiting.remove(&c.next) else {
                    break;
                };
                if let Some(h) = &mut c.hasher {
                    h.update(&data);
                }
                if let Some(g) = grid.as_mut().filter(|_| !c.whole_cell) {
                    g.data(c.next, &data)?;
                }
                c.next += data.len() as u64;
            }
            if c.next < c.end {
                break;
            }
            if c.next > c.end {
                return Err(format!("pieces overran the checksum range at {}", c.start));
            }
            if let Some(h) = c.hasher.take() {
                let blake3 = h.finalize().to_hex().to_string();
                if c.whole_cell
                    && let Some(g) = &mut grid
                {
                    g.cell_hash(c.start, c.end, blake3.clone())?;
                }
                done.push(ChecksumRange {
                    offset: c.start,
                    length: c.end - c.start,
                    blake3,
                });
            }
            current = None;
        }
    }
    match (current, announced.front(), waiting.keys().next()) {
        (None, None, None) => Ok((done, grid.map(GridBuilder::finish).transpose()?)),
        (Some(c), _, _) => Err(format!(
            "checksum range at {} incomplete: no data at {}",
            c.start, c.next
        )),
        (None, Some(s), _) => Err(format!("checksum span {s:?} never started")),
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
        let (c, thread) = start(None);
        c.range(0, 8);
        c.range(8, 4);
        c.piece(4, Bytes::from_static(b"efgh"), permit());
        c.piece(8, Bytes::from_static(b"ijkl"), permit());
        c.piece(0, Bytes::from_static(b"abcd"), permit());
        drop(c);
        let (ranges, grid) = thread.finish().await.unwrap();
        assert_eq!(grid, None);
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
        let (c, thread) = start(None);
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
        let (c, _thread) = start(None);
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
