//! One restore's task: create and journal the image, serve it with a private qemu-nbd, copy,
//! verify, stop the server; on failure or cancel, delete the image; then report to the hub.

use super::{RestoreJob, journal, replace};
use crate::copy::{CopyError, ExtentSource, copy_disk};
use crate::hub_client::deliver_end;
use crate::jobs::{CANCEL_GRACE, JobContext, PROGRESS_EVERY};
use sendense_shared::api::JobStatus;
use sendense_shared::child::{ChildError, StartGuard, Supervised};
use sendense_shared::client::HubClient;
use sendense_shared::errors::{ErrorCode, chain};
use sendense_shared::nbd::verify::{VerifyError, verify_export};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient, NbdError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Export name of the private qemu-nbd.
const EXPORT: &str = "restore";
/// How long the private qemu-nbd may take to flush the image and exit after SIGTERM.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the private qemu-nbd may take to answer on its socket.
const SERVER_READY: Duration = Duration::from_secs(10);

/// Why a restore failed (or stopped: [`RunError::Cancelled`]).
#[derive(Debug, Error)]
pub enum RunError {
    #[error("{path} exists; a restore never overwrites")]
    Exists { path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {command}")]
    ToolSpawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: {status}: {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("starting qemu-nbd for {path}")]
    ServerSpawn {
        path: PathBuf,
        #[source]
        source: ChildError,
    },
    #[error("qemu-nbd of the new image did not answer within {SERVER_READY:?}")]
    ServerNotReady {
        #[source]
        source: NbdError,
    },
    #[error("qemu-nbd of the new image exited {report}")]
    ServerExit { report: String },
    #[error("qemu-nbd of the new image did not stop within {SERVER_STOP_GRACE:?}")]
    ServerStop,
    #[error("copy from {source_addr}{note}")]
    Copy {
        source_addr: String,
        /// What the tunnel says, when it carries the source: " (through the ssh tunnel ...)".
        note: String,
        #[source]
        source: Box<CopyError>,
    },
    #[error("verification failed")]
    Verify(#[source] VerifyError),
    #[error("cancelled")]
    Cancelled,
    #[error("restoring into VM {vm}: {why}")]
    Replace { vm: String, why: String },
}

/// The restore's whole life; never fails: the outcome is its terminal state and its report.
pub(super) async fn run(ctx: Arc<JobContext>, run_dir: PathBuf, job: Arc<RestoreJob>) {
    let ticker_stop = CancellationToken::new();
    let ticker = tokio::spawn(progress_loop(
        job.clone(),
        ctx.hub.clone(),
        ticker_stop.clone(),
    ));
    let t = Instant::now();
    let result = restore(&ctx, &run_dir, &job).await;
    let (status, error, code) = match &result {
        Ok(()) => (JobStatus::Completed, None, None),
        // A cancel wins over the error it caused (a copy or read-back cut short).
        Err(_) if job.cancel.is_cancelled() => (
            JobStatus::Cancelled,
            Some(ctx.cancel_cause().to_string()),
            Some(ErrorCode::Cancelled),
        ),
        Err(e) => (
            JobStatus::Failed,
            Some(chain(e)),
            Some(ErrorCode::JobFailed),
        ),
    };
    job.finish(status, error.clone(), code);
    ticker_stop.cancel();
    let _ = ticker.await;
    tracing::info!(restore_id = %job.id(), status = status.as_str(), error = error.as_deref(),
        elapsed = ?t.elapsed(), "restore ends");
    if let Some(hub) = &ctx.hub {
        report_final(&ctx, hub, &job).await;
    }
}

/// The files of one restore.
struct Files {
    image: PathBuf,
    socket: PathBuf,
    journal: PathBuf,
}

async fn restore(ctx: &JobContext, run_dir: &Path, job: &RestoreJob) -> Result<(), RunError> {
    // Into a VM's disk: a new image beside it in its format, size, mode and owner.
    let replace = match &job.req.replace_vm {
        Some(vm) => {
            let disk = PathBuf::from(&job.req.path);
            let err = |why| RunError::Replace {
                vm: vm.clone(),
                why,
            };
            let shape = replace::shape(&disk).await.map_err(err)?;
            replace::check_fits(job.req.size_bytes, &shape, &disk).map_err(err)?;
            Some((vm.clone(), disk, shape))
        }
        None => None,
    };
    let files = Files {
        image: match &replace {
            Some((_, disk, _)) => replace::partial_path(disk, job.id()),
            None => PathBuf::from(&job.req.path),
        },
        socket: run_dir.join(format!("restore-{}.sock", job.id())),
        journal: journal::path(run_dir, job.id()),
    };
    let (format, size) = match &replace {
        Some((_, _, shape)) => (shape.format.as_str(), shape.virtual_size),
        None => ("qcow2", job.req.size_bytes),
    };
    std::fs::create_dir_all(run_dir).map_err(|source| RunError::Io {
        what: "creating run directory",
        path: run_dir.to_path_buf(),
        source,
    })?;
    // Exclusively, never through a symlink: the request's check may have raced another
    // writer, and from here on the file (this inode, not whatever the path later names) is
    // this restore's to delete. Mode 0640: a VM's disk, for the node's user and its group (the
    // hypervisor's), not for every local user. The refusal returns before anything is deleted.
    let created = match crate::fsutil::CreatedFile::create(&files.image, 0o640) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RunError::Exists { path: files.image });
        }
        Err(source) => {
            return Err(RunError::Io {
                what: "creating",
                path: files.image,
                source,
            });
        }
    };
    let mut entry = journal::Entry {
        restore_id: job.id().to_string(),
        image: files.image.clone(),
        socket: files.socket.clone(),
        qemu_nbd_pid: None,
    };
    let mut result = match write_journal(&files.journal, &entry) {
        Ok(()) => serve_and_copy(ctx, job, &files, &created, &mut entry, format, size).await,
        Err(e) => Err(e),
    };
    if let (Ok(()), Some((vm, disk, shape))) = (&result, &replace) {
        // The VM may have been started while the copy ran: it keeps its disk then.
        let qmp = job.vm_qmp.as_deref().unwrap_or(Path::new("/nonexistent"));
        result = match replace::check_stopped(vm, qmp, disk) {
            Err(e) => Err(RunError::Replace {
                vm: vm.clone(),
                why: e.to_string(),
            }),
            Ok(()) if !created.is_at_path() => Err(RunError::Replace {
                vm: vm.clone(),
                why: format!("{} was replaced by another file", files.image.display()),
            }),
            Ok(()) => replace::swap(&files.image, disk, shape).map_err(|source| RunError::Io {
                what: "renaming the restored image over",
                path: disk.clone(),
                source,
            }),
        };
        if result.is_ok() {
            tracing::info!(restore_id = %job.id(), vm = %vm, disk = %disk.display(),
                "the VM's disk was replaced by the restored image");
        }
    }
    // The journal goes last: a node killed during the cleanup redoes it at start-up.
    if result.is_err() {
        match created.remove() {
            Ok(true) => {}
            Ok(false) => tracing::warn!(path = %files.image.display(),
                "the partial image was replaced by another file; that one is left alone"),
            Err(e) => tracing::warn!(path = %files.image.display(), error = %e,
                "cannot remove the partial image"),
        }
    }
    remove_quietly(&files.socket, "socket");
    remove_quietly(&files.journal, "journal");
    result
}

