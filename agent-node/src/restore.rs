//! Restores on the node: a backup point, served read-only by the hub's qemu-nbd, copied by the
//! copy engine into a NEW qcow2 image on this host, then verified. A restore is a job like a
//! backup: it runs on the node's [`JobContext`] (the task tracker drained on shutdown, a cancel
//! token that is a child of the shutdown, the hub client, the tunnel's routing), is listed in
//! [`Restores`] for `GET /api/v1/restore/{id}` and `POST /api/v1/restore/{id}/cancel`, and
//! pushes its progress and its result to the hub (`POST /api/v1/restores/{id}/progress`, about
//! once a second, and `/complete`, retried like a backup's completion).
//!
//! How one restore runs ([`run`]):
//! 1. the image file is created exclusively (`O_EXCL`: a restore never overwrites), then the
//!    crash journal ([`journal`]) records it; `qemu-img create -f qcow2 PATH SIZE` formats it;
//! 2. a private `qemu-nbd` serves the new image on a unix socket in the run directory (no TCP
//!    port is opened on the node); the journal gets its PID;
//! 3. [`crate::copy::copy_disk`] from the hub's export (routed through the tunnel when one
//!    carries it) into it (allocated data only: the image is fresh), with checksums of what it
//!    read from the backup, and the whole-disk grid on `checksum_grid` when the hub asks for it
//!    (reported in the completion; the hub compares it with the point's stored truth);
//! 4. verification: every checksummed range is read back through the private qemu-nbd and
//!    compared ([`sendense_shared::nbd::verify`], the routine the hub verifies backups with);
//! 5. the private qemu-nbd is stopped (SIGTERM: it flushes); the journal goes last.
//!
//! A failed or cancelled restore (a shutdown cancels it too) stops its qemu-nbd and deletes the
//! image it created: a partial image is never left looking like a restored disk. A node killed
//! mid-restore leaves its journal; start-up recovery ([`recovery`]) stops the qemu-nbd it names
//! (after checking `/proc/PID/cmdline`) and deletes the partial image.
//!
//! With `replace_vm` the restore goes into a powered-off VM's own disk ([`replace`]): refused
//! while the VM runs, written beside the disk in its format and renamed over it only once read
//! back equal.

pub mod journal;
pub mod recovery;
pub mod replace;
mod run;

