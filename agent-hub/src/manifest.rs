//! Whole-disk checksums of a backup point: one BLAKE3 per cell of a fixed grid over a disk's
//! whole virtual size ([`Manifest`]), kept in a sidecar file next to the image
//! (`<image>.sums`), and the read-back that compares an image chain with them ([`check`]).
//!
//! Why a sidecar and not database rows: a 1 TiB disk on the 4 MiB grid has 262 144 cells; as
//! rows that is a quarter of a million inserts per disk per point and as much to read back for
//! every verification, and a catalog that grows with the bytes protected rather than with the
//! points. As a file it is 8 MiB written once, next to the image it describes: it moves, is
//! copied and pruned with its image, and a restore or the start-up reconciler can read it
//! without the database. The database keeps the sidecar's own BLAKE3
//! (`backup_disks.manifest_blake3`), so a sidecar changed on disk is caught, never trusted; the
//! file also ends with the BLAKE3 of everything before it, so a torn or rotted sidecar is told
//! apart from a corrupt image.
//!
//! Format (little-endian): `SDSUMS01`, cell size (u64), disk size (u64), cell count (u64), the
//! 32-byte hashes in cell order, then the 32-byte BLAKE3 of all the preceding bytes.
//!
//! The read-back ([`check`], and [`compute`] for a hub-alone writer) asks the export's
//! `base:allocation` block status first: a cell the image chain holds only as zeroes is
//! hashed as zeroes without reading it (what a read would return, as the same metadata decides
//! both), every other cell is read and hashed. Cells are read [`PARALLEL`] at a time and hashed
//! on the runtime's worker threads.
//!
//! The writer's range checksums (the written extents, in chunks) are proven in the same pass
//! ([`check_with_ranges`], [`compute_with_ranges`]): a range that lies inside one cell is hashed
//! from that cell's bytes as they are read (a range that is the whole cell shares its hash; one
//! in a cell read as zeroes by block status is hashed as zeroes), so the data is read once, not
//! once per kind of checksum. Ranges that cross a cell boundary are left to the caller
//! ([`split_ranges`]).

use futures_util::StreamExt;
use sendense_shared::api::{ChecksumRange, GridChecksums};
use sendense_shared::nbd::{
    BASE_ALLOCATION, ConnectOptions, NbdAddr, NbdClient, NbdError, STATE_ZERO,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;

const MAGIC: &[u8; 8] = b"SDSUMS01";
const HEADER: usize = 8 + 3 * 8;
/// Cells read at once per disk: enough to keep qemu-nbd's coroutines and both cores busy, few
/// enough to bound memory (`PARALLEL` × the cell size).
pub const PARALLEL: usize = 8;
/// One read of a cell (qemu-nbd accepts up to 32 MiB).
const PIECE: u64 = 1 << 20;
/// NBD connections per read-back (the hub's qemu-nbd allows `--shared` of them).
const CONNECTIONS: usize = 4;
/// Mismatches listed in a report (all are counted).
const LISTED: usize = 16;
/// Span of one block-status query (the protocol's length is 32 bits).
const STATUS_SPAN: u64 = 1 << 30;

/// Why checksums could not be built, stored, read or compared.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the writer's grid is unusable: {reason}")]
    BadGrid { reason: String },
    #[error("cannot write checksum sidecar {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read checksum sidecar {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checksum sidecar {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot open {addr} to read back")]
    Connect {
        addr: String,
        #[source]
        source: NbdError,
    },
    #[error("reading back {offset}+{length}")]
    Io {
        offset: u64,
        length: u64,
        #[source]
        source: NbdError,
    },
    #[error("the image is {actual} bytes, its checksums cover {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("read-back interrupted by a cancel")]
    Cancelled,
    #[error("a read-back task failed: {reason}")]
    Task { reason: String },
}

/// The whole-disk checksums of one disk of one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub cell_size: u64,
    pub disk_size: u64,
    hashes: Vec<[u8; 32]>,
}

/// One cell whose bytes differ from the stored checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub index: u64,
    pub offset: u64,
    pub length: u64,
    pub expected: String,
    pub actual: String,
}