fn write_journal(path: &Path, entry: &journal::Entry) -> Result<(), RunError> {
    journal::write(path, entry).map_err(|source| RunError::Io {
        what: "writing restore journal",
        path: path.to_path_buf(),
        source,
    })
}

fn remove_quietly(path: &Path, what: &str) {
    if let Err(e) = crate::fsutil::remove_if_present(path) {
        tracing::warn!(path = %path.display(), what, error = %e, "cannot remove");
    }
}

async fn serve_and_copy(
    ctx: &JobContext,
    job: &RestoreJob,
    files: &Files,
    created: &crate::fsutil::CreatedFile,
    entry: &mut journal::Entry,
    format: &str,
    size: u64,
) -> Result<(), RunError> {
    // Into the created inode through its descriptor, not the path: qemu-img truncates what it
    // opens, and the path may have been swapped for a symlink to someone's disk meanwhile.
    tool(
        tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(created.fd_path())
            .arg(size.to_string()),
    )
    .await?;
    // qemu-nbd opens the path (start-up recovery recognises it by it): only while it is still
    // the created file.
    if !created.is_at_path() {
        return Err(RunError::Io {
            what: "serving",
            path: files.image.clone(),
            source: std::io::Error::other(
                "the path no longer names the image this restore created",
            ),
        });
    }
    let _ = std::fs::remove_file(&files.socket);
    // Room for every connection of the copy (restore_connections) and one more.
    let shared = format!(
        "--shared={}",
        (ctx.copy_options.restore_connections + 1).max(4)
    );
    let mut cmd = tokio::process::Command::new("qemu-nbd");
    cmd.args(["-f", format, "-x", EXPORT, &shared, "-t"])
        .args(["--discard=unmap", "--detect-zeroes=unmap", "-k"])
        .arg(&files.socket)
        .arg(&files.image)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let server = Supervised::spawn(cmd).map_err(|source| RunError::ServerSpawn {
        path: files.image.clone(),
        source,
    })?;
    // Killed should this future be dropped before it stopped the server itself.
    let guard = StartGuard::new(&server, "qemu-nbd");
    entry.qemu_nbd_pid = Some(server.pid());
    let mut result = write_journal(&files.journal, entry);
    if result.is_ok() {
        let target = NbdAddr::Unix {
            path: files.socket.clone(),
            export: EXPORT.to_string(),
        };
        result = copy_and_verify(ctx, job, &target).await;
    }
    // SIGTERM: qemu-nbd flushes the image and exits 0; SIGKILL after the grace.
    let report = server.stop(SERVER_STOP_GRACE).await;
    guard.defuse();
    if result.is_ok() && report.code != Some(0) {
        return Err(
            if report.requested && report.signal == Some(nix::sys::signal::Signal::SIGKILL as i32) {
                RunError::ServerStop
            } else {
                RunError::ServerExit {
                    report: report.to_string(),
                }
            },
        );
    }
    result
}

