//! Instant recoveries on the node (issue 15): a backup point, served read-only by the hub's
//! qemu-nbd, booted at once as a new QEMU VM on local QCOW2 overlays backed by those exports,
//! while every disk streams home inside QEMU ([`crate::instant`], the engine). A recovery is a
//! job like a restore: it runs on the node's [`JobContext`] (the task tracker drained on
//! shutdown, the hub client, the tunnel's routing), is listed in [`Recoveries`] for
//! `GET /api/v1/recovery/{id}` and `POST /api/v1/recovery/{id}/cancel`, and pushes its state to
//! the hub (`POST /api/v1/recoveries/{id}/progress` about once a second, and `/complete`,
//! retried like a restore's completion).
//!
//! How one recovery runs ([`run`]):
//! 1. the crash journal ([`journal`]) records the overlays to create and the recovery's run
//!    directory (`<run dir>/recovery-<id>/`: QMP socket, serial log, guest agent socket, PID
//!    file, QEMU's stderr, the exports' TLS material);
//! 2. the overlays are created (exclusively) in the request's `overlay_dir` or the node's
//!    recovery directory, named `<vm>-disk-<key>.qcow2`, and QEMU starts on them (not paused;
//!    it may reboot), in a process group of its own; the journal gets its PID;
//! 3. one block-stream per disk; every second the node reads the streams and the VM's state
//!    from QMP. A paused stream or a VM paused on an I/O error (the hub's export does not
//!    answer) sets `stalled` in words for the operator and is resumed every few seconds;
//! 4. when every disk is home: the NBD nodes (and their TLS credentials) are removed from the
//!    VM, checked gone, the completion is reported, the TLS material and the journal go. The
//!    VM keeps running, from its overlays alone, and outlives the node.
//!
//! A cancelled or failed recovery kills QEMU by its PID and removes the overlays and run files:
//! what the guest wrote is lost, and its error message says so. A node shutting down (SIGTERM)
//! stops watching and leaves the VM running and the journal in place; start-up ([`adopt`])
//! re-adopts a journalled VM whose QEMU still runs and finishes it as above, and cleans up
//! (reporting `failed`) one whose QEMU is gone.

pub mod adopt;
pub mod journal;
mod run;