use crate::copy::DiskCounters;
use crate::jobs::JobContext;
use crate::jobs::state::RateSamples;
use sendense_shared::api::{
    GridChecksums, JobStatus, NbdExport, NodeRestoreStart, NodeRestoreState, RestoreCompletion,
    RestoreProgress,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::nbd::NbdAddr;
use sendense_shared::targets::NbdUri;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Finished restores kept for `GET /api/v1/restore/{id}`.
const KEEP_FINISHED: usize = 200;

/// Why a restore was refused.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("restore_id: {0}")]
    Id(#[from] sendense_shared::names::NameError),
    #[error("path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    #[error("source: {0}")]
    Source(#[from] sendense_shared::nbd::NbdError),
    #[error("source_export: {why}")]
    SourceExport { why: &'static str },
    #[error("size_bytes must be more than 0")]
    Size,
    #[error("restore id {0} was already used")]
    Duplicate(String),
    #[error(transparent)]
    Replace(#[from] replace::ReplaceError),
    #[error("node is shutting down")]
    ShuttingDown,
}

/// Why a cancel was refused.
#[derive(Debug, Error)]
pub enum CancelError {
    #[error("no restore {id} on this node")]
    NotFound { id: String },
    #[error("restore {id} has ended already ({status})")]
    Ended { id: String, status: &'static str },
}

struct Progress {
    status: JobStatus,
    error: Option<String>,
    error_code: Option<ErrorCode>,
    /// Bytes read, sampled about once a second, for the rate.
    samples: RateSamples,
    /// The whole-disk grid of what the copy read (when the hub asked for one).
    grid: Option<GridChecksums>,
}

/// One restore.
pub struct RestoreJob {
    req: NodeRestoreStart,
    /// The hub's export as this node reaches it (routed).
    source: NbdAddr,
    /// With `replace_vm`: that VM's QMP socket (checked again before the swap).
    vm_qmp: Option<PathBuf>,
    counters: Arc<DiskCounters>,
    verified: AtomicU64,
    cancel: CancellationToken,
    state: Mutex<Progress>,
}

impl RestoreJob {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.req.restore_id
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The address the copy reads from (after routing).
    pub fn source(&self) -> &NbdAddr {
        &self.source
    }

    fn bytes_done(&self, status: JobStatus) -> u64 {
        if status == JobStatus::Completed {
            self.req.size_bytes
        } else {
            self.counters
                .snapshot()
                .bytes_done()
                .min(self.req.size_bytes)
        }
    }

    fn bytes_written(&self) -> u64 {
        let c = self.counters.snapshot();
        c.bytes_written + c.bytes_zeroed
    }

    /// The restore as `GET /api/v1/restore/{id}` shows it.
    pub fn view(&self) -> NodeRestoreState {
        let st = self.lock();
        NodeRestoreState {
            restore_id: self.req.restore_id.clone(),
            path: self.req.path.clone(),
            status: st.status,
            bytes_done: self.bytes_done(st.status),
            bytes_total: self.req.size_bytes,
            bytes_written: self.bytes_written(),
            verified_ranges: self.verified.load(Ordering::Relaxed),
            error_message: st.error.clone(),
        }
    }

    fn sample(&self) {
        let read = self.counters.snapshot().bytes_read;
        self.lock().samples.push(Instant::now(), read);
    }

    fn progress(&self) -> RestoreProgress {
        let st = self.lock();
        RestoreProgress {
            bytes_done: self.bytes_done(st.status),
            bytes_total: self.req.size_bytes,
            rate_bps: st.samples.rate(),
        }
    }

    fn completion(&self) -> RestoreCompletion {
        let st = self.lock();
        RestoreCompletion {
            status: st.status,
            bytes_written: self.bytes_written(),
            verified_ranges: self.verified.load(Ordering::Relaxed),
            error_message: st.error.clone(),
            error_code: st.error_code,
            grid: st.grid.clone(),
        }
    }

    /// The terminal state (once: a later call changes nothing).
    fn finish(&self, status: JobStatus, error: Option<String>, code: Option<ErrorCode>) {
        let mut st = self.lock();
        if st.status.is_terminal() {
            return;
        }
        st.status = status;
        st.error = error;
        st.error_code = code;
    }
}

/// Every restore of this node process.
pub struct Restores {
    ctx: Arc<JobContext>,
    run_dir: PathBuf,
    /// The node's VMs by name (their QMP sockets): what `replace_vm` may name.
    vms: std::collections::BTreeMap<String, PathBuf>,
    jobs: Mutex<Vec<Arc<RestoreJob>>>,
}

impl Restores {
    /// Restores on `ctx` (the one the backups run on), their sockets and journals in `run_dir`.
    pub fn new(ctx: Arc<JobContext>, run_dir: PathBuf) -> Arc<Self> {
        Self::with_vms(ctx, run_dir, Default::default())
    }

    /// As [`Restores::new`], with the node's VMs (name → QMP socket) a restore may write into.
    pub fn with_vms(
        ctx: Arc<JobContext>,
        run_dir: PathBuf,
        vms: std::collections::BTreeMap<String, PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Restores {
            ctx,
            run_dir,
            vms,
            jobs: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RestoreJob>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<RestoreJob>> {
        self.lock().iter().find(|j| j.id() == id).cloned()
    }

    /// Checks the request and starts the restore as a job on the tracker.
    pub fn start(self: &Arc<Self>, req: NodeRestoreStart) -> Result<Arc<RestoreJob>, RestoreError> {
        if self.ctx.shutdown.is_cancelled() {
            return Err(RestoreError::ShuttingDown);
        }
        sendense_shared::names::validate_name("restore_id", &req.restore_id)?;
        // Before the path: a retried start finds its own image there.
        if self.get(&req.restore_id).is_some() {
            return Err(RestoreError::Duplicate(req.restore_id));
        }
        match &req.replace_vm {
            Some(vm) => {
                replace::check(vm, self.vms.get(vm).map(PathBuf::as_path), &req.path)?;
            }
            None => check_path(&req.path)?,
        }
        let source = self.ctx.route(source_addr(&req)?);
        if req.size_bytes == 0 {
            return Err(RestoreError::Size);
        }
        let vm_qmp = req
            .replace_vm
            .as_ref()
            .and_then(|v| self.vms.get(v).cloned());
        let job = Arc::new(RestoreJob {
            req,
            source,
            vm_qmp,
            counters: DiskCounters::new(),
            verified: AtomicU64::new(0),
            cancel: self.ctx.shutdown.child_token(),
            state: Mutex::new(Progress {
                status: JobStatus::Running,
                error: None,
                error_code: None,
                samples: RateSamples::default(),
                grid: None,
            }),
        });
        {
            let mut jobs = self.lock();
            if jobs.iter().any(|j| j.id() == job.id()) {
                return Err(RestoreError::Duplicate(job.req.restore_id.clone()));
            }
            jobs.push(job.clone());
            while jobs.len() > KEEP_FINISHED {
                match jobs.iter().position(|j| j.status().is_terminal()) {
                    Some(i) => {
                        jobs.remove(i);
                    }
                    None => break,
                }
            }
        }
        tracing::info!(restore_id = %job.id(), source = %job.source, path = %job.req.path,
            "restore starts");
        let ctx = self.ctx.clone();
        let run_dir = self.run_dir.clone();
        let j = job.clone();
        self.ctx
            .tracker
            .spawn(async move { run::run(ctx, run_dir, j).await });
        Ok(job)
    }

    /// Asks a running restore to stop: it stops its qemu-nbd, deletes the partial image and
    /// ends `cancelled`.
    pub fn cancel(&self, id: &str) -> Result<Arc<RestoreJob>, CancelError> {
        let job = self
            .get(id)
            .ok_or_else(|| CancelError::NotFound { id: id.to_string() })?;
        {
            let mut st = job.lock();
            if st.status.is_terminal() {
                return Err(CancelError::Ended {
                    id: id.to_string(),
                    status: st.status.as_str(),
                });
            }
            st.status = JobStatus::Cancelling;
        }
        tracing::info!(restore_id = %id, "restore cancel requested");
        job.cancel.cancel();
        Ok(job)
    }
}

/// The hub's export: `source_export` when given (structured, no parsing), else `source`.
fn source_addr(req: &NodeRestoreStart) -> Result<NbdAddr, RestoreError> {
    let Some(e) = &req.source_export else {
        return Ok(NbdAddr::parse(&req.source)?);
    };
    export_addr(e).map_err(|why| RestoreError::SourceExport { why })
}

/// A hub export as an address, checked (the checks of every export the hub hands a node: a
/// restore's source, a recovery's disks): its unix socket when it has one, else TCP.
pub(crate) fn export_addr(e: &NbdExport) -> Result<NbdAddr, &'static str> {
    if let Some(socket) = &e.socket {
        sendense_shared::targets::check_socket(socket)?;
    } else if e.host.is_empty() || e.host.contains(['/', '[', ']', ',', ' ', '\0']) {
        return Err("empty host or a bad character in it");
    } else if e.port == 0 {
        return Err("port 0");
    }
    if e.export.is_empty() || e.export.chars().any(char::is_control) {
        return Err("empty export name or a control character in it");
    }
    Ok(NbdAddr::from(NbdUri::from(e.clone())))
}

/// An absolute `.qcow2` path without `..`, NUL or newline, that does not exist yet, in an
/// existing directory.
fn check_path(p: &str) -> Result<(), RestoreError> {
    let bad = |why| {
        Err(RestoreError::Path {
            path: p.to_string(),
            why,
        })
    };
    let path =
        sendense_shared::names::check_plain_absolute(p).map_err(|why| RestoreError::Path {
            path: p.to_string(),
            why,
        })?;
    if path.extension().and_then(|e| e.to_str()) != Some("qcow2") {
        return bad("must end in .qcow2 (the restore writes a QCOW2 image)");
    }
    if path.exists() {
        return bad("exists already; a restore never overwrites a file");
    }
    if !path.parent().is_some_and(|d| d.is_dir()) {
        return bad("its directory does not exist");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("r.qcow2");
        assert!(check_path(ok.to_str().unwrap()).is_ok());
        for bad in [
            "relative.qcow2".to_string(),
            format!("{}/../x.qcow2", dir.path().display()),
            format!("{}/r.raw", dir.path().display()),
            format!("{}/missing/r.qcow2", dir.path().display()),
        ] {
            assert!(check_path(&bad).is_err(), "{bad}");
        }
        std::fs::write(&ok, b"x").unwrap();
        assert!(check_path(ok.to_str().unwrap()).is_err());
    }

    fn req(source: &str, export: Option<NbdExport>) -> NodeRestoreStart {
        NodeRestoreStart {
            restore_id: "r1".into(),
            source: source.into(),
            source_export: export,
            path: "/tmp/r.qcow2".into(),
            size_bytes: 1,
            checksum_grid: None,
            replace_vm: None,
        }
    }

    #[test]
    fn the_structured_source_wins_and_the_string_is_the_fallback() {
        let e = NbdExport {
            host: "::1".into(),
            port: 10100,
            export: "restore-r1".into(),
            socket: None,
            tls: None,
        };
        let want = NbdAddr::Tcp {
            host: "::1".into(),
            port: 10100,
            export: "restore-r1".into(),
        };
        assert_eq!(source_addr(&req("junk", Some(e.clone()))).unwrap(), want);
        assert_eq!(
            source_addr(&req("nbd://[::1]:10100/restore-r1", None)).unwrap(),
            want
        );
        assert!(matches!(
            source_addr(&req("junk", None)),
            Err(RestoreError::Source(_))
        ));
        for bad in [
            NbdExport {
                host: String::new(),
                ..e.clone()
            },
            NbdExport {
                port: 0,
                ..e.clone()
            },
            NbdExport {
                export: "a\nb".into(),
                ..e.clone()
            },
            NbdExport {
                socket: Some("relative.sock".into()),
                ..e.clone()
            },
        ] {
            assert!(matches!(
                source_addr(&req("nbd://h:1/e", Some(bad))),
                Err(RestoreError::SourceExport { .. })
            ));
        }
        // The hub's unix export: its socket, whatever host and port say.
        let unix = NbdExport {
            socket: Some("/run/sendense-nbd/10100.sock".into()),
            ..e
        };
        assert_eq!(
            source_addr(&req("junk", Some(unix))).unwrap(),
            NbdAddr::Unix {
                path: "/run/sendense-nbd/10100.sock".into(),
                export: "restore-r1".into(),
            }
        );
    }
}
