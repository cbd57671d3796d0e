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
//! Whole-disk grid ([`GridChecksums`], when [`CopyOptions::grid_cell`] is set): one BLAKE3
//! per cell of the disk as the snapshot holds it, built on the hashing thread from the same
//! pieces ([`grid`]). Full: every cell; cells of holes and zero extents only are zero runs
//! (not hashed), cells with data are hashed with their zero gaps. Incremental: cells entirely
//! unchanged are left out (the parent's hold); the unchanged parts of cells changed elsewhere
//! are READ (not written) so that those cells are hashed whole
//! ([`DiskCounters::bytes_read_for_grid`]). A Skip means zeroes for an allocation copy (and
//! areas on a zero target: a vSphere full), unchanged for a dirty bitmap (and areas on a
//! non-zero target: a vSphere incremental).
//!
//! Stalls: every NBD request has a deadline ([`CopyOptions::request_timeout`]), and a
//! watchdog fails the copy once no byte moved for [`CopyOptions::stall_after`], naming the
//! side its outstanding requests wait on (the source export, the target export), so a peer
//! that stops answering without going away never holds a snapshot, ports and exports forever.
//!
//! [`copy_disk`] runs these as named steps: `open` (1), `connect_more`, `run_plan` (2, 3),
//! `flush` (4), `finish` (the outcome with the checksums).
//!
//! Submodules: [`plan`] (extent map, request cutting, zero detection), `status` (block status
//! window by window into segments), `pipeline` (requests as tasks under the in-flight bound),
//! `checksums` (the hashing thread, zero hashes), [`grid`] (the whole-disk grid and the reads
//! it needs), [`progress`] (counters and rates), [`cli`] (`sendense-node copy`), [`relay`] (a
//! delaying TCP relay for WAN benchmarks, hidden `sendense-node relay`).

mod checksums;
pub mod cli;
pub mod grid;
mod pipeline;
pub mod plan;
pub mod progress;
pub mod relay;
mod status;

pub use progress::{CounterSnapshot, DiskCounters};

use bytes::Bytes;
use grid::SkipMeans;
use pipeline::{Ctx, Pipeline, Throttle};
use plan::{Coalescer, Segment};
use sendense_shared::api::{ChecksumRange, ChunkChecksums, GridChecksums};
use sendense_shared::nbd::{
    BASE_ALLOCATION, ConnectOptions, NbdAddr, NbdClient, NbdError, dirty_bitmap_context,
};
use status::Planner;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use thiserror::Error;
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
    /// What a restore sets [`CopyOptions::connections`] to ([`RESTORE_CONNECTIONS_ENV`]): its
    /// source is the hub's read-only export of a whole chain, served with `cache=none`, whose
    /// reads wait on the disk, so more requests in flight pay where a backup's do not.
    pub restore_connections: u32,
    /// What a backup sets [`CopyOptions::connections`] to when its target is reached through
    /// the node's ssh tunnel ([`TUNNEL_CONNECTIONS_ENV`]): every NBD connection is its own ssh
    /// channel, and OpenSSH gives a channel a 2 MiB window, so one connection moves at most
    /// 2 MiB per round trip whatever the link can carry.
    pub tunnel_connections: u32,
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
    /// Cell size of the whole-disk checksum grid to build (`None`: none, as an older hub
    /// expects).
    pub grid_cell: Option<u64>,
    /// TLS material for the source's connections (a restore from the hub's export).
    pub source_tls: Option<sendense_shared::api::NbdTls>,
    /// TLS material for the target's connections (a backup into the hub's export).
    pub target_tls: Option<sendense_shared::api::NbdTls>,
    /// The copy fails, naming the side it waits on, when no byte moved for this long
    /// ([`STALL_ENV`]).
    pub stall_after: Duration,
    /// Deadline of every NBD request (`None`: none; the watchdog still ends a stalled copy).
    pub request_timeout: Option<Duration>,
}

/// Environment variable read by the node daemon: seconds without a byte moving after which a
/// disk's copy fails as stalled [default: 60].
pub const STALL_ENV: &str = "SENDENSE_COPY_STALL_SECS";

