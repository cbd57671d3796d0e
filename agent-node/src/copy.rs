//! The copy engine: one disk from a source NBD export (a snapshot) to a target NBD export (the
//! hub's qemu-nbd), skipping what need not be copied.
//!
//! How a copy runs:
//! 1. Connect to both (the source with `base:allocation`, and for an incremental also
//!    `qemu:dirty-bitmap:NAME`); check that the target is writable and at least as large.
//!    With an explicit area list ([`ExtentSource::Areas`], vSphere CBT) only those areas are
//!    looked at; the rest of the disk is skipped.
//! 2. Walk the source's block status in windows and turn it into segments ([`plan`]): data to
//!    read, zeroes to write, ranges to skip. Full copy: holes that read as zeroes are skipped on
//!    a fresh target (`target_is_zero`), otherwise written as WRITE_ZEROES. Incremental: only
//!    dirty extents; inside them, areas that read as zeroes become WRITE_ZEROES.
//! 3. Each data segment is cut into requests (at most `request_size`, never across a checksum
//!    chunk boundary). Each request is a task: READ, look at every byte for all-zero blocks,
//!    WRITE the data and WRITE_ZEROES the zero runs, BLAKE3 the bytes. Tasks run concurrently,
//!    bounded by `max_in_flight_bytes`, spread over `connections` connections when the servers
//!    advertise multi-conn. Cancellation is checked before every request.
//! 4. A final FLUSH on the target.
//!
//! Checksums ([`ChunkChecksums`]): each data segment and each zeroed hole is listed per
//! `checksum_chunk_size` cell it touches (a range never crosses a multiple of the chunk size;
//! a fully copied cell is one range however many requests filled it). Data is hashed as the
//! source held it, on a thread of its own; zero ranges use a cached hash of zeroes. Skipped
//! ranges are not listed.
//!
//! Submodules: [`plan`] (extent map, request cutting, zero detection), [`cli`] (`sendense-node
//! copy`).

pub mod cli;
pub mod plan;

use bytes::Bytes;
use plan::{Action, Coalescer, Segment};
use sendense_shared::api::{ChecksumRange, ChunkChecksums};
use sendense_shared::nbd::{
    BASE_ALLOCATION, ConnectOptions, NbdAddr, NbdClient, NbdError, dirty_bitmap_context,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Where the list of ranges to copy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentSource {
    /// `base:allocation`: everything allocated (full backup).
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: only what changed since the bitmap was created (incremental).
    DirtyBitmap(String),
    /// Exactly these `(offset, length)` areas, sorted and disjoint, from the hypervisor's own
    /// change tracking (vSphere `QueryChangedDiskAreas`): for a full the allocated areas, for an
    /// incremental the changed ones. Everything outside is skipped: the target already holds
    /// it (zeroes on a fresh target, the previous backup under an incremental's overlay).
    /// Inside, `base:allocation` (when offered) and zero detection work as for the others.
    Areas(Arc<Vec<(u64, u64)>>),
}

/// Tuning of one copy. The defaults come from `bench/copy.sh` on the development machine.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Largest READ/WRITE request, bytes.
    pub request_size: u32,
    /// Connections to each side (used only when the server advertises multi-conn).
    pub connections: u32,
    /// Bound on bytes read and not yet written.
    pub max_in_flight_bytes: u64,
    /// Checksum grid: no checksum range crosses a multiple of this.
    pub checksum_chunk_size: u64,
    /// The target reads as zeroes everywhere (a fresh image): holes need not be written.
    pub target_is_zero: bool,
    /// Upper bound on data read per second (`None`: as fast as it goes). A test and operations
    /// knob, set from [`THROTTLE_ENV`]: it makes a copy slow enough to act on it mid-way
    /// (cancel, kill a process) without timed sleeps, or keeps a copy from saturating a link.
    pub throttle_bps: Option<u64>,
}

/// Environment variable read by the node daemon: bytes per second each disk's copy may read
/// (e.g. `SENDENSE_COPY_THROTTLE_BPS=8388608` for 8 MiB/s). Unset or 0: no limit.
pub const THROTTLE_ENV: &str = "SENDENSE_COPY_THROTTLE_BPS";