/// What a read-back found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub cells: u64,
    /// Cells read (the others the image holds as zeroes, per block status).
    pub cells_read: u64,
    pub bytes_read: u64,
    pub mismatch_count: u64,
    /// The first mismatches, in cell order.
    pub mismatches: Vec<Mismatch>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.mismatch_count == 0
    }

    /// "cell 12 (offset 50331648, 4194304 bytes): stored 1f..., image holds 9a..." for the
    /// first mismatch, and how many more.
    pub fn describe_mismatches(&self) -> String {
        let Some(m) = self.mismatches.first() else {
            return "no mismatch".into();
        };
        let more = self.mismatch_count - 1;
        format!(
            "cell {} (offset {}, {} bytes): stored BLAKE3 {}, the image holds {}{}",
            m.index,
            m.offset,
            m.length,
            m.expected,
            m.actual,
            if more > 0 {
                format!(" (and {more} more cell(s))")
            } else {
                String::new()
            }
        )
    }
}

/// BLAKE3 of `len` zero bytes, cached per length (every cell but maybe the last has one).
pub fn zero_hash(len: u64) -> [u8; 32] {
    static CACHE: OnceLock<Mutex<HashMap<u64, [u8; 32]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&len) {
        return *h;
    }
    let mut h = blake3::Hasher::new();
    let block = [0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    let out = *h.finalize().as_bytes();
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(len, out);
    out
}

fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

/// The sidecar of an image: `<image>.sums`.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".sums");
    PathBuf::from(p)
}

impl Manifest {
    /// Number of cells of a disk of `disk_size` on a grid of `cell_size`.
    pub fn cell_count(disk_size: u64, cell_size: u64) -> u64 {
        disk_size.div_ceil(cell_size)
    }