/// No byte moved for this long: the copy is stalled.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);
/// Deadline of one NBD request: far above what a healthy 256 KiB request takes even on a slow
/// WAN, below what an operator would wait.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Environment variable read by the node daemon: bytes per second each disk's copy may read
/// (e.g. `SENDENSE_COPY_THROTTLE_BPS=8388608` for 8 MiB/s). Unset or 0: no limit.
pub const THROTTLE_ENV: &str = "SENDENSE_COPY_THROTTLE_BPS";

/// Environment variable read by the node daemon: NBD connections per side of each disk's copy
/// (used where the server advertises multi-conn) [default: [`CopyOptions::default`]].
pub const CONNECTIONS_ENV: &str = "SENDENSE_COPY_CONNECTIONS";
/// Environment variable read by the node daemon: NBD connections per side of each restore's
/// copy [default: [`CopyOptions::default`]].
pub const RESTORE_CONNECTIONS_ENV: &str = "SENDENSE_RESTORE_CONNECTIONS";
/// Environment variable read by the node daemon: NBD connections per side of each backup copy
/// through the tunnel [default: [`CopyOptions::default`]].
pub const TUNNEL_CONNECTIONS_ENV: &str = "SENDENSE_TUNNEL_CONNECTIONS";
/// Environment variable read by the node daemon: bytes in flight per disk (k, M, G suffixes).
pub const IN_FLIGHT_ENV: &str = "SENDENSE_COPY_IN_FLIGHT";
/// Environment variable read by the node daemon: largest READ/WRITE request (k, M, G suffixes).
pub const REQUEST_SIZE_ENV: &str = "SENDENSE_COPY_REQUEST_SIZE";

impl CopyOptions {
    /// The defaults with [`THROTTLE_ENV`], [`STALL_ENV`], [`CONNECTIONS_ENV`],
    /// [`IN_FLIGHT_ENV`] and [`REQUEST_SIZE_ENV`] applied (unset, empty, 0 or unparsable:
    /// the default).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`CopyOptions::from_env`] over any source of variables (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let size = |name: &str| {
            var(name)
                .and_then(|v| cli::parse_size(&v).ok())
                .filter(|&v| v > 0)
        };
        let mut opts = Self::from_vars_base(&var);
        if let Some(c) = size(CONNECTIONS_ENV).and_then(|c| u32::try_from(c).ok()) {
            opts.connections = c;
        }
        if let Some(c) = size(RESTORE_CONNECTIONS_ENV).and_then(|c| u32::try_from(c).ok()) {
            opts.restore_connections = c;
        }
        if let Some(c) = size(TUNNEL_CONNECTIONS_ENV).and_then(|c| u32::try_from(c).ok()) {
            opts.tunnel_connections = c;
        }
        if let Some(f) = size(IN_FLIGHT_ENV) {
            opts.max_in_flight_bytes = f;
        }
        if let Some(r) = size(REQUEST_SIZE_ENV).and_then(|r| u32::try_from(r).ok()) {
            opts.request_size = r;
        }
        opts
    }

    fn from_vars_base(var: &impl Fn(&str) -> Option<String>) -> Self {
        let throttle_bps = var(THROTTLE_ENV)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0);
        let stall_after = var(STALL_ENV)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0)
            .map_or(DEFAULT_STALL_AFTER, Duration::from_secs);
        CopyOptions {
            throttle_bps,
            stall_after,
            // A request never waits longer than the watchdog would.
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT.max(stall_after)),
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
    ///
    /// Across a WAN the bound is `max_in_flight_bytes` per round trip, not the connection
    /// count: requests are pipelined on each connection (qemu-nbd takes the next one from its
    /// socket as soon as one of its 16 slots frees), so 32 MiB in flight allow about 1.6 GB/s
    /// at 20 ms. `bench/wan.sh` (own delaying relay, +10 ms each way, load about 20): 1
    /// connection 241-287 MB/s median over four series, 4 connections 250-283, 8 195-232, the
    /// relay without delay 379, direct 407-431: more connections do not help here. Links with
    /// a longer round trip need [`IN_FLIGHT_ENV`] of at least rate × round trip.
    ///
    /// Restores take 4 connections: `bench/restore.sh 5` (a 3-point chain read through the
    /// hub's `cache=none` read-only export, quiet 2-core machine) gave a median nbdcopy/sendense
    /// ratio of 0.67 (0.57-0.87) with 1 and 0.83 (0.65-0.95) with 4 (0.87, 0.71-0.97, in a second
    /// run; the rest is the grid's hashing), while the same 4 on
    /// `bench/copy.sh`'s backup shape lost (scattered 0.97 with 1, 0.88 with 4).
    ///
    /// Backups through the tunnel take 4 connections: `DELAY_MS=10 bench/tunnel-disks.sh 1024
    /// 5` (20 ms round trip between the node's ssh and the hub's sshd) moved 77.9 MiB/s per disk
    /// with 1 (the 2 MiB channel window per round trip) and 246.3 with 4; on loopback
    /// (`bench/tunnel-disks.sh 512 5`) 1 disk went from 211 to 271 MiB/s.
    fn default() -> Self {
        CopyOptions {
            request_size: 256 * 1024,
            connections: 1,
            restore_connections: 4,
            tunnel_connections: 4,
            max_in_flight_bytes: 32 * 1024 * 1024,
            checksum_chunk_size: 4 * 1024 * 1024,
            target_is_zero: false,
            throttle_bps: None,
            grid_cell: None,
            source_tls: None,
            target_tls: None,
            stall_after: DEFAULT_STALL_AFTER,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
        }
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
    /// The whole-disk grid, when [`CopyOptions::grid_cell`] asked for one.
    pub grid: Option<GridChecksums>,
    /// Bytes read for the grid only (see [`DiskCounters::bytes_read_for_grid`]).
    pub bytes_read_for_grid: u64,
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
    #[error(
        "stalled: no byte moved for {idle:.0?}, waiting on {side} ({source_waiting} source and {target_waiting} target requests outstanding)"
    )]
    Stalled {
        side: String,
        idle: Duration,
        source_waiting: u64,
        target_waiting: u64,
    },
    #[error("copy cancelled")]
    Cancelled,
    #[error("copy task failed: {reason}")]
    Task { reason: String },
}