impl CopyOptions {
    /// The defaults with [`THROTTLE_ENV`] applied.
    pub fn from_env() -> Self {
        let throttle_bps = std::env::var(THROTTLE_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0);
        CopyOptions {
            throttle_bps,
            ..Default::default()
        }
    }
}

impl Default for CopyOptions {
    /// Measured with `bench/copy.sh` (qcow2 -> qcow2 through two qemu-nbd on loopback, 2 cores):
    /// 256 KiB requests beat 1-4 MiB ones (qemu-nbd works on at most 16 requests per client);
    /// one connection beat two and four (the target's qcow2 allocation does not gain from
    /// more clients; nbdcopy itself is faster with `--connections=1` there); 16-64 MiB in
    /// flight were equal within noise. With these, `bench/copy.sh 5` on a loaded 2-core machine:
    /// 8 GiB disk with 2 GiB data 3.8-6.2 s (330-540 MiB/s), median nbdcopy/sendense time ratio
    /// 0.99-1.11 over three runs; sparse 1 TiB disk with 1 GiB data 2.4-3.1 s, ratio 1.01-1.15.
    fn default() -> Self {
        CopyOptions {
            request_size: 256 * 1024,
            connections: 1,
            max_in_flight_bytes: 32 * 1024 * 1024,
            checksum_chunk_size: 4 * 1024 * 1024,
            target_is_zero: false,
            throttle_bps: None,
        }
    }
}

/// Paces data requests to a rate: each request reserves its bytes and waits until the time at
/// which the rate allows them.
struct Throttle {
    started: Instant,
    bps: u64,
    reserved: AtomicU64,
}

impl Throttle {
    fn due(&self, bytes: u64) -> tokio::time::Instant {
        let before = self.reserved.fetch_add(bytes, Ordering::Relaxed);
        let at = Duration::from_secs_f64(before as f64 / self.bps as f64);
        tokio::time::Instant::from_std(self.started + at)
    }
}

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
}

/// A consistent-enough reading of [`DiskCounters`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub taken_at: Instant,
}

impl DiskCounters {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Ordering::Relaxed),
            bytes_skipped: self.bytes_skipped.load(Ordering::Relaxed),
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

    /// Disk bytes done per second between `earlier` and this snapshot (for an ETA).
    pub fn done_rate_since(&self, earlier: &CounterSnapshot) -> f64 {
        let secs = self
            .taken_at
            .saturating_duration_since(earlier.taken_at)
            .as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.bytes_done().saturating_sub(earlier.bytes_done()) as f64 / secs
    }
}

/// What a finished copy did.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub checksums: ChunkChecksums,
    pub elapsed: Duration,
}

/// Why a copy failed; each names the side and the range.
#[derive(Debug, Error)]
pub enum CopyError {
    #[error("invalid copy options: {reason}")]
    Options { reason: String },
    #[error("cannot open the source {addr}")]
    SourceConnect {
        addr: String,
        #[source]
        cause: NbdError,
    },
    #[error("cannot open the target {addr}")]
    TargetConnect {
        addr: String,
        #[source]
        cause: NbdError,
    },
    #[error(
        "the source {addr} does not offer meta context {context:?} (for a dirty bitmap: does the bitmap exist and is it exported?)"
    )]
    MissingContext { addr: String, context: String },
    #[error("the target {addr} is read-only")]
    TargetReadOnly { addr: String },
    #[error(
        "the target {target} has {target_size} bytes, less than the source {source_addr} with {source_size} bytes"
    )]
    TargetTooSmall {
        source_addr: String,
        source_size: u64,
        target: String,
        target_size: u64,
    },
    #[error("block status of the source at {offset}+{length}")]
    BlockStatus {
        offset: u64,
        length: u64,
        #[source]
        cause: NbdError,
    },
    #[error("reading the source at {offset}+{length}")]
    Read {
        offset: u64,
        length: u64,
        #[source]
        cause: NbdError,
    },
    #[error("writing the target at {offset}+{length}")]
    Write {
        offset: u64,
        length: u64,
        #[source]
        cause: NbdError,
    },
    #[error("writing zeroes to the target at {offset}+{length}")]
    Zero {
        offset: u64,
        length: u64,
        #[source]
        cause: NbdError,
    },
    #[error("flushing the target")]
    Flush {
        #[source]
        cause: NbdError,
    },
    #[error("copy cancelled")]
    Cancelled,
    #[error("copy task failed: {reason}")]
    Task { reason: String },
}