    pub fn cells(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Offset and length of cell `i`.
    pub fn cell(&self, i: u64) -> (u64, u64) {
        let offset = i * self.cell_size;
        (offset, self.cell_size.min(self.disk_size - offset))
    }

    pub fn hash_hex(&self, i: u64) -> String {
        hex(&self.hashes[i as usize])
    }

    /// Bytes of cells whose checksum is not that of zeroes (what a read-back reads at most,
    /// unless the image disagrees).
    pub fn data_bytes(&self) -> u64 {
        (0..self.cells())
            .filter(|&i| self.hashes[i as usize] != zero_hash(self.cell(i).1))
            .map(|i| self.cell(i).1)
            .sum()
    }

    /// Builds the manifest of a point from the writer's grid: the cells it hashed, the zero
    /// runs, and for an incremental (`parent`) the parent's checksum for every cell the writer
    /// did not list. A full must list every cell. The grids must agree in cell size; a disk that
    /// grew since the parent reads zeroes beyond the parent's size.
    pub fn from_grid(
        grid: &GridChecksums,
        parent: Option<&Manifest>,
    ) -> Result<Manifest, ManifestError> {
        let bad = |reason: String| Err(ManifestError::BadGrid { reason });
        if grid.cell_size < 4096 || !grid.cell_size.is_power_of_two() {
            return bad(format!(
                "cell size {} is not a power of two of at least 4096",
                grid.cell_size
            ));
        }
        if grid.disk_size == 0 {
            return bad("disk size is 0".into());
        }
        let n = Manifest::cell_count(grid.disk_size, grid.cell_size);
        let mut hashes: Vec<Option<[u8; 32]>> = vec![None; n as usize];
        let last_len = grid.disk_size - (n - 1) * grid.cell_size;
        let len_of = |i: u64| {
            if i == n - 1 { last_len } else { grid.cell_size }
        };
        for c in &grid.cells {
            if c.index >= n {
                return bad(format!("cell {} is beyond the disk's {n} cells", c.index));
            }
            let Some(h) = unhex(&c.blake3) else {
                return bad(format!(
                    "cell {}: {:?} is not a BLAKE3 hex",
                    c.index, c.blake3
                ));
            };
            if hashes[c.index as usize].replace(h).is_some() {
                return bad(format!("cell {} is listed twice", c.index));
            }
        }
        for r in &grid.zero_cells {
            let end = r.first.checked_add(r.count).filter(|&e| e <= n);
            let Some(end) = end else {
                return bad(format!(
                    "zero run {}+{} is beyond the disk's {n} cells",
                    r.first, r.count
                ));
            };
            for i in r.first..end {
                if hashes[i as usize].replace(zero_hash(len_of(i))).is_some() {
                    return bad(format!("cell {i} is listed twice"));
                }
            }
        }
        if let Some(p) = parent {
            if p.cell_size != grid.cell_size {
                return bad(format!(
                    "cell size {} differs from the parent point's {}",
                    grid.cell_size, p.cell_size
                ));
            }
            if p.disk_size > grid.disk_size {
                return bad(format!(
                    "the disk shrank from {} to {} bytes since the parent point",
                    p.disk_size, grid.disk_size
                ));
            }
        }
        let mut out = Vec::with_capacity(n as usize);
        for (i, h) in hashes.into_iter().enumerate() {
            let i = i as u64;
            let h = match (h, parent) {
                (Some(h), _) => h,
                (None, Some(p)) if i < p.cells() && p.cell(i).1 == len_of(i) => {
                    p.hashes[i as usize]
                }
                // A cell that grew (the parent's last, short cell) or is new needs the writer.
                (None, Some(_)) => {
                    return bad(format!(
                        "cell {i} is neither listed nor the same in the parent point"
                    ));
                }
                (None, None) => {
                    return bad(format!(
                        "a full point must list every cell; cell {i} is missing"
                    ));
                }
            };
            out.push(h);
        }
        Ok(Manifest {
            cell_size: grid.cell_size,
            disk_size: grid.disk_size,
            hashes: out,
        })
    }

    /// Indices of the cells whose checksum differs from `other`'s, in cell order (a cell one
    /// of them lacks counts as differing). The grids must agree in cell size for the indices
    /// to mean the same bytes; the caller checks that.
    pub fn diff(&self, other: &Manifest) -> Vec<u64> {
        let n = self.hashes.len().max(other.hashes.len());
        (0..n)
            .filter(|&i| self.hashes.get(i) != other.hashes.get(i))
            .map(|i| i as u64)
            .collect()
    }

    /// The sidecar's bytes (header, hashes, trailer).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 32 * self.hashes.len() + 32);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.cell_size.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            b.extend_from_slice(h);
        }
        let trailer = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&trailer);
        b
    }

    /// Parses a sidecar; `path` only names it in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, ManifestError> {
        let damaged = |reason: String| ManifestError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER + 32 || &bytes[..8] != MAGIC {
            return Err(damaged("not a Sendense checksum sidecar".into()));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(damaged(
                "its own checksum does not match its content".into(),
            ));
        }
        let u = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let (cell_size, disk_size, count) = (u(8), u(16), u(24));
        if cell_size == 0
            || disk_size == 0
            || Manifest::cell_count(disk_size, cell_size) != count
            || (body.len() - HEADER) as u64 != count * 32
        {
            return Err(damaged(format!(
                "header says {count} cells of {cell_size} bytes for {disk_size} bytes, body has {} bytes",
                body.len() - HEADER
            )));
        }
        let hashes = body[HEADER..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        Ok(Manifest {
            cell_size,
            disk_size,
            hashes,
        })
    }

    /// Writes the sidecar at `path` durably: a temporary file created exclusively (0640, no
    /// symlink followed) in the same directory, fsynced, renamed over `path`, then the directory
    /// fsynced. Answers the BLAKE3 of the whole file, for the database.
    pub async fn write(&self, path: &Path) -> Result<String, ManifestError> {
        let bytes = self.encode();
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || write_durably(&path, &bytes).map(|()| digest))
            .await
            .map_err(|e| ManifestError::Task {
                reason: e.to_string(),
            })?
    }

    /// Writes this manifest as `image`'s sidecar ([`Manifest::write`]) and answers the catalog
    /// update that records it, with who computed it (`"writer"` or `"hub"`).
    pub async fn store_for(
        &self,
        image: &Path,
        source: &str,
    ) -> Result<crate::db::DiskUpdate, ManifestError> {
        let sidecar = sidecar_path(image);
        let digest = self.write(&sidecar).await?;
        Ok(crate::db::DiskUpdate {
            manifest_path: Some(sidecar.display().to_string()),
            manifest_blake3: Some(digest),
            checksums_source: Some(source.to_string()),
            ..Default::default()
        })
    }

    /// Reads the sidecar at `path`; `expected` is the file's BLAKE3 as the database recorded it
    /// (a sidecar that differs is damaged, whatever its own trailer says).
    pub async fn read(path: &Path, expected: Option<&str>) -> Result<Manifest, ManifestError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| ManifestError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if let Some(want) = expected {
            let got = blake3::hash(&bytes).to_hex().to_string();
            if !got.eq_ignore_ascii_case(want) {
                return Err(ManifestError::Damaged {
                    path: path.to_path_buf(),
                    reason: format!("its BLAKE3 is {got}, the catalog recorded {want}"),
                });
            }
        }
        Manifest::decode(&bytes, path)
    }
}