use crate::instant::{InstantDisk, InstantSpec, NbdServer};
use crate::jobs::JobContext;
use crate::jobs::state::RateSamples;
use crate::qmp::QmpLog;
use sendense_shared::api::{
    JobStatus, NodeRecoveryStart, NodeRecoveryState, RecoveryCompletion, RecoveryDiskProgress,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::DiskKey;
use sendense_shared::names::{check_plain_absolute, check_simple_name};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Finished recoveries kept for `GET /api/v1/recovery/{id}`.
const KEEP_FINISHED: usize = 200;
/// QEMU's machine type when the request names none.
pub const DEFAULT_MACHINE: &str = "q35";
/// Guest memory and vCPUs the node accepts (the hub checks the same bounds).
pub use sendense_shared::api::{RECOVERY_CPUS as CPUS, RECOVERY_MEMORY_MIB as MEMORY_MIB};
/// Longest unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// What every failed or cancelled recovery's message ends with.
pub const WRITES_LOST: &str =
    "the recovered VM was stopped and its overlays removed: what the guest wrote is lost";

/// Why a recovery was refused.
#[derive(Debug, Error)]
pub enum RecoveryError {
    /// A field of the request (`422 invalid_field`); the message starts with its name.
    #[error("{field}: {why}")]
    Field { field: String, why: String },
    /// `409 already_exists`: the id, the VM name or an overlay is taken.
    #[error("{0}")]
    Taken(String),
    #[error("node is shutting down")]
    ShuttingDown,
}

fn field(field: impl Into<String>, why: impl Into<String>) -> RecoveryError {
    RecoveryError::Field {
        field: field.into(),
        why: why.into(),
    }
}

/// Why a cancel was refused.
#[derive(Debug, Error)]
pub enum CancelError {
    #[error("no recovery {id} on this node")]
    NotFound { id: String },
    #[error("recovery {id} has ended already ({status})")]
    Ended { id: String, status: &'static str },
}

/// One disk as the job shows it.
struct DiskState {
    disk_key: DiskKey,
    overlay: PathBuf,
    size: u64,
    bytes_done: u64,
    bytes_total: u64,
    stream: String,
    samples: RateSamples,
}

struct Progress {
    status: JobStatus,
    vm_state: Option<String>,
    qemu_pid: Option<u32>,
    disks: Vec<DiskState>,
    stalled: Option<String>,
    error: Option<String>,
    error_code: Option<ErrorCode>,
}

/// One recovery.
pub struct RecoveryJob {
    id: String,
    vm_name: String,
    /// The recovery's own run directory.
    run_dir: PathBuf,
    /// `POST /api/v1/recovery/{id}/cancel` (not the shutdown: that leaves the VM running).
    cancel: CancellationToken,
    state: Mutex<Progress>,
    /// A speed the API asked for, taken by the watch at its next tick (`Some(None)`: no bound).
    speed: Mutex<Option<Option<u64>>>,
}

impl RecoveryJob {
    fn new(
        id: String,
        vm_name: String,
        run_dir: PathBuf,
        disks: impl IntoIterator<Item = (DiskKey, PathBuf, u64)>,
    ) -> RecoveryJob {
        RecoveryJob {
            id,
            vm_name,
            run_dir,
            cancel: CancellationToken::new(),
            speed: Mutex::new(None),
            state: Mutex::new(Progress {
                status: JobStatus::Running,
                vm_state: None,
                qemu_pid: None,
                disks: disks
                    .into_iter()
                    .map(|(disk_key, overlay, size)| DiskState {
                        disk_key,
                        overlay,
                        size,
                        bytes_done: 0,
                        bytes_total: size,
                        stream: "pending".into(),
                        samples: RateSamples::default(),
                    })
                    .collect(),
                stalled: None,
                error: None,
                error_code: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The speed asked for since the last call, if any.
    pub(crate) fn take_speed(&self) -> Option<Option<u64>> {
        self.speed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn vm_name(&self) -> &str {
        &self.vm_name
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The recovery as `GET /api/v1/recovery/{id}` shows it (and the progress report).
    pub fn view(&self) -> NodeRecoveryState {
        let st = self.lock();
        let started = st.qemu_pid.is_some();
        let path = |p: PathBuf| started.then(|| p.display().to_string());
        NodeRecoveryState {
            recovery_id: self.id.clone(),
            vm_name: self.vm_name.clone(),
            status: st.status,
            vm_state: st.vm_state.clone(),
            qemu_pid: st.qemu_pid,
            qmp_socket: path(crate::instant::qmp_socket(&self.run_dir)),
            serial_log: path(crate::instant::serial_log(&self.run_dir)),
            disks: st
                .disks
                .iter()
                .map(|d| RecoveryDiskProgress {
                    disk_key: d.disk_key,
                    overlay: d.overlay.display().to_string(),
                    bytes_done: d.bytes_done,
                    bytes_total: d.bytes_total,
                    rate_bps: d.samples.rate(),
                    stream: d.stream.clone(),
                })
                .collect(),
            stalled: st.stalled.clone(),
            error_message: st.error.clone(),
        }
    }

    fn completion(&self) -> RecoveryCompletion {
        let state = self.view();
        let st = self.lock();
        RecoveryCompletion {
            status: st.status,
            state,
            error_message: st.error.clone(),
            error_code: st.error_code,
        }
    }

    /// The streams as QMP last showed them.
    fn update_streams(&self, streams: &[crate::instant::StreamProgress], vm_state: String) {
        let now = Instant::now();
        let mut st = self.lock();
        st.vm_state = Some(vm_state);
        for p in streams {
            if let Some(d) = st.disks.iter_mut().find(|d| d.disk_key.0 == p.disk_key) {
                d.bytes_done = p.done;
                d.bytes_total = p.total;
                d.stream = p.status.clone();
                d.samples.push(now, p.done);
            }
        }
    }

    /// Sets or clears `stalled`; answers whether it changed.
    fn set_stalled(&self, words: Option<String>) -> bool {
        let mut st = self.lock();
        if st.stalled == words {
            return false;
        }
        st.stalled = words;
        true
    }

    fn set_pid(&self, pid: u32) {
        self.lock().qemu_pid = Some(pid);
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
        st.stalled = None;
        if status == JobStatus::Completed {
            for d in &mut st.disks {
                d.bytes_done = d.size;
                d.bytes_total = d.size;
                d.stream = "finished".into();
            }
        }
    }
}

/// Every recovery of this node process.
pub struct Recoveries {
    ctx: Arc<JobContext>,
    /// The node's run directory: journals and each recovery's run directory.
    run_dir: PathBuf,
    /// Where overlays go unless a request names a directory.
    recovery_dir: PathBuf,
    /// The recovered VMs' QMP commands (in memory only: the watch polls every second).
    log: Arc<QmpLog>,
    jobs: Mutex<Vec<Arc<RecoveryJob>>>,
}

impl Recoveries {
    /// Recoveries on `ctx` (the one backups and restores run on), their journals and run
    /// directories in `run_dir`, overlays by default in `recovery_dir`.
    pub fn new(ctx: Arc<JobContext>, run_dir: PathBuf, recovery_dir: PathBuf) -> Arc<Self> {
        Arc::new(Recoveries {
            ctx,
            run_dir,
            recovery_dir,
            log: Arc::new(QmpLog::new(None)),
            jobs: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RecoveryJob>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<RecoveryJob>> {
        self.lock().iter().find(|j| j.id() == id).cloned()
    }

    /// The run directory of recovery `id` (a validated name).
    fn run_dir_of(&self, id: &str) -> PathBuf {
        self.run_dir.join(format!("{}{id}", journal::PREFIX))
    }

    /// Lists `job`, dropping the oldest finished ones beyond [`KEEP_FINISHED`]; refuses an id
    /// or a live VM name already listed.
    fn insert(&self, job: Arc<RecoveryJob>) -> Result<(), RecoveryError> {
        let mut jobs = self.lock();
        if jobs.iter().any(|j| j.id() == job.id()) {
            return Err(RecoveryError::Taken(format!(
                "recovery id {} was already used",
                job.id()
            )));
        }
        if let Some(e) = vm_in_use(&jobs, &job.vm_name) {
            return Err(e);
        }
        jobs.push(job);
        while jobs.len() > KEEP_FINISHED {
            match jobs.iter().position(|j| j.status().is_terminal()) {
                Some(i) => {
                    jobs.remove(i);
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Checks the request and starts the recovery as a job on the tracker.
    pub fn start(
        self: &Arc<Self>,
        req: NodeRecoveryStart,
    ) -> Result<Arc<RecoveryJob>, RecoveryError> {
        if self.ctx.shutdown.is_cancelled() {
            return Err(RecoveryError::ShuttingDown);
        }
        sendense_shared::names::validate_name("recovery_id", &req.recovery_id)
            .map_err(|e| field("recovery_id", strip_field(&e.to_string(), "recovery_id")))?;
        // Before the other fields: a retried start finds its own overlays there.
        let run_dir = self.run_dir_of(&req.recovery_id);
        if self.get(&req.recovery_id).is_some()
            || journal::path(&self.run_dir, &req.recovery_id).exists()
            || run_dir.exists()
        {
            return Err(RecoveryError::Taken(format!(
                "recovery id {} was already used on this node",
                req.recovery_id
            )));
        }
        let spec = plan(&req, &run_dir, &self.recovery_dir, |a| self.ctx.route(a))?;
        // Before the overlays: a live recovery of that name has them.
        if let Some(e) = vm_in_use(&self.lock(), &req.vm_name) {
            return Err(e);
        }
        // A dangling symlink too: the overlay is created exclusively, never through one.
        if let Some(d) = spec
            .disks
            .iter()
            .find(|d| d.overlay.symlink_metadata().is_ok())
        {
            return Err(RecoveryError::Taken(format!(
                "overlay {} exists already (VM name {:?} was recovered here before?)",
                d.overlay.display(),
                req.vm_name
            )));
        }
        let job = Arc::new(RecoveryJob::new(
            req.recovery_id.clone(),
            req.vm_name.clone(),
            run_dir,
            spec.disks
                .iter()
                .map(|d| (DiskKey(d.disk_key), d.overlay.clone(), d.size)),
        ));
        self.insert(job.clone())?;
        tracing::info!(recovery_id = %job.id(), vm = %job.vm_name, disks = spec.disks.len(),
            exports = %spec.disks.iter().map(|d| format!("{}:{}", d.server, d.export)).collect::<Vec<_>>().join(" "),
            "recovery starts");
        let this = self.clone();
        let j = job.clone();
        self.ctx
            .tracker
            .spawn(async move { run::run(this, j, spec).await });
        Ok(job)
    }

    /// A new bound of the recovery's streams (0: none), applied within a second.
    pub fn set_speed(&self, id: &str, speed_bps: u64) -> Result<Arc<RecoveryJob>, CancelError> {
        let job = self
            .get(id)
            .ok_or_else(|| CancelError::NotFound { id: id.to_string() })?;
        let status = job.status();
        if status.is_terminal() || status == JobStatus::Cancelling {
            return Err(CancelError::Ended {
                id: id.to_string(),
                status: status.as_str(),
            });
        }
        *job.speed.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((speed_bps > 0).then_some(speed_bps));
        tracing::info!(recovery_id = %id, speed_bps, "recovery stream speed requested");
        Ok(job)
    }

    /// Asks a running recovery to stop: it kills the VM, removes the overlays and run files
    /// and ends `cancelled`.
    pub fn cancel(&self, id: &str) -> Result<Arc<RecoveryJob>, CancelError> {
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
        tracing::info!(recovery_id = %id, "recovery cancel requested");
        job.cancel.cancel();
        Ok(job)
    }
}

/// `409` when a recovery listed in `jobs` that has not ended runs a VM named `name`.
fn vm_in_use(jobs: &[Arc<RecoveryJob>], name: &str) -> Option<RecoveryError> {
    jobs.iter()
        .find(|j| j.vm_name == name && !j.status().is_terminal())
        .map(|j| {
            RecoveryError::Taken(format!(
                "VM name {name:?} is used by recovery {} on this node",
                j.id()
            ))
        })
}

/// The name validator words its errors "<field> is empty", "<field> contains ..."; the
/// answer names the field once, first: "<field>: is empty".
fn strip_field(msg: &str, name: &str) -> String {
    msg.strip_prefix(name)
        .map(|m| m.trim_start_matches([':', ' ']))
        .unwrap_or(msg)
        .to_string()
}

/// The request as the engine's spec: every field checked (pure but for looking at the files it
/// names), every export routed.
fn plan(
    req: &NodeRecoveryStart,
    run_dir: &Path,
    recovery_dir: &Path,
    route: impl Fn(sendense_shared::nbd::NbdAddr) -> sendense_shared::nbd::NbdAddr,
) -> Result<InstantSpec, RecoveryError> {
    let qmp = crate::instant::qmp_socket(run_dir);
    if qmp.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(field(
            "recovery_id",
            format!(
                "too long: the VM's QMP socket {} would be longer than {MAX_SOCKET_PATH} bytes",
                qmp.display()
            ),
        ));
    }
    check_simple_name(&req.vm_name, 63).map_err(|why| field("vm_name", why))?;
    if !MEMORY_MIB.contains(&req.memory_mib) {
        return Err(field(
            "memory_mib",
            format!("must be {}..={}", MEMORY_MIB.start(), MEMORY_MIB.end()),
        ));
    }
    if !CPUS.contains(&req.cpus) {
        return Err(field(
            "cpus",
            format!("must be {}..={}", CPUS.start(), CPUS.end()),
        ));
    }
    let machine = req.machine.as_deref().unwrap_or(DEFAULT_MACHINE);
    check_simple_name(machine, 64).map_err(|why| field("machine", why))?;
    for (name, value) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
        if let Some(p) = value {
            let path = check_plain_absolute(p).map_err(|why| field(name, why))?;
            if !path.is_file() {
                return Err(field(name, "is not an existing file"));
            }
        }
    }
    if req.kernel.is_none() {
        for (name, value) in [("initrd", &req.initrd), ("append", &req.append)] {
            if value.is_some() {
                return Err(field(name, "needs kernel (direct kernel boot)"));
            }
        }
    }
    if req.append.as_deref().is_some_and(|a| a.contains('\0')) {
        return Err(field("append", "contains a NUL byte"));
    }
    if req.speed_bps == Some(0) {
        return Err(field(
            "speed_bps",
            "must be more than 0 (leave it out: unlimited)",
        ));
    }
    let dir = match &req.overlay_dir {
        Some(d) => {
            let path = check_plain_absolute(d).map_err(|why| field("overlay_dir", why))?;
            if !path.is_dir() {
                return Err(field("overlay_dir", "is not an existing directory"));
            }
            path.to_path_buf()
        }
        None => recovery_dir.to_path_buf(),
    };
    if req.disks.is_empty() {
        return Err(field("disks", "no disk: a recovery needs at least one"));
    }
    let mut disks: Vec<InstantDisk> = Vec::new();
    for (i, d) in req.disks.iter().enumerate() {
        let f = |name: &str| format!("disks[{i}].{name}");
        if disks.iter().any(|o| o.disk_key == d.disk_key.0) {
            return Err(field(
                f("disk_key"),
                format!("{} is given twice", d.disk_key),
            ));
        }
        if d.size_bytes == 0 {
            return Err(field(f("size_bytes"), "must be more than 0"));
        }
        let addr = crate::restore::export_addr(&d.export).map_err(|why| field(f("export"), why))?;
        if let Some(tls) = &d.export.tls {
            sendense_shared::nbd::tls::client_config(tls)
                .map_err(|e| field(f("export.tls"), e.to_string()))?;
        }
        let (server, export) = NbdServer::of(&route(addr));
        disks.push(InstantDisk {
            disk_key: d.disk_key.0,
            server,
            export,
            tls: d.export.tls.clone(),
            size: d.size_bytes,
            overlay: dir.join(format!("{}-disk-{}.qcow2", req.vm_name, d.disk_key)),
        });
    }
    Ok(InstantSpec {
        name: req.vm_name.clone(),
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        machine: machine.to_string(),
        kernel: req.kernel.clone(),
        initrd: req.initrd.clone(),
        append: req.append.clone(),
        disks,
        run_dir: run_dir.to_path_buf(),
        speed: req.speed_bps,
        paused: false,
        agent_socket: Some(agent_socket(run_dir)),
    })
}

/// The guest agent channel's socket of a recovery's VM.
fn agent_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qga.sock")
}

/// What the operator reads while the hub's exports do not answer.
fn stalled_words(stall: &crate::instant::Stall) -> String {
    let keys = stall.disks();
    let names = match keys.as_slice() {
        [] => "the recovered VM's disks".to_string(),
        [k] => format!("disk {k}"),
        _ => format!(
            "disks {}",
            keys.iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let vm = if stall.io_error {
        "the VM is paused (not crashed)"
    } else {
        "the VM runs on (a read of a block not yet home pauses it, not crashes it)"
    };
    let resumes = if keys.len() == 1 {
        "the stream resumes"
    } else {
        "the streams resume"
    };
    format!(
        "the hub's export of {names} does not answer: {vm}; what the guest wrote is kept in \
         the overlays; {resumes} when the export is back"
    )
}

#[cfg(test)]
mod tests;