/// Runs of zeroes inside data are found at this granularity (one WRITE_ZEROES per run).
const ZERO_BLOCK: usize = 64 * 1024;
/// Largest single WRITE_ZEROES of a hole (no payload, so it can be large).
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Block status is asked for windows of this size.
const STATUS_WINDOW: u64 = 1 << 31;
/// What one WRITE_ZEROES request counts against the in-flight bound (it carries no data, but
/// the number of them outstanding should stay bounded).
const ZERO_REQUEST_COST: u64 = 256 * 1024;

/// Everything a request task needs.
struct Ctx {
    sources: Vec<NbdClient>,
    targets: Vec<NbdClient>,
    counters: Arc<DiskCounters>,
    chunk: u64,
    /// Falls back to writing this buffer where the target has no WRITE_ZEROES.
    zero_buf: Bytes,
    /// Data to hash, to the hashing thread (see [`spawn_hasher`]).
    hasher: mpsc::UnboundedSender<HashMsg>,
    zero_hashes: Mutex<HashMap<u64, String>>,
    throttle: Option<Throttle>,
}

impl Ctx {
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

    async fn write_zeroes(&self, conn: usize, offset: u64, length: u64) -> Result<(), CopyError> {
        let t = &self.targets[conn % self.targets.len()];
        let err = |cause| CopyError::Zero {
            offset,
            length,
            cause,
        };
        if t.can_write_zeroes() {
            let mut at = offset;
            while at < offset + length {
                let n = (offset + length - at).min(u32::MAX as u64 & !0xfff) as u32;
                t.write_zeroes(at, n, false).await.map_err(err)?;
                at += n as u64;
            }
        } else {
            let mut at = offset;
            while at < offset + length {
                let n = (offset + length - at).min(self.zero_buf.len() as u64);
                t.write(at, self.zero_buf.slice(..n as usize))
                    .await
                    .map_err(err)?;
                at += n;
            }
        }
        self.counters
            .bytes_zeroed
            .fetch_add(length, Ordering::Relaxed);
        Ok(())
    }
}