async fn copy_and_verify(
    ctx: &JobContext,
    job: &RestoreJob,
    target: &NbdAddr,
) -> Result<(), RunError> {
    let t = Instant::now();
    // The private server needs a moment to create its socket.
    loop {
        if job.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        match NbdClient::connect(target, &ConnectOptions::default()).await {
            Ok(c) => {
                let _ = c.disconnect().await;
                break;
            }
            Err(source) if t.elapsed() > SERVER_READY => {
                return Err(RunError::ServerNotReady { source });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut opts = ctx.copy_options.clone();
    opts.target_is_zero = true;
    opts.connections = opts.restore_connections;
    opts.grid_cell = job.req.checksum_grid;
    opts.source_tls = job.req.source_export.as_ref().and_then(|e| e.tls.clone());
    let token = job.cancel.clone();
    let copy = copy_disk(
        &job.source,
        target,
        ExtentSource::Allocation,
        &opts,
        job.counters.clone(),
        token.clone(),
    );
    // As for a backup: the engine stops between requests, and a request to a hung source never
    // ends, so after a grace the copy is dropped (its connections with it).
    let copied = tokio::select! {
        r = copy => r,
        _ = async {
            token.cancelled().await;
            tokio::time::sleep(CANCEL_GRACE).await;
        } => {
            tracing::warn!(restore_id = %job.id(), "copy did not stop within {CANCEL_GRACE:?} of the cancel; dropped");
            Err(CopyError::Cancelled)
        }
    };
    let outcome = match copied {
        Ok(o) => o,
        Err(CopyError::Cancelled) => return Err(RunError::Cancelled),
        Err(source) => {
            let note = match ctx.tunnel() {
                Some(t) if t.carries(&job.source) => {
                    format!(" ({})", t.explain_failure().await)
                }
                _ => String::new(),
            };
            return Err(RunError::Copy {
                source_addr: job.source.to_string(),
                note,
                source: Box::new(source),
            });
        }
    };
    job.lock().grid = outcome.grid.clone();
    tracing::info!(restore_id = %job.id(), written = outcome.bytes_written,
        zeroed = outcome.bytes_zeroed, ranges = outcome.checksums.ranges.len(),
        elapsed = ?outcome.elapsed, "restore copied; reading back");
    match verify_export(
        target,
        &outcome.checksums.ranges,
        &job.cancel,
        Some(&job.verified),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(VerifyError::Cancelled) => Err(RunError::Cancelled),
        Err(e) => Err(RunError::Verify(e)),
    }
}

async fn tool(cmd: &mut tokio::process::Command) -> Result<(), RunError> {
    let command = format!("{:?}", cmd.as_std());
    let out = cmd.output().await.map_err(|source| RunError::ToolSpawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RunError::Tool {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The final progress, then the completion, retried like a backup's ([`deliver_end`]).
async fn report_final(ctx: &JobContext, hub: &HubClient, job: &RestoreJob) {
    let progress = job.progress();
    let completion = job.completion();
    let id = job.id();
    let what = format!("restore {id}");
    if deliver_end(
        &what,
        &ctx.shutdown,
        || hub.restore_progress(id, &progress),
        || hub.restore_complete(id, &completion),
    )
    .await
    {
        tracing::info!(restore_id = %id, "restore result reported to the hub");
    }
}

async fn progress_loop(job: Arc<RestoreJob>, hub: Option<HubClient>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        job.sample();
        if let Some(hub) = &hub {
            // Intermediate progress may be lost; the final figures go with report_final.
            let report = job.progress();
            tokio::select! {
                r = hub.restore_progress(job.id(), &report) => if let Err(e) = r {
                    tracing::debug!(restore_id = %job.id(), error = %chain(&e), "progress push failed");
                },
                _ = stop.cancelled() => return,
            }
        }
    }
}
