//! The request pipeline: each segment of the plan becomes requests (READ + WRITE / WRITE_ZEROES
//! of at most `request_size`, never across a checksum cell; for the whole-disk grid also READs
//! that are only hashed), each a task, run concurrently under the in-flight bound and spread
//! over the connections. Cancellation is checked before every request.

use super::checksums::Checksums;
use super::grid::SkipMeans;
use super::plan::{self, Action, Segment};
use super::progress::Side;
use super::{CopyError, DiskCounters};
use bytes::Bytes;
use sendense_shared::api::ChecksumRange;
use sendense_shared::nbd::NbdClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Runs of zeroes inside data are found at this granularity (one WRITE_ZEROES per run).
const ZERO_BLOCK: usize = 64 * 1024;
/// Largest single WRITE_ZEROES of a hole (no payload, so it can be large).
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// What one WRITE_ZEROES request counts against the in-flight bound (it carries no data, but
/// the number of them outstanding should stay bounded).
const ZERO_REQUEST_COST: u64 = 256 * 1024;

/// Paces data requests to a rate: each request reserves its bytes and waits until the time at
/// which the rate allows them.
pub(super) struct Throttle {
    started: Instant,
    bps: u64,
    reserved: AtomicU64,
}

impl Throttle {
    pub(super) fn new(bps: u64) -> Self {
        Throttle {
            started: Instant::now(),
            bps,
            reserved: AtomicU64::new(0),
        }
    }

    fn due(&self, bytes: u64) -> tokio::time::Instant {
        let before = self.reserved.fetch_add(bytes, Ordering::Relaxed);
        let at = Duration::from_secs_f64(before as f64 / self.bps as f64);
        tokio::time::Instant::from_std(self.started + at)
    }
}

/// Everything a request task needs.
pub(super) struct Ctx {
    pub(super) sources: Vec<NbdClient>,
    pub(super) targets: Vec<NbdClient>,
    pub(super) counters: Arc<DiskCounters>,
    /// Checksum grid.
    pub(super) chunk: u64,
    /// Falls back to writing this buffer where the target has no WRITE_ZEROES.
    pub(super) zero_buf: Bytes,
    pub(super) checksums: Checksums,
    /// What a Skip is to the whole-disk grid (when one is built).
    pub(super) skip_means: SkipMeans,
    pub(super) throttle: Option<Throttle>,
}