/// Copies one disk. See the module docs for the rules.
pub async fn copy_disk(
    source: &NbdAddr,
    target: &NbdAddr,
    extents: ExtentSource,
    opts: &CopyOptions,
    counters: Arc<DiskCounters>,
    cancel: CancellationToken,
) -> Result<CopyOutcome, CopyError> {
    let started = Instant::now();
    check_options(opts)?;
    let contexts = match &extents {
        ExtentSource::Allocation => vec![BASE_ALLOCATION.to_string()],
        ExtentSource::DirtyBitmap(name) => {
            vec![dirty_bitmap_context(name), BASE_ALLOCATION.to_string()]
        }
        ExtentSource::Areas(_) => vec![BASE_ALLOCATION.to_string()],
    };
    let src_opts = ConnectOptions {
        meta_contexts: contexts,
        ..Default::default()
    };
    let dst_opts = ConnectOptions::default();
    let (src0, dst0) = tokio::select! {
        _ = cancel.cancelled() => return Err(CopyError::Cancelled),
        r = async {
            tokio::join!(
                NbdClient::connect(source, &src_opts),
                NbdClient::connect(target, &dst_opts)
            )
        } => r,
    };
    let src0 = src0.map_err(|cause| CopyError::SourceConnect {
        addr: source.to_string(),
        cause,
    })?;
    let dst0 = dst0.map_err(|cause| CopyError::TargetConnect {
        addr: target.to_string(),
        cause,
    })?;
    // Which context drives the plan, and whether zeroes can be found without reading.
    let alloc_ok = src0.meta_context_id(BASE_ALLOCATION).is_some();
    let map_context = match &extents {
        ExtentSource::Allocation | ExtentSource::Areas(_) => BASE_ALLOCATION.to_string(),
        ExtentSource::DirtyBitmap(name) => dirty_bitmap_context(name),
    };
    if !alloc_ok && matches!(extents, ExtentSource::Allocation | ExtentSource::Areas(_)) {
        // Still correct, only slower: every byte is read and zero blocks are found by looking.
        tracing::warn!(source = %source, "source has no base:allocation; reading every block to copy");
    } else if src0.meta_context_id(&map_context).is_none() {
        return Err(CopyError::MissingContext {
            addr: source.to_string(),
            context: map_context,
        });
    }
    if dst0.read_only() {
        return Err(CopyError::TargetReadOnly {
            addr: target.to_string(),
        });
    }
    let size = src0.size();
    if dst0.size() < size {
        return Err(CopyError::TargetTooSmall {
            source_addr: source.to_string(),
            source_size: size,
            target: target.to_string(),
            target_size: dst0.size(),
        });
    }
    if let ExtentSource::Areas(areas) = &extents {
        plan::check_areas(areas, size).map_err(|reason| CopyError::Options { reason })?;
    }
    counters.bytes_total.store(size, Ordering::Relaxed);
    let request_size = (opts.request_size)
        .min(src0.max_payload())
        .min(dst0.max_payload()) as u64;

    // More connections only where the server says they are coherent with each other.
    let n_src = if src0.can_multi_conn() {
        opts.connections
    } else {
        1
    } as usize;
    let n_dst = if dst0.can_multi_conn() {
        opts.connections
    } else {
        1
    } as usize;
    let mut sources = vec![src0.clone()];
    let mut targets = vec![dst0.clone()];
    let extra = async {
        let mut more_src = Vec::new();
        let mut more_dst = Vec::new();
        for _ in 1..n_src {
            more_src.push(
                NbdClient::connect(source, &ConnectOptions::default())
                    .await
                    .map_err(|cause| CopyError::SourceConnect {
                        addr: source.to_string(),
                        cause,
                    })?,
            );
        }
        for _ in 1..n_dst {
            more_dst.push(
                NbdClient::connect(target, &dst_opts)
                    .await
                    .map_err(|cause| CopyError::TargetConnect {
                        addr: target.to_string(),
                        cause,
                    })?,
            );
        }
        Ok::<_, CopyError>((more_src, more_dst))
    };
    let (more_src, more_dst) = tokio::select! {
        _ = cancel.cancelled() => return Err(CopyError::Cancelled),
        r = extra => r?,
    };
    sources.extend(more_src);
    targets.extend(more_dst);

    let (hasher, hashed) = spawn_hasher();
    let ctx = Arc::new(Ctx {
        hasher,
        sources,
        targets,
        counters: counters.clone(),
        chunk: opts.checksum_chunk_size,
        zero_buf: Bytes::from(vec![0u8; request_size as usize]),
        zero_hashes: Mutex::new(HashMap::new()),
        throttle: opts.throttle_bps.map(|bps| Throttle {
            started: Instant::now(),
            bps,
            reserved: AtomicU64::new(0),
        }),
    });
    let budget = Arc::new(Semaphore::new(
        opts.max_in_flight_bytes.max(request_size) as usize
    ));
    let mut tasks: JoinSet<Result<Vec<ChecksumRange>, CopyError>> = JoinSet::new();
    let mut ranges: Vec<ChecksumRange> = Vec::new();
    let mut next_conn = 0usize;

    let run = async {
        let mut coalescer = Coalescer::default();
        let mut segs = Vec::new();
        let mut offset = 0u64;
        while offset < size || segs.is_empty() {
            if offset < size {
                let window = (size - offset).min(STATUS_WINDOW);
                offset = plan_window(
                    &src0,
                    &extents,
                    &map_context,
                    alloc_ok,
                    opts,
                    offset,
                    window,
                    &mut segs,
                )
                .await?;
            }
            let last = offset >= size;
            let mut ready: Vec<Segment> =
                segs.drain(..).filter_map(|s| coalescer.push(s)).collect();
            if last {
                ready.extend(coalescer.finish());
            }
            for seg in ready {
                dispatch(
                    seg,
                    &ctx,
                    request_size,
                    &budget,
                    &mut tasks,
                    &mut ranges,
                    &mut next_conn,
                    &cancel,
                )
                .await?;
            }
            if last {
                break;
            }
        }
        while let Some(r) = tasks.join_next().await {
            ranges.extend(joined(r)?);
        }
        Ok::<(), CopyError>(())
    };
    let result = tokio::select! {
        r = run => r,
        _ = cancel.cancelled() => Err(CopyError::Cancelled),
    };
    if let Err(e) = result {
        // In-flight requests are dropped; the connections close with the clients.
        tasks.abort_all();
        return Err(e);
    }
    // One FLUSH covers every connection when the server advertises multi-conn (that is when
    // we opened several); otherwise there is just one connection.
    dst0.flush()
        .await
        .map_err(|cause| CopyError::Flush { cause })?;
    for c in ctx.sources.iter().chain(ctx.targets.iter()) {
        let _ = c.clone().disconnect().await;
    }
    // Every request task is done, so this was the last handle on the hashing channel: the
    // thread finishes what is queued and hands its ranges over.
    drop(ctx);
    let from_thread = tokio::task::spawn_blocking(move || hashed.join())
        .await
        .map_err(|e| CopyError::Task {
            reason: e.to_string(),
        })?
        .map_err(|_| CopyError::Task {
            reason: "the hashing thread panicked".into(),
        })?
        .map_err(|reason| CopyError::Task { reason })?;
    ranges.extend(from_thread);
    ranges.sort_by_key(|r| r.offset);
    let s = counters.snapshot();
    Ok(CopyOutcome {
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
        bytes_zeroed: s.bytes_zeroed,
        bytes_skipped: s.bytes_skipped,
        checksums: ChunkChecksums {
            chunk_size: opts.checksum_chunk_size,
            ranges,
        },
        elapsed: started.elapsed(),
    })
}