/// Block status is asked for windows of this size.
const STATUS_WINDOW: u64 = 1 << 31;

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
    let ends = open(source, target, &extents, opts, &cancel).await?;
    counters.bytes_total.store(ends.size, Ordering::Relaxed);
    let (sources, targets) = connect_more(&ends, source, target, opts, &cancel).await?;
    tracing::info!(
        source = %source,
        target = %target,
        source_connections = sources.len(),
        target_connections = targets.len(),
        "copy connected"
    );
    let (checksums, hash_thread) = checksums::start(opts.grid_cell.map(|c| (c, ends.size)));
    let ctx = Arc::new(Ctx {
        checksums,
        skip_means: skip_means(&extents, opts),
        sources,
        targets,
        counters: counters.clone(),
        chunk: opts.checksum_chunk_size,
        zero_buf: Bytes::from(vec![0u8; ends.request_size as usize]),
        throttle: opts.throttle_bps.map(Throttle::new),
    });
    let mut pipeline = Pipeline::new(ctx.clone(), ends.request_size, opts.max_in_flight_bytes);
    let result = tokio::select! {
        r = run_plan(&ends, &extents, opts, &mut pipeline, &counters, &cancel) => r,
        _ = cancel.cancelled() => Err(CopyError::Cancelled),
        e = watchdog(&counters, opts.stall_after, source, target) => Err(e),
    };
    if let Err(e) = result {
        pipeline.abort();
        return Err(e);
    }
    tokio::select! {
        r = flush(&ends.dst, &ctx) => r?,
        e = watchdog(&counters, opts.stall_after, source, target) => return Err(e),
    }
    let mut ranges = pipeline.into_ranges();
    // Every request task is done, so this was the last handle on the hashing channel: the
    // thread finishes what is queued and hands its ranges over.
    drop(ctx);
    let (data_ranges, grid) = hash_thread.finish().await?;
    ranges.extend(data_ranges);
    Ok(finish(&counters, opts, ranges, grid, started))
}

