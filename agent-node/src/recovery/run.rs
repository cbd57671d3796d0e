//! One recovery's task: journal, overlays and QEMU, the streams, the watch, and the end:
//! completed (NBD nodes removed, the VM left running), cancelled or failed (the VM killed, its
//! overlays and run files removed), or detached (the node shuts down: watching stops, the VM
//! and the journal stay); then the report to the hub.

use super::{Recoveries, RecoveryJob, WRITES_LOST, journal, stalled_words};
use crate::hub_client::{Delivery, deliver};
use crate::instant::{InstantSpec, InstantVm};
use crate::jobs::{JobContext, PROGRESS_EVERY};
use sendense_shared::api::JobStatus;
use sendense_shared::client::HubClient;
use sendense_shared::errors::{ErrorCode, chain};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often a stalled recovery tries to resume its VM and streams.
const RESUME_EVERY: Duration = Duration::from_secs(3);
/// QMP polls in a row that may fail before the recovery fails.
const QMP_FAILURES: u32 = 5;
/// Times a disk's stream is started before the recovery fails (a stream that ends without
/// bringing its disk home is started again).
const STREAM_STARTS: u32 = 3;
/// Polls in a row whose removal of the NBD nodes may fail once every stream finished.
const DROP_FAILURES: u32 = 10;

/// How the watch of a recovery ended.
enum End {
    /// Every disk home and no NBD node left: the VM runs on.
    Completed(InstantVm),
    /// Cancelled or failed: the VM (when it was started) is to be destroyed.
    Stopped {
        vm: Option<InstantVm>,
        cancelled: bool,
        error: String,
    },
    /// The node shuts down: the VM runs on, the journal stays for the next start.
    Detached,
}

fn failed(vm: Option<InstantVm>, error: String) -> End {
    End::Stopped {
        vm,
        cancelled: false,
        error,
    }
}

/// A new recovery's whole life; never fails: the outcome is its terminal state and report.
pub(super) async fn run(rec: Arc<Recoveries>, job: Arc<RecoveryJob>, spec: InstantSpec) {
    let journal_path = journal::path(&rec.run_dir, job.id());
    let ticker = Ticker::start(&rec.ctx, &job);
    let end = match start(&rec, &job, spec, &journal_path).await {
        Ok(vm) => watch(&rec.ctx, &job, vm).await,
        Err(end) => end,
    };
    conclude(&rec.ctx, &job, end, &journal_path, ticker).await;
}

/// The watch of a VM an earlier node process started ([`super::adopt`]), to its end.
pub(super) async fn run_adopted(rec: Arc<Recoveries>, job: Arc<RecoveryJob>, vm: InstantVm) {
    let journal_path = journal::path(&rec.run_dir, job.id());
    let ticker = Ticker::start(&rec.ctx, &job);
    let end = watch(&rec.ctx, &job, vm).await;
    conclude(&rec.ctx, &job, end, &journal_path, ticker).await;
}

/// The journal entry of a new recovery (no PID yet).
fn entry_of(job: &RecoveryJob, spec: &InstantSpec) -> journal::Entry {
    journal::Entry {
        recovery_id: job.id().to_string(),
        vm_name: job.vm_name().to_string(),
        run_dir: spec.run_dir.clone(),
        disks: spec
            .disks
            .iter()
            .map(|d| journal::Disk {
                disk_key: d.disk_key,
                overlay: d.overlay.clone(),
                size: d.size,
                server: d.server.clone(),
                export: d.export.clone(),
            })
            .collect(),
        speed_bps: spec.speed,
        qemu_pid: None,
    }
}

/// Journal, overlays, QEMU, the streams.
async fn start(
    rec: &Recoveries,
    job: &RecoveryJob,
    spec: InstantSpec,
    journal_path: &Path,
) -> Result<InstantVm, End> {
    // The node's recovery directory, made when a recovery first needs it: the recovered
    // disks, for the node's user alone.
    if spec
        .disks
        .iter()
        .any(|d| d.overlay.parent() == Some(rec.recovery_dir.as_path()))
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&rec.recovery_dir)
            .map_err(|e| {
                failed(
                    None,
                    format!(
                        "creating the recovery directory {}: {e}",
                        rec.recovery_dir.display()
                    ),
                )
            })?;
    }
    let mut entry = entry_of(job, &spec);
    let write = |entry: &journal::Entry| {
        journal::write(journal_path, entry).map_err(|e| {
            format!(
                "writing the recovery journal {}: {e}",
                journal_path.display()
            )
        })
    };
    write(&entry).map_err(|e| failed(None, e))?;
    let t = Instant::now();
    let vm = InstantVm::start(spec, rec.log.clone())
        .await
        .map_err(|e| failed(None, format!("starting the recovered VM: {}", chain(&e))))?;
    let pid = vm.pid();
    job.set_pid(pid);
    entry.qemu_pid = Some(pid);
    if let Err(e) = write(&entry) {
        return Err(failed(Some(vm), e));
    }
    if let Err(e) = vm.start_streams().await {
        return Err(failed(
            Some(vm),
            format!("starting the streams: {}", chain(&e)),
        ));
    }
    tracing::info!(recovery_id = %job.id(), vm = %job.vm_name(), qemu_pid = pid,
        elapsed = ?t.elapsed(), "recovered VM runs; its disks stream home");
    Ok(vm)
}