fn check_options(opts: &CopyOptions) -> Result<(), CopyError> {
    let bad = |reason: &str| {
        Err(CopyError::Options {
            reason: reason.to_string(),
        })
    };
    if opts.request_size < 4096 {
        return bad("request_size must be at least 4096 bytes");
    }
    if opts.connections == 0 || opts.connections > 64 {
        return bad("connections must be between 1 and 64");
    }
    if opts.checksum_chunk_size < 4096 {
        return bad("checksum_chunk_size must be at least 4096 bytes");
    }
    if opts.max_in_flight_bytes > 1 << 40 {
        return bad("max_in_flight_bytes above 1 TiB");
    }
    Ok(())
}

/// Turns the block status of `[offset, offset+window)` into segments; returns where the
/// description stopped (servers may describe less than asked).
#[allow(clippy::too_many_arguments)]
async fn plan_window(
    src: &NbdClient,
    extents: &ExtentSource,
    map_context: &str,
    alloc_ok: bool,
    opts: &CopyOptions,
    offset: u64,
    window: u64,
    out: &mut Vec<Segment>,
) -> Result<u64, CopyError> {
    let status = |ctx: &str, off: u64, len: u64| {
        let ctx = ctx.to_string();
        async move {
            src.block_status(&ctx, off, len as u32)
                .await
                .map_err(|cause| CopyError::BlockStatus {
                    offset: off,
                    length: len,
                    cause,
                })
        }
    };
    let end = offset + window;
    match extents {
        ExtentSource::Allocation if !alloc_ok => {
            out.push(Segment {
                offset,
                length: window,
                action: Action::Data,
            });
            Ok(end)
        }
        ExtentSource::Allocation => {
            let ext = status(map_context, offset, window).await?;
            Ok(plan::lay_extents(
                offset,
                end,
                &ext,
                |f| plan::allocation_action(f, opts.target_is_zero),
                out,
            ))
        }
        ExtentSource::DirtyBitmap(_) => {
            let ext = status(map_context, offset, window).await?;
            let mut dirty = Vec::new();
            let covered = plan::lay_extents(
                offset,
                end,
                &ext,
                |f| {
                    if plan::is_dirty(f) {
                        Action::Data
                    } else {
                        Action::Skip
                    }
                },
                &mut dirty,
            );
            for seg in dirty {
                if seg.action == Action::Skip || !alloc_ok {
                    out.push(seg);
                    continue;
                }
                // Inside a changed area, what reads as zeroes is written as zeroes without
                // reading it (an incremental target is never assumed zero: it has a backing).
                let mut at = seg.offset;
                while at < seg.end() {
                    let ext = status(BASE_ALLOCATION, at, seg.end() - at).await?;
                    at = plan::lay_extents(
                        at,
                        seg.end(),
                        &ext,
                        |f| plan::allocation_action(f, false),
                        out,
                    );
                }
            }
            Ok(covered)
        }
        ExtentSource::Areas(areas) => {
            let inside = plan::areas_in(areas, offset, end);
            let Some(&(first, _)) = inside.first() else {
                out.push(Segment {
                    offset,
                    length: window,
                    action: Action::Skip,
                });
                return Ok(end);
            };
            // Block status only from the first area on: a window without areas (most of an
            // incremental) costs no request at all.
            let from = first.max(offset);
            let mut inner = Vec::new();
            let covered = if alloc_ok {
                let ext = status(BASE_ALLOCATION, from, end - from).await?;
                plan::lay_extents(
                    from,
                    end,
                    &ext,
                    |f| plan::allocation_action(f, opts.target_is_zero),
                    &mut inner,
                )
            } else {
                inner.push(Segment {
                    offset: from,
                    length: end - from,
                    action: Action::Data,
                });
                end
            };
            if from > offset {
                out.push(Segment {
                    offset,
                    length: from - offset,
                    action: Action::Skip,
                });
            }
            plan::overlay_areas(&inside, &inner, out);
            Ok(covered)
        }
    }
}

