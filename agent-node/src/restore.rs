//! Restores on the node: a backup point, served read-only by the hub's qemu-nbd, copied by the
//! copy engine into a NEW qcow2 image on this host, then verified.
//!
//! How one restore runs:
//! 1. `qemu-img create -f qcow2 PATH SIZE` (the path must not exist; its directory must);
//! 2. a private `qemu-nbd` serves the new image on a unix socket in the run directory (no TCP
//!    port is opened on the node);
//! 3. [`crate::copy::copy_disk`] from the hub's export into it (allocated data only: the image
//!    is fresh), with checksums of what it read from the backup;
//! 4. verification: every checksummed range is read back from the new image and compared;
//! 5. the private qemu-nbd is stopped (SIGTERM: it flushes).
//!
//! A failed or cancelled restore deletes the image it created: a partial image is never left
//! looking like a restored disk. Writing into an existing (powered-off) VM's disk is not offered.

use crate::copy::{CopyOptions, DiskCounters, ExtentSource, copy_disk};
use sendense_shared::api::{JobStatus, NodeRestoreStart, NodeRestoreState};
use sendense_shared::child::{StartGuard, Supervised};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Export name of the private qemu-nbd.
const EXPORT: &str = "restore";
/// How long the private qemu-nbd may take to flush the image and exit after SIGTERM.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a restore was refused.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("restore_id: {0}")]
    Id(#[from] sendense_shared::names::NameError),
    #[error("path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    #[error("source: {0}")]
    Source(#[from] sendense_shared::nbd::NbdError),
    #[error("size_bytes must be more than 0")]
    Size,
    #[error("restore id {0} was already used")]
    Duplicate(String),
}

struct Progress {
    status: JobStatus,
    error: Option<String>,
    verified: u64,
}

/// One restore.
pub struct RestoreJob {
    req: NodeRestoreStart,
    counters: Arc<DiskCounters>,
    state: Mutex<Progress>,
}

impl RestoreJob {
    pub fn view(&self) -> NodeRestoreState {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let c = self.counters.snapshot();
        NodeRestoreState {
            restore_id: self.req.restore_id.clone(),
            path: self.req.path.clone(),
            status: st.status,
            bytes_done: if st.status == JobStatus::Completed {
                self.req.size_bytes
            } else {
                c.bytes_done().min(self.req.size_bytes)
            },
            bytes_total: self.req.size_bytes,
            bytes_written: c.bytes_written + c.bytes_zeroed,
            verified_ranges: st.verified,
            error_message: st.error.clone(),
        }
    }

    fn set(&self, status: JobStatus, error: Option<String>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.status = status;
        if error.is_some() {
            st.error = error;
        }
    }
}

/// Every restore of this node process.
pub struct Restores {
    run_dir: PathBuf,
    copy_options: CopyOptions,
    shutdown: CancellationToken,
    jobs: Mutex<HashMap<String, Arc<RestoreJob>>>,
}

impl Restores {
    pub fn new(run_dir: PathBuf, copy_options: CopyOptions, shutdown: CancellationToken) -> Self {
        Restores {
            run_dir,
            copy_options,
            shutdown,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<RestoreJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Checks the request and starts the restore in the background.
    pub fn start(self: &Arc<Self>, req: NodeRestoreStart) -> Result<Arc<RestoreJob>, RestoreError> {
        sendense_shared::names::validate_name("restore_id", &req.restore_id)?;
        check_path(&req.path)?;
        let source = NbdAddr::parse(&req.source)?;
        if req.size_bytes == 0 {
            return Err(RestoreError::Size);
        }
        let job = Arc::new(RestoreJob {
            req: req.clone(),
            counters: DiskCounters::new(),
            state: Mutex::new(Progress {
                status: JobStatus::Running,
                error: None,
                verified: 0,
            }),
        });
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if jobs.contains_key(&req.restore_id) {
                return Err(RestoreError::Duplicate(req.restore_id));
            }
            jobs.insert(req.restore_id.clone(), job.clone());
        }
        let me = self.clone();
        let j = job.clone();
        tokio::spawn(async move {
            let path = PathBuf::from(&j.req.path);
            let result = me.run(&j, &source).await;
            match result {
                Ok(()) => {
                    tracing::info!(restore_id = %j.req.restore_id, path = %path.display(), "restore verified");
                    j.set(JobStatus::Completed, None);
                }
                Err(e) => {
                    tracing::warn!(restore_id = %j.req.restore_id, error = %e, "restore failed");
                    let _ = std::fs::remove_file(&path);
                    j.set(JobStatus::Failed, Some(e));
                }
            }
        });
        Ok(job)
    }

    async fn run(&self, job: &RestoreJob, source: &NbdAddr) -> Result<(), String> {
        let path = Path::new(&job.req.path);
        if path.exists() {
            // Checked again here: the request may have raced another writer.
            return Err(format!(
                "{} exists; a restore never overwrites",
                path.display()
            ));
        }
        tool(
            tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(path)
                .arg(job.req.size_bytes.to_string()),
        )
        .await?;
        std::fs::create_dir_all(&self.run_dir)
            .map_err(|e| format!("run dir {}: {e}", self.run_dir.display()))?;
        let socket = self
            .run_dir
            .join(format!("restore-{}.sock", job.req.restore_id));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tokio::process::Command::new("qemu-nbd");
        cmd.args(["-f", "qcow2", "-x", EXPORT, "--shared=4", "-t"])
            .args(["--discard=unmap", "--detect-zeroes=unmap", "-k"])
            .arg(&socket)
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let server = Supervised::spawn(cmd)
            .map_err(|e| format!("starting qemu-nbd for {}: {e}", path.display()))?;
        // Killed should this future be dropped before it stopped the server itself.
        let guard = StartGuard::new(&server, "qemu-nbd");
        let target = NbdAddr::Unix {
            path: socket.clone(),
            export: EXPORT.to_string(),
        };
        let result = self.copy_and_verify(job, source, &target).await;
        // SIGTERM: qemu-nbd flushes the image and exits 0; SIGKILL after the grace.
        let report = server.stop(SERVER_STOP_GRACE).await;
        guard.defuse();
        if result.is_ok() && report.code != Some(0) {
            return Err(
                if report.requested
                    && report.signal == Some(nix::sys::signal::Signal::SIGKILL as i32)
                {
                    format!("qemu-nbd of the new image did not stop within {SERVER_STOP_GRACE:?}")
                } else {
                    format!("qemu-nbd of the new image exited {report}")
                },
            );
        }
        let _ = std::fs::remove_file(&socket);
        result
    }

    async fn copy_and_verify(
        &self,
        job: &RestoreJob,
        source: &NbdAddr,
        target: &NbdAddr,
    ) -> Result<(), String> {
        let t = Instant::now();
        // The private server needs a moment to create its socket.
        loop {
            match NbdClient::connect(target, &ConnectOptions::default()).await {
                Ok(c) => {
                    let _ = c.disconnect().await;
                    break;
                }
                Err(e) if t.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("qemu-nbd of the new image did not answer: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut opts = self.copy_options.clone();
        opts.target_is_zero = true;
        let outcome = copy_disk(
            source,
            target,
            ExtentSource::Allocation,
            &opts,
            job.counters.clone(),
            self.shutdown.child_token(),
        )
        .await
        .map_err(|e| format!("copy from {source}: {}", crate::error_chain(&e)))?;
        let client = NbdClient::connect(target, &ConnectOptions::default())
            .await
            .map_err(|e| format!("reading back {target}: {e}"))?;
        for r in &outcome.checksums.ranges {
            let mut h = blake3::Hasher::new();
            let mut at = r.offset;
            while at < r.offset + r.length {
                let n = (r.offset + r.length - at).min(4 << 20);
                let data = client
                    .read(at, n as u32)
                    .await
                    .map_err(|e| format!("reading back {at}+{n}: {e}"))?;
                h.update(&data);
                at += n;
            }
            let actual = h.finalize().to_hex().to_string();
            if actual != r.blake3 {
                return Err(format!(
                    "verification failed: checksum mismatch at {}+{}: the backup holds {}, the \
                     new image {actual}",
                    r.offset, r.length, r.blake3
                ));
            }
            job.state.lock().unwrap_or_else(|p| p.into_inner()).verified += 1;
        }
        let _ = client.disconnect().await;
        Ok(())
    }
}

async fn tool(cmd: &mut tokio::process::Command) -> Result<(), String> {
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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
    let path = Path::new(p);
    if !path.is_absolute() {
        return bad("must be absolute");
    }
    if p.contains('\0') || p.contains('\n') {
        return bad("contains NUL or a newline");
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return bad("must not contain ..");
    }
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
}