/// fsyncs a file and the directory it is in (a rename or a new file is durable only once its
/// directory is).
pub fn fsync_file_and_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| ManifestError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(err)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// The writer's range checksums proven in the same pass as the cells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeReport {
    pub ranges: usize,
    pub bytes: u64,
    /// The first range (in the writer's order) whose bytes differ, if any.
    pub first_mismatch: Option<RangeMismatch>,
    pub mismatch_count: u64,
}

/// One range whose bytes differ from the writer's checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMismatch {
    pub offset: u64,
    pub length: u64,
    pub expected: String,
    pub actual: String,
}

/// Splits `ranges` into those that lie inside one cell of a `cell_size` grid over `disk_size`
/// bytes (proven in the cells' pass) and the others (to be read on their own, e.g. with
/// [`sendense_shared::nbd::verify::verify_ranges`], which also refuses ranges beyond the disk).
pub fn split_ranges(
    ranges: &[ChecksumRange],
    cell_size: u64,
    disk_size: u64,
) -> (Vec<ChecksumRange>, Vec<ChecksumRange>) {
    ranges
        .iter()
        .cloned()
        .partition(|r| fits_in_cell(r, cell_size, disk_size))
}

fn fits_in_cell(r: &ChecksumRange, cell_size: u64, disk_size: u64) -> bool {
    r.length > 0
        && r.offset
            .checked_add(r.length)
            .is_some_and(|end| end <= disk_size)
        && r.offset / cell_size == (r.offset + r.length - 1) / cell_size
}

/// Per cell, the ranges inside it: (index in the list, offset within the cell, length).
type CellRanges = Vec<Vec<(usize, u64, u64)>>;

/// The ranges that fit in a cell, by cell (the others are in no cell, so they never get a hash).
fn ranges_by_cell(ranges: &[ChecksumRange], cell_size: u64, disk_size: u64) -> CellRanges {
    let cells = Manifest::cell_count(disk_size, cell_size) as usize;
    let mut by_cell: CellRanges = vec![Vec::new(); cells];
    for (k, r) in ranges.iter().enumerate() {
        if fits_in_cell(r, cell_size, disk_size) {
            let i = (r.offset / cell_size) as usize;
            by_cell[i].push((k, r.offset - i as u64 * cell_size, r.length));
        }
    }
    by_cell
}

fn range_report(ranges: &[ChecksumRange], hashes: &[Option<[u8; 32]>]) -> RangeReport {
    let mut rep = RangeReport {
        ranges: ranges.len(),
        ..Default::default()
    };
    for (r, h) in ranges.iter().zip(hashes) {
        rep.bytes += r.length;
        let actual = h.map(|h| hex(&h)).unwrap_or_default();
        if !actual.eq_ignore_ascii_case(&r.blake3) {
            rep.mismatch_count += 1;
            rep.first_mismatch.get_or_insert(RangeMismatch {
                offset: r.offset,
                length: r.length,
                expected: r.blake3.clone(),
                actual,
            });
        }
    }
    rep
}