/// What a Skip of the plan is to the grid: zeroes on a fresh target of an allocation or area
/// copy (a full), the parent's bytes otherwise (an incremental).
fn skip_means(extents: &ExtentSource, opts: &CopyOptions) -> SkipMeans {
    match extents {
        ExtentSource::Allocation => SkipMeans::Zeroes,
        ExtentSource::Areas(_) if opts.target_is_zero => SkipMeans::Zeroes,
        ExtentSource::Areas(_) | ExtentSource::DirtyBitmap(_) => SkipMeans::Unchanged,
    }
}

/// Both ends of a copy, connected and checked.
struct Ends {
    /// The first connection to the source (the one with the meta contexts).
    src: NbdClient,
    /// The first connection to the target.
    dst: NbdClient,
    /// Size of the source disk.
    size: u64,
    /// The source answers `base:allocation`.
    alloc_ok: bool,
    /// The meta context that decides what to copy.
    map_context: String,
    /// Largest request both sides take, at most `request_size`.
    request_size: u64,
}

/// Step 1: connects to both (the source with the contexts `extents` needs) and checks that the
/// source offers them, that the target is writable and large enough, and that areas fit.
async fn open(
    source: &NbdAddr,
    target: &NbdAddr,
    extents: &ExtentSource,
    opts: &CopyOptions,
    cancel: &CancellationToken,
) -> Result<Ends, CopyError> {
    let (src, dst) = connect_pair(source, target, extents, opts, cancel).await?;
    // Which context drives the plan, and whether zeroes can be found without reading.
    let alloc_ok = src.meta_context_id(BASE_ALLOCATION).is_some();
    let map_context = match extents {
        ExtentSource::Allocation | ExtentSource::Areas(_) => BASE_ALLOCATION.to_string(),
        ExtentSource::DirtyBitmap(name) => dirty_bitmap_context(name),
    };
    if !alloc_ok && matches!(extents, ExtentSource::Allocation | ExtentSource::Areas(_)) {
        // Still correct, only slower: every byte is read and zero blocks are found by looking.
        tracing::warn!(source = %source, "source has no base:allocation; reading every block to copy");
    } else if src.meta_context_id(&map_context).is_none() {
        return Err(CopyError::MissingContext {
            addr: source.to_string(),
            context: map_context,
        });
    }
    if dst.read_only() {
        return Err(CopyError::TargetReadOnly {
            addr: target.to_string(),
        });
    }
    let size = src.size();
    if dst.size() < size {
        return Err(CopyError::TargetTooSmall {
            source_addr: source.to_string(),
            source_size: size,
            target: target.to_string(),
            target_size: dst.size(),
        });
    }
    if let ExtentSource::Areas(areas) = extents {
        plan::check_areas(areas, size).map_err(|reason| CopyError::Options { reason })?;
    }
    let request_size = (opts.request_size)
        .min(src.max_payload())
        .min(dst.max_payload()) as u64;
    Ok(Ends {
        src,
        dst,
        size,
        alloc_ok,
        map_context,
        request_size,
    })
}

/// The first connection to each side, opened together (or given up on cancel).
async fn connect_pair(
    source: &NbdAddr,
    target: &NbdAddr,
    extents: &ExtentSource,
    opts: &CopyOptions,
    cancel: &CancellationToken,
) -> Result<(NbdClient, NbdClient), CopyError> {
    let contexts = match extents {
        ExtentSource::Allocation => vec![BASE_ALLOCATION.to_string()],
        ExtentSource::DirtyBitmap(name) => {
            vec![dirty_bitmap_context(name), BASE_ALLOCATION.to_string()]
        }
        ExtentSource::Areas(_) => vec![BASE_ALLOCATION.to_string()],
    };
    let src_opts = ConnectOptions {
        meta_contexts: contexts,
        tls: opts.source_tls.clone(),
        request_timeout: opts.request_timeout,
        ..Default::default()
    };
    let dst_opts = ConnectOptions {
        tls: opts.target_tls.clone(),
        request_timeout: opts.request_timeout,
        ..Default::default()
    };
    let (src, dst) = tokio::select! {
        _ = cancel.cancelled() => return Err(CopyError::Cancelled),
        r = async {
            tokio::join!(
                NbdClient::connect(source, &src_opts),
                NbdClient::connect(target, &dst_opts)
            )
        } => r,
    };
    let src = src.map_err(|cause| CopyError::SourceConnect {
        addr: source.to_string(),
        cause,
    })?;
    let dst = dst.map_err(|cause| CopyError::TargetConnect {
        addr: target.to_string(),
        cause,
    })?;
    Ok((src, dst))
}