/// Reads the streams and the VM every [`PROGRESS_EVERY`] until every disk is home, a cancel,
/// a failure or the node's shutdown.
async fn watch(ctx: &JobContext, job: &RecoveryJob, mut vm: InstantVm) -> End {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled_since: Option<Instant> = None;
    let mut last_resume: Option<Instant> = None;
    let mut qmp_failures = 0;
    let mut drop_failures = 0;
    let mut starts: BTreeMap<i64, u32> = BTreeMap::new();
    loop {
        tokio::select! {
            biased;
            _ = job.cancel.cancelled() => {
                return End::Stopped { vm: Some(vm), cancelled: true, error: "cancelled".into() };
            }
            _ = ctx.shutdown.cancelled() => {
                drop(vm);
                return End::Detached;
            }
            _ = tick.tick() => {}
        }
        if !vm.is_alive() {
            let log = crate::instant::qemu_log(&vm.spec.run_dir);
            let last = std::fs::read_to_string(&log)
                .ok()
                .and_then(|t| t.lines().last().map(str::to_string))
                .map(|l| format!(" (last words: {l})"))
                .unwrap_or_default();
            let pid = vm.pid();
            return failed(
                Some(vm),
                format!("QEMU of the recovered VM (PID {pid}) exited{last}"),
            );
        }
        let polled = async {
            let progress = vm.progress().await?;
            let state = vm.run_state().await?;
            let stall = vm.stall(&progress, &state).await?;
            Ok::<_, crate::instant::InstantError>((progress, state, stall))
        }
        .await;
        let (progress, state, stall) = match polled {
            Ok(p) => {
                qmp_failures = 0;
                p
            }
            Err(e) => {
                qmp_failures += 1;
                tracing::warn!(recovery_id = %job.id(), error = %chain(&e), failures = qmp_failures,
                    "cannot read the recovered VM's state");
                if qmp_failures >= QMP_FAILURES {
                    return failed(
                        Some(vm),
                        format!("QMP of the recovered VM does not answer: {}", chain(&e)),
                    );
                }
                continue;
            }
        };
        job.update_streams(&progress, state);
        if let Some(speed) = job.take_speed() {
            match vm.set_speed(speed).await {
                Ok(()) => tracing::info!(recovery_id = %job.id(), speed_bps = speed.unwrap_or(0),
                    "the streams' speed changed"),
                Err(e) => tracing::warn!(recovery_id = %job.id(), error = %chain(&e),
                    "cannot change the streams' speed"),
            }
        }
        if stall.is_stalled() {
            let words = stalled_words(&stall);
            if job.set_stalled(Some(words.clone())) {
                tracing::warn!(recovery_id = %job.id(), stalled = %words, "recovery stalled");
            }
            let since = *stalled_since.get_or_insert_with(Instant::now);
            let due = last_resume.unwrap_or(since).elapsed() >= RESUME_EVERY;
            if due {
                last_resume = Some(Instant::now());
                // The VM and the streams pause again while the export is still gone.
                if let Err(e) = vm.resume(&stall).await {
                    tracing::debug!(recovery_id = %job.id(), error = %chain(&e), "resume failed");
                }
            }
        } else {
            if job.set_stalled(None) {
                tracing::info!(recovery_id = %job.id(), stalled_for = ?stalled_since.map(|t| t.elapsed()),
                    "the hub's exports answer again; the recovery goes on");
            }
            stalled_since = None;
            last_resume = None;
        }
        for p in progress.iter().filter(|p| p.status == "pending") {
            let n = starts.entry(p.disk_key).or_default();
            *n += 1;
            if *n > STREAM_STARTS {
                return failed(
                    Some(vm),
                    format!(
                        "the stream of disk {} ended {STREAM_STARTS} times without bringing the disk home",
                        p.disk_key
                    ),
                );
            }
            tracing::warn!(recovery_id = %job.id(), disk_key = p.disk_key, start = *n,
                "disk has no stream and is not home; starting its stream");
            if let Err(e) = vm.start_stream(p.disk_key).await {
                tracing::warn!(recovery_id = %job.id(), disk_key = p.disk_key, error = %chain(&e),
                    "cannot start the stream");
            }
        }
        if progress.iter().all(|p| p.status == "finished") {
            match vm.drop_nbd_nodes().await {
                Ok(()) => return End::Completed(vm),
                Err(e) => {
                    drop_failures += 1;
                    tracing::warn!(recovery_id = %job.id(), error = %chain(&e), failures = drop_failures,
                        "every disk is home but the NBD nodes could not be removed");
                    if drop_failures >= DROP_FAILURES {
                        return failed(
                            Some(vm),
                            format!(
                                "every disk is home but the NBD nodes could not be removed: {}",
                                chain(&e)
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// Applies the end: the VM's fate, the job's terminal state, the journal, the report.
async fn conclude(
    ctx: &JobContext,
    job: &RecoveryJob,
    end: End,
    journal_path: &Path,
    ticker: Ticker,
) {
    match end {
        End::Completed(vm) => {
            job.finish(JobStatus::Completed, None, None);
            ticker.stop().await;
            if let Err(e) = vm.remove_tls() {
                tracing::warn!(recovery_id = %job.id(), error = %chain(&e), "cannot remove the TLS material");
            }
            tracing::info!(recovery_id = %job.id(), vm = %job.vm_name(), qemu_pid = vm.pid(),
                "recovery completed: every disk is home, the VM runs from its overlays alone");
            // The QMP connection closes; QEMU runs on.
            drop(vm);
            // The journal stays until the hub has the result: a node stopped before that
            // re-adopts the VM at its next start, finds every disk home and reports again.
            if report_final(ctx, job).await {
                remove_journal(job, journal_path);
            }
        }
        End::Stopped {
            vm,
            cancelled,
            error,
        } => {
            let (status, code, mut msg) = if cancelled {
                (
                    JobStatus::Cancelled,
                    ErrorCode::Cancelled,
                    format!("cancelled: {WRITES_LOST}"),
                )
            } else {
                (
                    JobStatus::Failed,
                    ErrorCode::JobFailed,
                    format!("{error}; {WRITES_LOST}"),
                )
            };
            if let Some(vm) = vm
                && let Err(e) = vm.destroy().await
            {
                tracing::error!(recovery_id = %job.id(), error = %chain(&e), "cannot clean up the recovered VM");
                msg = format!("{msg} (cleaning up: {})", chain(&e));
            }
            job.finish(status, Some(msg.clone()), Some(code));
            ticker.stop().await;
            tracing::warn!(recovery_id = %job.id(), status = status.as_str(), error = %msg, "recovery ends");
            remove_journal(job, journal_path);
            report_final(ctx, job).await;
        }
        End::Detached => {
            ticker.stop().await;
            tracing::info!(recovery_id = %job.id(), vm = %job.vm_name(), qemu_pid = job.view().qemu_pid,
                "node shutting down: the recovered VM keeps running and streaming; the next start re-adopts it");
        }
    }
}

fn remove_journal(job: &RecoveryJob, path: &Path) {
    if let Err(e) = journal::remove(path) {
        tracing::warn!(recovery_id = %job.id(), path = %path.display(), error = %e, "cannot remove the journal");
    }
}

/// The final state, then the completion, retried like a restore's. Answers whether the hub
/// settled it (took or refused it; always without a hub), not when the node gave up on its
/// way down.
pub(super) async fn report_final(ctx: &JobContext, job: &RecoveryJob) -> bool {
    let Some(hub) = &ctx.hub else {
        return true;
    };
    let state = job.view();
    let completion = job.completion();
    let id = job.id();
    let what = format!("recovery {id}");
    let mut attempt = 0;
    if deliver(&what, &ctx.shutdown, &mut attempt, || {
        hub.recovery_progress(id, &state)
    })
    .await
        == Delivery::GaveUp
    {
        return false;
    }
    match deliver(&what, &ctx.shutdown, &mut attempt, || {
        hub.recovery_complete(id, &completion)
    })
    .await
    {
        Delivery::Taken => {
            tracing::info!(recovery_id = %id, "recovery result reported to the hub");
            true
        }
        Delivery::Refused { .. } => true,
        Delivery::GaveUp => false,
    }
}

/// The periodic progress push of one recovery (intermediate figures may be lost; the final
/// ones go with [`report_final`]). A hub that does not answer delays only this task.
struct Ticker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start(ctx: &JobContext, job: &Arc<RecoveryJob>) -> Ticker {
        let stop = CancellationToken::new();
        let task = tokio::spawn(progress_loop(job.clone(), ctx.hub.clone(), stop.clone()));
        Ticker { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn progress_loop(job: Arc<RecoveryJob>, hub: Option<HubClient>, stop: CancellationToken) {
    let Some(hub) = hub else {
        return;
    };
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let report = job.view();
        tokio::select! {
            r = hub.recovery_progress(job.id(), &report) => if let Err(e) = r {
                tracing::debug!(recovery_id = %job.id(), error = %chain(&e), "progress push failed");
            },
            _ = stop.cancelled() => return,
        }
    }
}