/// Connects to a read-only export with `base:allocation`.
async fn connect(addr: &NbdAddr) -> Result<NbdClient, ManifestError> {
    let opts = ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.to_string()],
        ..ConnectOptions::default()
    };
    NbdClient::connect(addr, &opts)
        .await
        .map_err(|source| ManifestError::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// For every cell, whether the export's block status says it reads as zeroes only.
async fn zero_cells(
    client: &NbdClient,
    cell_size: u64,
    size: u64,
) -> Result<Vec<bool>, ManifestError> {
    let n = Manifest::cell_count(size, cell_size) as usize;
    let mut zero = vec![false; n];
    if client.meta_context_id(BASE_ALLOCATION).is_none() {
        return Ok(zero); // every cell is read
    }
    // Zero areas as [start, end) runs, merged.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let len = (size - at).min(STATUS_SPAN);
        let extents = client
            .block_status(BASE_ALLOCATION, at, len as u32)
            .await
            .map_err(|source| ManifestError::Io {
                offset: at,
                length: len,
                source,
            })?;
        if extents.is_empty() {
            break;
        }
        for e in extents {
            let end = (at + e.length).min(size);
            if e.flags & STATE_ZERO != 0 {
                match runs.last_mut() {
                    Some(r) if r.1 == at => r.1 = end,
                    _ => runs.push((at, end)),
                }
            }
            at = end;
            if at >= size {
                break;
            }
        }
    }
    for (start, end) in runs {
        let first = start.div_ceil(cell_size);
        for i in first..(n as u64) {
            let (o, l) = (i * cell_size, cell_size.min(size - i * cell_size));
            if o + l > end {
                break;
            }
            zero[i as usize] = true;
        }
    }
    Ok(zero)
}

/// The cell's hash, and the hash of each range inside it (`inner`: index, offset within the
/// cell, length), from the same bytes.
async fn hash_cell(
    client: &NbdClient,
    offset: u64,
    length: u64,
    inner: &[(usize, u64, u64)],
) -> Result<([u8; 32], Vec<(usize, [u8; 32])>), ManifestError> {
    // The cell's pieces are asked for at once and hashed in order: qemu-nbd serves them in
    // parallel, where one large read is one request on one of its threads.
    let pieces = (0..length.div_ceil(PIECE)).map(|k| {
        let at = offset + k * PIECE;
        let n = PIECE.min(offset + length - at);
        async move {
            client
                .read(at, n as u32)
                .await
                .map_err(|source| ManifestError::Io {
                    offset: at,
                    length: n,
                    source,
                })
        }
    });
    let data = futures_util::future::try_join_all(pieces).await?;
    let mut h = blake3::Hasher::new();
    for d in &data {
        h.update(d);
    }
    let cell = *h.finalize().as_bytes();
    let ranges = inner
        .iter()
        .map(|&(k, at, len)| {
            if at == 0 && len == length {
                return (k, cell);
            }
            let mut h = blake3::Hasher::new();
            let (end, mut pos) = (at + len, 0u64);
            for d in &data {
                let (lo, hi) = (pos, pos + d.len() as u64);
                if hi > at && lo < end {
                    h.update(&d[(at.max(lo) - lo) as usize..(end.min(hi) - lo) as usize]);
                }
                pos = hi;
            }
            (k, *h.finalize().as_bytes())
        })
        .collect();
    Ok((cell, ranges))
}

/// What one pass over an export found.
struct Exported {
    /// Every cell's hash, in order.
    hashes: Vec<[u8; 32]>,
    /// Which cells block status gave as zeroes (not read).
    zero: Vec<bool>,
    size: u64,
    /// The hash of each range asked for, in its order (`None`: beyond the export's cells).
    ranges: Vec<Option<[u8; 32]>>,
}