/// All connections to each side: more than the first only where the server says they are
/// coherent with each other (multi-conn).
async fn connect_more(
    ends: &Ends,
    source: &NbdAddr,
    target: &NbdAddr,
    opts: &CopyOptions,
    cancel: &CancellationToken,
) -> Result<(Vec<NbdClient>, Vec<NbdClient>), CopyError> {
    let count = |c: &NbdClient| {
        if c.can_multi_conn() {
            opts.connections as usize
        } else {
            1
        }
    };
    let (n_src, n_dst) = (count(&ends.src), count(&ends.dst));
    let mut sources = vec![ends.src.clone()];
    let mut targets = vec![ends.dst.clone()];
    let src_opts = ConnectOptions {
        tls: opts.source_tls.clone(),
        request_timeout: opts.request_timeout,
        ..Default::default()
    };
    let dst_opts = ConnectOptions {
        tls: opts.target_tls.clone(),
        request_timeout: opts.request_timeout,
        ..Default::default()
    };
    let extra = async {
        let mut more_src = Vec::new();
        let mut more_dst = Vec::new();
        for _ in 1..n_src {
            more_src.push(
                NbdClient::connect(source, &src_opts)
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
    Ok((sources, targets))
}

/// Steps 2 and 3: walks the source's block status window by window, coalesces the segments,
/// and hands them to the pipeline as they are ready; then waits for every request.
async fn run_plan(
    ends: &Ends,
    extents: &ExtentSource,
    opts: &CopyOptions,
    pipeline: &mut Pipeline,
    counters: &DiskCounters,
    cancel: &CancellationToken,
) -> Result<(), CopyError> {
    let planner = Planner {
        src: &ends.src,
        extents,
        map_context: &ends.map_context,
        alloc_ok: ends.alloc_ok,
        target_is_zero: opts.target_is_zero,
        counters,
    };
    let size = ends.size;
    // An incremental's grid needs the unchanged edges of changed cells read.
    let grid_reads = opts
        .grid_cell
        .filter(|_| pipeline.skip_means() == SkipMeans::Unchanged);
    let mut coalescer = Coalescer::default();
    let mut segs = Vec::new();
    let mut offset = 0u64;
    while offset < size || segs.is_empty() {
        if offset < size {
            let window = (size - offset).min(STATUS_WINDOW);
            offset = planner.window(offset, window, &mut segs).await?;
        }
        let last = offset >= size;
        let mut ready: Vec<Segment> = segs.drain(..).filter_map(|s| coalescer.push(s)).collect();
        if last {
            ready.extend(coalescer.finish());
        }
        for seg in ready {
            match grid_reads {
                Some(cell) => {
                    for s in grid::read_for_grid(seg, cell, size) {
                        pipeline.dispatch(s, cancel).await?;
                    }
                }
                None => pipeline.dispatch(seg, cancel).await?,
            }
        }
        if last {
            break;
        }
    }
    pipeline.drain().await
}

/// Step 4: the final FLUSH, then the connections are closed.
/// Answers once no byte of the copy moved for `stall_after` (never, while bytes move): the
/// side that holds the outstanding requests is the one named. A server that stopped answering
/// would otherwise hold the snapshot, the ports and the hub's qemu-nbd forever.
async fn watchdog(
    counters: &DiskCounters,
    stall_after: Duration,
    source: &NbdAddr,
    target: &NbdAddr,
) -> CopyError {
    let tick = (stall_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut last = counters.moved();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = counters.moved();
        if now != last {
            last = now;
            since = Instant::now();
            continue;
        }
        let idle = since.elapsed();
        if idle < stall_after {
            continue;
        }
        let src = counters.source_waiting.load(Ordering::Relaxed);
        let dst = counters.target_waiting.load(Ordering::Relaxed);
        let side = match (src > 0, dst > 0) {
            (true, false) => format!("the source export {source}"),
            (false, true) => format!("the target export {target}"),
            (true, true) => {
                format!("both the source export {source} and the target export {target}")
            }
            (false, false) => "the copy itself (no request outstanding)".to_string(),
        };
        return CopyError::Stalled {
            side,
            idle,
            source_waiting: src,
            target_waiting: dst,
        };
    }
}

async fn flush(dst: &NbdClient, ctx: &Ctx) -> Result<(), CopyError> {
    // One FLUSH covers every connection when the server advertises multi-conn (that is when
    // we opened several); otherwise there is just one connection.
    {
        let _waiting = ctx.counters.waiting_on(progress::Side::Target);
        dst.flush()
            .await
            .map_err(|cause| CopyError::Flush { cause })?;
    }
    for c in ctx.sources.iter().chain(ctx.targets.iter()) {
        let _ = c.clone().disconnect().await;
    }
    Ok(())
}

/// The outcome: the counters' final reading and every checksum range in offset order.
fn finish(
    counters: &DiskCounters,
    opts: &CopyOptions,
    mut ranges: Vec<ChecksumRange>,
    grid: Option<GridChecksums>,
    started: Instant,
) -> CopyOutcome {
    ranges.sort_by_key(|r| r.offset);
    let s = counters.snapshot();
    CopyOutcome {
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
        bytes_zeroed: s.bytes_zeroed,
        bytes_skipped: s.bytes_skipped,
        checksums: ChunkChecksums {
            chunk_size: opts.checksum_chunk_size,
            ranges,
        },
        grid,
        bytes_read_for_grid: s.bytes_read_for_grid,
        elapsed: started.elapsed(),
    }
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
    if let Some(cell) = opts.grid_cell
        && !(4096..=1 << 30).contains(&cell)
    {
        return bad("the checksum grid's cell must be between 4 KiB and 1 GiB");
    }
    if opts.max_in_flight_bytes > 1 << 40 {
        return bad("max_in_flight_bytes above 1 TiB");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn copy_settings_come_from_the_environment() {
        let vars: HashMap<&str, &str> = [
            (CONNECTIONS_ENV, "4"),
            (RESTORE_CONNECTIONS_ENV, "8"),
            (TUNNEL_CONNECTIONS_ENV, "6"),
            (IN_FLIGHT_ENV, "64M"),
            (REQUEST_SIZE_ENV, "1M"),
            (STALL_ENV, "30"),
        ]
        .into();
        let o = CopyOptions::from_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(o.connections, 4);
        assert_eq!(o.restore_connections, 8);
        assert_eq!(o.tunnel_connections, 6);
        assert_eq!(o.max_in_flight_bytes, 64 << 20);
        assert_eq!(o.request_size, 1 << 20);
        assert_eq!(o.stall_after, Duration::from_secs(30));
        // Unset, 0 or nonsense: the defaults.
        let bad: HashMap<&str, &str> = [(CONNECTIONS_ENV, "0"), (IN_FLIGHT_ENV, "lots")].into();
        let o = CopyOptions::from_vars(|k| bad.get(k).map(|v| v.to_string()));
        let d = CopyOptions::default();
        assert_eq!(o.connections, d.connections);
        assert_eq!(o.restore_connections, d.restore_connections);
        assert_eq!(o.tunnel_connections, d.tunnel_connections);
        assert_eq!(o.max_in_flight_bytes, d.max_in_flight_bytes);
        assert_eq!(o.request_size, d.request_size);
        assert_eq!(o.stall_after, DEFAULT_STALL_AFTER);
    }
}