/// Spawns the requests of one segment, each once the in-flight bound allows.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    seg: Segment,
    ctx: &Arc<Ctx>,
    request_size: u64,
    budget: &Arc<Semaphore>,
    tasks: &mut JoinSet<Result<Vec<ChecksumRange>, CopyError>>,
    ranges: &mut Vec<ChecksumRange>,
    next_conn: &mut usize,
    cancel: &CancellationToken,
) -> Result<(), CopyError> {
    let (max, cost_of): (u64, fn(u64) -> u64) = match seg.action {
        Action::Skip => {
            ctx.counters
                .bytes_skipped
                .fetch_add(seg.length, Ordering::Relaxed);
            return Ok(());
        }
        Action::Data => (request_size, |len| len),
        Action::Zero => (MAX_ZERO_REQUEST, |len| len.min(ZERO_REQUEST_COST)),
    };
    // Zero requests may span many checksum cells: cut them on the request limit only.
    let grid = if seg.action == Action::Data {
        ctx.chunk
    } else {
        u64::MAX
    };
    for (offset, length) in plan::pieces(seg.offset, seg.length, max, grid) {
        // A data segment's checksum ranges are its intersections with the grid cells; each is
        // announced before its first request, so the hashing thread knows what to assemble.
        if seg.action == Action::Data && (offset == seg.offset || offset % grid == 0) {
            let cell_end = (offset / grid + 1).saturating_mul(grid).min(seg.end());
            let _ = ctx.hasher.send(HashMsg::Range {
                offset,
                length: cell_end - offset,
            });
        }
        if cancel.is_cancelled() {
            return Err(CopyError::Cancelled);
        }
        // Collect finished requests as we go, so that an error stops the copy early.
        while let Some(r) = tasks.try_join_next() {
            ranges.extend(joined(r)?);
        }
        if seg.action == Action::Data
            && let Some(t) = &ctx.throttle
        {
            tokio::select! {
                _ = tokio::time::sleep_until(t.due(length)) => {}
                _ = cancel.cancelled() => return Err(CopyError::Cancelled),
            }
        }
        let permit = Arc::new(
            budget
                .clone()
                .acquire_many_owned(cost_of(length).min(u32::MAX as u64) as u32)
                .await
                .map_err(|_| CopyError::Cancelled)?,
        );
        let ctx = ctx.clone();
        let conn = *next_conn;
        *next_conn = next_conn.wrapping_add(1);
        let action = seg.action;
        tasks.spawn(async move {
            let r = match action {
                Action::Data => copy_request(&ctx, conn, offset, length, &permit).await,
                _ => zero_request(&ctx, conn, offset, length).await,
            };
            drop(permit);
            r
        });
    }
    Ok(())
}