/// The hash of every cell of the export (zero cells by block status), in order; `read` counts
/// the bytes read as they are.
/// `ranges` (each inside one cell, see [`split_ranges`]) are hashed from the same bytes; their
/// hashes come back in their order.
async fn hash_export(
    addr: &NbdAddr,
    cell_size: u64,
    expect_size: Option<u64>,
    ranges: &[ChecksumRange],
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Result<Exported, ManifestError> {
    let client = connect(addr).await?;
    let size = client.size();
    if let Some(want) = expect_size
        && want != size
    {
        let _ = client.disconnect().await;
        return Err(ManifestError::SizeMismatch {
            expected: want,
            actual: size,
        });
    }
    // More connections than one: qemu-nbd serves each on its own, and one connection's
    // reply stream is read by one task (bench/verify.sh measures the difference).
    let mut clients = vec![client.clone()];
    for _ in 1..CONNECTIONS {
        match connect(addr).await {
            Ok(c) => clients.push(c),
            Err(_) => break, // fewer connections are slower, not wrong
        }
    }
    let result = async {
        let zero = Arc::new(zero_cells(&client, cell_size, size).await?);
        let n = zero.len() as u64;
        let inner = Arc::new(ranges_by_cell(ranges, cell_size, size));
        let mut range_hashes: Vec<Option<[u8; 32]>> = vec![None; ranges.len()];
        let mut results = futures_util::stream::iter((0..n).map(|i| {
            let client = clients[i as usize % clients.len()].clone();
            let zero = zero.clone();
            let inner = inner.clone();
            tokio::spawn(async move {
                let (o, l) = (i * cell_size, cell_size.min(size - i * cell_size));
                let mine = &inner[i as usize];
                if zero[i as usize] {
                    // What a read would return, as the same metadata decides both.
                    let r = mine
                        .iter()
                        .map(|&(k, _, len)| (k, zero_hash(len)))
                        .collect();
                    Ok((zero_hash(l), r, 0))
                } else {
                    hash_cell(&client, o, l, mine).await.map(|(h, r)| (h, r, l))
                }
            })
        }))
        .buffered(PARALLEL);
        let mut hashes = Vec::with_capacity(n as usize);
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ManifestError::Cancelled),
                n = results.next() => n,
            };
            let Some(joined) = next else { break };
            let (h, r, bytes) = joined.map_err(|e| ManifestError::Task {
                reason: e.to_string(),
            })??;
            read.fetch_add(bytes, Ordering::Relaxed);
            hashes.push(h);
            for (k, rh) in r {
                range_hashes[k] = Some(rh);
            }
        }
        drop(results);
        Ok(Exported {
            hashes,
            zero: zero.to_vec(),
            size,
            ranges: range_hashes,
        })
    }
    .await;
    for c in clients {
        let _ = c.disconnect().await;
    }
    result
}