impl Ctx {
    async fn write_zeroes(&self, conn: usize, offset: u64, length: u64) -> Result<(), CopyError> {
        let t = &self.targets[conn % self.targets.len()];
        let err = |cause| CopyError::Zero {
            offset,
            length,
            cause,
        };
        let _waiting = self.counters.waiting_on(Side::Target);
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

/// The requests in flight and the checksum ranges of those finished.
pub(super) struct Pipeline {
    ctx: Arc<Ctx>,
    request_size: u64,
    /// The in-flight bound, in bytes.
    budget: Arc<Semaphore>,
    tasks: JoinSet<Result<Vec<ChecksumRange>, CopyError>>,
    ranges: Vec<ChecksumRange>,
    next_conn: usize,
}

impl Pipeline {
    pub(super) fn new(ctx: Arc<Ctx>, request_size: u64, max_in_flight_bytes: u64) -> Self {
        Pipeline {
            ctx,
            request_size,
            budget: Arc::new(Semaphore::new(
                max_in_flight_bytes.max(request_size) as usize
            )),
            tasks: JoinSet::new(),
            ranges: Vec::new(),
            next_conn: 0,
        }
    }

    /// Spawns the requests of one segment, each once the in-flight bound allows.
    pub(super) async fn dispatch(
        &mut self,
        seg: Segment,
        cancel: &CancellationToken,
    ) -> Result<(), CopyError> {
        let checksums = &self.ctx.checksums;
        let (max, cost_of): (u64, fn(u64) -> u64) = match seg.action {
            Action::Skip => {
                self.ctx
                    .counters
                    .bytes_skipped
                    .fetch_add(seg.length, Ordering::Relaxed);
                match self.ctx.skip_means {
                    SkipMeans::Zeroes => checksums.grid_zero(seg.offset, seg.length),
                    SkipMeans::Unchanged => checksums.grid_unchanged(seg.offset, seg.length),
                }
                return Ok(());
            }
            Action::Data => (self.request_size, |len| len),
            Action::Zero => {
                checksums.grid_zero(seg.offset, seg.length);
                (MAX_ZERO_REQUEST, |len| len.min(ZERO_REQUEST_COST))
            }
            Action::Read => {
                // Not written: the target holds these bytes already (progress counts them as
                // skipped); read inside one grid cell, for its checksum only.
                self.ctx
                    .counters
                    .bytes_skipped
                    .fetch_add(seg.length, Ordering::Relaxed);
                checksums.grid_read(seg.offset, seg.length);
                (self.request_size, |len| len)
            }
        };
        // Zero requests may span many checksum cells: cut them on the request limit only.
        let grid = if seg.action == Action::Data {
            self.ctx.chunk
        } else {
            u64::MAX
        };
        for (offset, length) in plan::pieces(seg.offset, seg.length, max, grid) {
            // A data segment's checksum ranges are its intersections with the grid cells; each
            // is announced before its first request, so the hashing thread knows what to
            // assemble.
            if seg.action == Action::Data && (offset == seg.offset || offset % grid == 0) {
                let cell_end = (offset / grid + 1).saturating_mul(grid).min(seg.end());
                self.ctx.checksums.range(offset, cell_end - offset);
            }
            if cancel.is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            // Collect finished requests as we go, so that an error stops the copy early.
            while let Some(r) = self.tasks.try_join_next() {
                self.ranges.extend(joined(r)?);
            }
            if matches!(seg.action, Action::Data | Action::Read)
                && let Some(t) = &self.ctx.throttle
            {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.due(length)) => {}
                    _ = cancel.cancelled() => return Err(CopyError::Cancelled),
                }
            }
            let permit = Arc::new(
                self.budget
                    .clone()
                    .acquire_many_owned(cost_of(length).min(u32::MAX as u64) as u32)
                    .await
                    .map_err(|_| CopyError::Cancelled)?,
            );
            self.spawn(seg.action, offset, length, permit);
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        action: Action,
        offset: u64,
        length: u64,
        permit: Arc<OwnedSemaphorePermit>,
    ) {
        let ctx = self.ctx.clone();
        let conn = self.next_conn;
        self.next_conn = self.next_conn.wrapping_add(1);
        self.tasks.spawn(async move {
            let r = match action {
                Action::Data => copy_request(&ctx, conn, offset, length, &permit).await,
                Action::Read => grid_read_request(&ctx, conn, offset, length, &permit).await,
                _ => zero_request(&ctx, conn, offset, length).await,
            };
            drop(permit);
            r
        });
    }

    pub(super) fn skip_means(&self) -> SkipMeans {
        self.ctx.skip_means
    }

    /// Waits for every request; the first error stops it.
    pub(super) async fn drain(&mut self) -> Result<(), CopyError> {
        while let Some(r) = self.tasks.join_next().await {
            self.ranges.extend(joined(r)?);
        }
        Ok(())
    }

    /// Drops the requests in flight (a failed or cancelled copy); the connections close with
    /// the clients.
    pub(super) fn abort(&mut self) {
        self.tasks.abort_all();
    }

    /// The checksum ranges of zeroed holes (data ranges come from the hashing thread).
    pub(super) fn into_ranges(self) -> Vec<ChecksumRange> {
        self.ranges
    }
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
    let data = {
        let _waiting = ctx.counters.waiting_on(Side::Source);
        src.read(offset, length as u32)
            .await
            .map_err(|cause| CopyError::Read {
                offset,
                length,
                cause,
            })?
    };
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
                let _waiting = ctx.counters.waiting_on(Side::Target);
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
    // Hashed on the hashing thread while the writes are on the wire.
    ctx.checksums.piece(offset, data.clone(), permit.clone());
    futures_util::future::try_join_all(writes).await?;
    Ok(Vec::new())
}

/// One READ for the whole-disk grid only (an unchanged part of a cell an incremental changed):
/// hashed, not written.
async fn grid_read_request(
    ctx: &Ctx,
    conn: usize,
    offset: u64,
    length: u64,
    permit: &Arc<OwnedSemaphorePermit>,
) -> Result<Vec<ChecksumRange>, CopyError> {
    let src = &ctx.sources[conn % ctx.sources.len()];
    let data = {
        let _waiting = ctx.counters.waiting_on(Side::Source);
        src.read(offset, length as u32)
            .await
            .map_err(|cause| CopyError::Read {
                offset,
                length,
                cause,
            })?
    };
    ctx.counters
        .bytes_read_for_grid
        .fetch_add(length, Ordering::Relaxed);
    ctx.checksums.piece(offset, data, permit.clone());
    Ok(Vec::new())
}

/// One WRITE_ZEROES of a hole; its checksum ranges are listed per checksum cell.
async fn zero_request(
    ctx: &Ctx,
    conn: usize,
    offset: u64,
    length: u64,
) -> Result<Vec<ChecksumRange>, CopyError> {
    ctx.write_zeroes(conn, offset, length).await?;
    Ok(ctx.checksums.zero_ranges(offset, length, ctx.chunk))
}