fn joined(
    r: Result<Result<Vec<ChecksumRange>, CopyError>, tokio::task::JoinError>,
) -> Result<Vec<ChecksumRange>, CopyError> {
    r.map_err(|e| CopyError::Task {
        reason: e.to_string(),
    })?
}

/// One data request: read, split into zero and data runs (every byte checked), write both
/// kinds, hash what the source held.
async fn copy_request(
    ctx: &Ctx,
    conn: usize,
    offset: u64,
    length: u64,
    permit: &Arc<OwnedSemaphorePermit>,
) -> Result<Vec<ChecksumRange>, CopyError> {
    let src = &ctx.sources[conn % ctx.sources.len()];
    let data = src
        .read(offset, length as u32)
        .await
        .map_err(|cause| CopyError::Read {
            offset,
            length,
            cause,
        })?;
    ctx.counters.bytes_read.fetch_add(length, Ordering::Relaxed);
    let runs = plan::zero_runs(&data, ZERO_BLOCK);
    let dst = &ctx.targets[conn % ctx.targets.len()];
    let writes = runs.iter().map(|&(s, e, zero)| {
        let data = data.clone();
        async move {
            let (off, len) = (offset + s as u64, (e - s) as u64);
            if zero {
                ctx.write_zeroes(conn, off, len).await
            } else {
                dst.write(off, data.slice(s..e))
                    .await
                    .map_err(|cause| CopyError::Write {
                        offset: off,
                        length: len,
                        cause,
                    })?;
                ctx.counters.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        }
    });
    // Hashed on the hashing thread while the writes are on the wire; the message holds the
    // in-flight permit, so hashing that falls behind slows the reads down.
    let _ = ctx.hasher.send(HashMsg::Piece {
        offset,
        data: data.clone(),
        _permit: permit.clone(),
    });
    futures_util::future::try_join_all(writes).await?;
    Ok(Vec::new())
}

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

/// A thread that hashes copied data off the async workers (a hash of a few MiB would hold up
/// the reader and writer tasks). Pieces arrive out of order; each announced range is hashed
/// front to back as its pieces come in, and pieces ahead of the one being waited for are kept
/// (they hold their in-flight permits, so this is bounded). Since requests are issued in offset
/// order, the piece waited for is always already in flight. Returns the ranges when the
/// channel closes, or what was left incomplete.
fn spawn_hasher() -> (
    mpsc::UnboundedSender<HashMsg>,
    std::thread::JoinHandle<Result<Vec<ChecksumRange>, String>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<HashMsg>();
    let handle = std::thread::spawn(move || {
        let mut done = Vec::new();
        let mut announced: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut waiting: std::collections::BTreeMap<u64, HashMsg> = Default::default();
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
    });
    (tx, handle)
}

/// One WRITE_ZEROES of a hole; its checksum ranges are listed per checksum cell.
async fn zero_request(
    ctx: &Ctx,
    conn: usize,
    offset: u64,
    length: u64,
) -> Result<Vec<ChecksumRange>, CopyError> {
    ctx.write_zeroes(conn, offset, length).await?;
    Ok(plan::pieces(offset, length, u64::MAX, ctx.chunk)
        .map(|(offset, length)| ChecksumRange {
            offset,
            length,
            blake3: ctx.zero_hash(length),
        })
        .collect())
}