/// Reads the export at `addr` (the image chain, served read-only) back and compares every cell
/// with `m`. `read` counts bytes read as they are (for progress). Every mismatch is counted;
/// the first few are listed.
pub async fn check(
    addr: &NbdAddr,
    m: &Manifest,
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Result<CheckReport, ManifestError> {
    check_with_ranges(addr, m, &[], cancel, read)
        .await
        .map(|(r, _)| r)
}

/// [`check`], and in the same pass the writer's `ranges` that lie inside one cell (the others
/// are counted as mismatches: split them off first with [`split_ranges`]).
pub async fn check_with_ranges(
    addr: &NbdAddr,
    m: &Manifest,
    ranges: &[ChecksumRange],
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Result<(CheckReport, RangeReport), ManifestError> {
    let Exported {
        hashes,
        zero,
        ranges: range_hashes,
        ..
    } = hash_export(addr, m.cell_size, Some(m.disk_size), ranges, cancel, read).await?;
    let mut report = CheckReport {
        cells: m.cells(),
        ..Default::default()
    };
    for (i, h) in hashes.iter().enumerate() {
        let (offset, length) = m.cell(i as u64);
        if !zero[i] {
            report.cells_read += 1;
            report.bytes_read += length;
        }
        if *h != m.hashes[i] {
            report.mismatch_count += 1;
            if report.mismatches.len() < LISTED {
                report.mismatches.push(Mismatch {
                    index: i as u64,
                    offset,
                    length,
                    expected: hex(&m.hashes[i]),
                    actual: hex(h),
                });
            }
        }
    }
    Ok((report, range_report(ranges, &range_hashes)))
}

/// Computes the manifest of the export at `addr` (a hub-alone writer sent no grid, or a
/// legacy point gets one): the checksums of what the image holds, not proof it equals the
/// source.
pub async fn compute(
    addr: &NbdAddr,
    cell_size: u64,
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Result<Manifest, ManifestError> {
    compute_with_ranges(addr, cell_size, &[], cancel, read)
        .await
        .map(|(m, _)| m)
}

/// [`compute`], and in the same pass the writer's `ranges` that lie inside one cell (see
/// [`check_with_ranges`]).
pub async fn compute_with_ranges(
    addr: &NbdAddr,
    cell_size: u64,
    ranges: &[ChecksumRange],
    cancel: &CancellationToken,
    read: &AtomicU64,
) -> Result<(Manifest, RangeReport), ManifestError> {
    let e = hash_export(addr, cell_size, None, ranges, cancel, read).await?;
    let report = range_report(ranges, &e.ranges);
    Ok((
        Manifest {
            cell_size,
            disk_size: e.size,
            hashes: e.hashes,
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::{CellChecksum, CellRun};

    fn h(b: &[u8]) -> String {
        blake3::hash(b).to_hex().to_string()
    }

    fn grid(cells: &[(u64, &[u8])], zero: &[(u64, u64)], size: u64) -> GridChecksums {
        GridChecksums {
            cell_size: 4096,
            disk_size: size,
            cells: cells
                .iter()
                .map(|(i, b)| CellChecksum {
                    index: *i,
                    blake3: h(b),
                })
                .collect(),
            zero_cells: zero
                .iter()
                .map(|&(first, count)| CellRun { first, count })
                .collect(),
        }
    }

    #[test]
    fn a_full_grid_needs_every_cell_and_zero_runs_hash_as_zeroes() {
        let size = 3 * 4096 + 100;
        let m = Manifest::from_grid(&grid(&[(0, b"a"), (3, b"d")], &[(1, 2)], size), None).unwrap();
        assert_eq!(m.cells(), 4);
        assert_eq!(m.cell(3), (3 * 4096, 100));
        assert_eq!(m.hash_hex(1), h(&[0u8; 4096]));
        assert_eq!(m.hash_hex(3), h(b"d"));
        let e = Manifest::from_grid(&grid(&[(0, b"a")], &[(1, 2)], size), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cell 3 is missing"), "{e}");
        let e = Manifest::from_grid(&grid(&[(0, b"a"), (0, b"b")], &[], 4096), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cell 0 is listed twice"), "{e}");
        let e = Manifest::from_grid(&grid(&[], &[(2, 3)], size), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero run 2+3 is beyond"), "{e}");
    }

    #[test]
    fn an_incremental_inherits_unlisted_cells_from_its_parent() {
        let size = 4 * 4096;
        let parent = Manifest::from_grid(
            &grid(&[(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")], &[], size),
            None,
        )
        .unwrap();
        let m = Manifest::from_grid(&grid(&[(1, b"B")], &[(3, 1)], size), Some(&parent)).unwrap();
        assert_eq!(m.hash_hex(0), h(b"a"));
        assert_eq!(m.hash_hex(1), h(b"B"));
        assert_eq!(m.hash_hex(2), h(b"c"));
        assert_eq!(m.hash_hex(3), h(&[0u8; 4096]));
        // A grown disk: the parent's short last cell changed length, so it must be listed.
        let short = Manifest::from_grid(&grid(&[(0, b"a")], &[], 100), None).unwrap();
        let e = Manifest::from_grid(&grid(&[], &[(1, 1)], 2 * 4096), Some(&short))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cell 0 is neither listed"), "{e}");
    }

    #[tokio::test]
    async fn a_sidecar_round_trips_and_any_changed_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b1.qcow2.sums");
        let m = Manifest::from_grid(&grid(&[(0, b"a")], &[(1, 9)], 10 * 4096), None).unwrap();
        let digest = m.write(&path).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o137, 0, "sidecar mode {mode:o}");
        assert_eq!(Manifest::read(&path, Some(&digest)).await.unwrap(), m);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = Manifest::read(&path, None).await.unwrap_err().to_string();
        assert!(e.contains("its own checksum does not match"), "{e}");
        // A sidecar replaced whole (consistent trailer) still differs from the catalog.
        let other = Manifest::from_grid(&grid(&[(0, b"x")], &[(1, 9)], 10 * 4096), None).unwrap();
        other.write(&path).await.unwrap();
        let e = Manifest::read(&path, Some(&digest))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("the catalog recorded"), "{e}");
    }
}
