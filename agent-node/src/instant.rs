//! Instant recovery of a QEMU VM from a backup point the hub exports over NBD (issue 15): the
//! node starts a new QEMU VM whose disks are local QCOW2 overlays backed by the hub's
//! read-only exports, and pulls every block home while the guest runs.
//!
//! # block-stream, not blockdev-mirror
//!
//! Each guest disk is `qcow2 overlay (local file) → backing: nbd (the hub's export)`. The pull
//! is QEMU's `block-stream` into the overlay: it copies every cluster the overlay does not yet
//! hold from the backing NBD node, leaves alone what the guest already wrote (so the guest's
//! writes stay, with no second write path to reconcile), and at its end drops the backing
//! link: the overlay is the disk and the VM references no NBD node (asserted through
//! `query-named-block-nodes`). A `blockdev-mirror` would need a second, empty target image, a
//! mirror of every guest write into it until convergence, and a `job-complete` pivot; it copies
//! the same bytes plus the guest's writes twice, and the pivot is one more step that can fail
//! at the end. block-stream has one target (the disk the guest already uses), one job per
//! disk, and nothing to pivot; its `speed` bounds what it takes from the hub's link.
//!
//! # Failure
//!
//! The NBD nodes have `reconnect-delay`: a lost export makes QEMU reconnect in the background
//! while requests wait that long, then fail. The guest devices have `rerror=stop,werror=stop`,
//! so a failed read pauses the VM (`io-error`) instead of handing the guest an I/O error, and
//! the stream job has `on-error: stop`, so it pauses too. [`InstantVm::resume`] (`cont` and
//! `block-job-resume`) continues both once the export answers again. Cancel
//! ([`InstantVm::destroy`]) stops QEMU and removes the overlays: what the guest wrote is lost.
//!
//! # The VM outlives its handle
//!
//! QEMU runs in a process group of its own and is not killed when the [`InstantVm`] (or the
//! node daemon) goes: a recovered VM is a VM, and block-stream runs inside QEMU, so the node only
//! watches. Its PID is in `qemu.pid` of the run directory (QEMU writes it at start-up), and
//! [`InstantVm::adopt`] reconnects to a VM a previous node process started. Only
//! [`InstantVm::destroy`] and [`InstantVm::quit`] stop it; a start that fails kills what it
//! started.
//!
//! # The hub's exports
//!
//! Each disk's backing is an NBD client node on the hub's export: a unix socket or TCP
//! ([`NbdServer`]), with TLS when the hub serves its exports with x509 client certificates:
//! the export's PEMs go into `tls/<disk key>/` of the run directory (0700, files 0600, the
//! names QEMU's `tls-creds-x509` reads), and the node names the server `sendense-nbd`
//! ([`sendense_shared::nbd::tls::SERVER_NAME`]), as the node's own NBD client does: the address
//! a node reaches the export by (a tunnel forward, a socket) says nothing about who serves it.

use crate::qmp::{QmpClient, QmpLog};
use sendense_shared::api::NbdTls;
use sendense_shared::child;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Seconds a read waits for a lost export to come back before it fails (and the VM pauses).
pub const RECONNECT_DELAY_S: u32 = 5;
/// How long QEMU may take to answer on its QMP socket after it was started (or adopted).
const QMP_READY: Duration = Duration::from_secs(30);
/// How long QEMU may take to exit after SIGKILL (or `quit`).
const EXIT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum InstantError {
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("QMP of the recovered VM")]
    Qmp(#[from] crate::qmp::QmpError),
    #[error("recovered VM: {0}")]
    State(String),
    #[error("{what}")]
    Private {
        what: &'static str,
        #[source]
        source: sendense_shared::fsmode::PrivateError,
    },
}

/// Where the hub serves one disk's export (as QEMU's `nbd` driver takes its `server`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NbdServer {
    Inet { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl NbdServer {
    /// The server of an NBD address, and its export name.
    pub fn of(addr: &sendense_shared::nbd::NbdAddr) -> (NbdServer, String) {
        use sendense_shared::nbd::NbdAddr;
        match addr {
            NbdAddr::Tcp { host, port, export } => (
                NbdServer::Inet {
                    host: host.clone(),
                    port: *port,
                },
                export.clone(),
            ),
            NbdAddr::Unix { path, export } => {
                (NbdServer::Unix { path: path.clone() }, export.clone())
            }
        }
    }

    fn qapi(&self) -> Value {
        match self {
            NbdServer::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
            NbdServer::Unix { path } => json!({"type": "unix", "path": path}),
        }
    }
}

impl std::fmt::Display for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdServer::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdServer::Inet { host, port } => write!(f, "{host}:{port}"),
            NbdServer::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

/// Where one disk's data is: an NBD export of the hub.
#[derive(Debug, Clone)]
pub struct InstantDisk {
    pub disk_key: i64,
    pub server: NbdServer,
    pub export: String,
    /// x509 material when the export is served with TLS (written to `tls/<key>/`).
    pub tls: Option<NbdTls>,
    /// Virtual size of the disk (the overlay's size).
    pub size: u64,
    /// The local overlay to create (must not exist).
    pub overlay: PathBuf,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct InstantSpec {
    pub name: String,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Machine type (`q35`); always under TCG here (`accel=tcg`).
    pub machine: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub disks: Vec<InstantDisk>,
    /// The VM's private directory (0700): QMP socket, serial log, PID file, QEMU's stderr, the
    /// TLS material ([`qmp_socket`], [`serial_log`], ...).
    pub run_dir: PathBuf,
    /// block-stream's `speed` (bytes/s per disk); `None`: unlimited.
    pub speed: Option<u64>,
    /// Start with the CPUs stopped (`-S`), e.g. with no guest OS.
    pub paused: bool,
    /// The guest agent's channel (`org.qemu.guest_agent.0`) on this unix socket, when the VM
    /// had one.
    pub agent_socket: Option<PathBuf>,
}

/// The QMP socket of the VM whose run directory is `run_dir`.
pub fn qmp_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
}

/// Its serial console, a file QEMU appends to.
pub fn serial_log(run_dir: &Path) -> PathBuf {
    run_dir.join("serial.log")
}

/// QEMU's PID, written by QEMU itself (`-pidfile`) before it serves QMP.
pub fn pid_file(run_dir: &Path) -> PathBuf {
    run_dir.join("qemu.pid")
}

/// QEMU's stderr.
pub fn qemu_log(run_dir: &Path) -> PathBuf {
    run_dir.join("qemu.log")
}

/// The exports' TLS material, one directory per disk.
pub fn tls_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tls")
}

/// The `-qmp` argument naming `socket`: how start-up recovery recognises the VM's QEMU in
/// `/proc/PID/cmdline`.
pub fn qmp_arg(socket: &Path) -> String {
    format!("unix:{},server=on,wait=off", socket.display())
}

/// True when `pid` is alive and is a QEMU serving QMP on `socket` (PIDs are reused; a
/// process is never found by its name).
pub fn is_our_qemu(pid: u32, socket: &Path) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    let Some(cmdline) = child::read_cmdline(pid) else {
        return false;
    };
    let is_qemu = cmdline
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu-system-"));
    let arg = qmp_arg(socket);
    is_qemu && cmdline.windows(2).any(|w| w[0] == "-qmp" && w[1] == arg)
}

/// QEMU's PID from its PID file, if it wrote one.
pub fn read_pid_file(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file(run_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One disk's stream progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamProgress {
    pub disk_key: i64,
    pub done: u64,
    pub total: u64,
    /// `running`, `paused`, `concluded`, ... (QEMU's job status); `finished` once the job is
    /// gone and the overlay has no backing (the disk is home); `pending` while there is no job
    /// and the overlay still reads from the export (not started, or ended without bringing the
    /// disk home).
    pub status: String,
}

/// What holds a recovery up: streams paused on an error, guest devices whose I/O failed, and
/// whether the VM is paused on an I/O error. Empty and false when all is well.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stall {
    pub paused_streams: Vec<i64>,
    pub failed_devices: Vec<i64>,
    pub io_error: bool,
}

impl Stall {
    pub fn is_stalled(&self) -> bool {
        !self.paused_streams.is_empty() || !self.failed_devices.is_empty() || self.io_error
    }

    /// Every disk named by the stall, in key order, once.
    pub fn disks(&self) -> Vec<i64> {
        let mut keys: Vec<i64> = self
            .paused_streams
            .iter()
            .chain(&self.failed_devices)
            .copied()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// A running recovered VM. Dropping it leaves QEMU running (see the module docs).
pub struct InstantVm {
    pub spec: InstantSpec,
    pub qmp: QmpClient,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pid: u32,
    /// QEMU when this process started it (reaped when it stops); `None` when adopted.
    child: Option<tokio::process::Child>,
}

/// What a start made so far: undone when it fails.
#[derive(Default)]
struct Made {
    overlays: Vec<crate::fsutil::CreatedFile>,
    child: Option<tokio::process::Child>,
}

fn job_id(key: i64) -> String {
    format!("stream-{key}")
}

fn nbd_node(key: i64) -> String {
    format!("nbd-{key}")
}

fn overlay_node(key: i64) -> String {
    format!("ovl-{key}")
}

fn tls_object(key: i64) -> String {
    format!("tls-{key}")
}

impl InstantVm {
    /// Creates the overlays, writes the exports' TLS material and starts QEMU on them. On
    /// failure nothing it made is left (QEMU killed, overlays and run files removed).
    pub async fn start(spec: InstantSpec, log: Arc<QmpLog>) -> Result<InstantVm, InstantError> {
        private_dir(&spec.run_dir, "creating the recovery's run directory")?;
        let mut made = Made::default();
        match Self::launch(&spec, log, &mut made).await {
            Ok((qmp, pid)) => {
                let child = made.child.take();
                Ok(InstantVm {
                    qmp_socket: qmp_socket(&spec.run_dir),
                    serial_log: serial_log(&spec.run_dir),
                    pid,
                    child,
                    spec,
                    qmp,
                })
            }
            Err(e) => {
                if let Some(mut c) = made.child.take() {
                    let _ = c.start_kill();
                    let _ = c.wait().await;
                }
                for c in &made.overlays {
                    if let Err(e) = c.remove() {
                        tracing::warn!(error = %e, "cannot remove an overlay of a failed start");
                    }
                }
                if let Err(e) = remove_run_files(&spec) {
                    tracing::warn!(error = %e, "cannot remove the run files of a failed start");
                }
                Err(e)
            }
        }
    }

    /// The steps of [`InstantVm::start`]; what each made is kept in `made` for the cleanup of
    /// a failed start.
    async fn launch(
        spec: &InstantSpec,
        log: Arc<QmpLog>,
        made: &mut Made,
    ) -> Result<(QmpClient, u32), InstantError> {
        for d in &spec.disks {
            made.overlays
                .push(create_overlay(&d.overlay, d.size).await?);
        }
        for d in &spec.disks {
            if let Some(tls) = &d.tls {
                write_tls(&spec.run_dir, d.disk_key, tls)?;
            }
        }
        let run = &spec.run_dir;
        let qmp_path = qmp_socket(run);
        for f in [&qmp_path, &pid_file(run)] {
            remove_if_present(f)?;
        }
        let stderr = std::fs::File::create(qemu_log(run)).map_err(|source| InstantError::Io {
            what: "creating QEMU's log",
            path: qemu_log(run),
            source,
        })?;
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(command_args(spec));
        // Its own process group (no terminal's ^C, no signal to the node's group reaches it),
        // and not killed with the handle: the VM outlives the node daemon.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(false);
        tracing::info!(vm = %spec.name, command = ?cmd.as_std(), "starting the recovered VM");
        let child = made
            .child
            .insert(cmd.spawn().map_err(|source| InstantError::Io {
                what: "starting qemu-system-x86_64",
                path: PathBuf::from("qemu-system-x86_64"),
                source,
            })?);
        let pid = child
            .id()
            .ok_or_else(|| InstantError::State("QEMU exited at once".into()))?;
        let deadline = tokio::time::Instant::now() + QMP_READY;
        loop {
            if let Some(st) = child.try_wait().ok().flatten() {
                let err = std::fs::read_to_string(qemu_log(run)).unwrap_or_default();
                return Err(InstantError::Tool {
                    tool: "qemu-system-x86_64",
                    detail: format!("exited ({st}): {}", err.trim()),
                });
            }
            match QmpClient::connect(&qmp_path, &spec.name, log.clone()).await {
                Ok(c) => return Ok((c, pid)),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Reconnects to the VM of `spec` that QEMU `pid` runs (started by an earlier node
    /// process; the caller checked it with [`is_our_qemu`]).
    pub async fn adopt(
        spec: InstantSpec,
        pid: u32,
        log: Arc<QmpLog>,
    ) -> Result<InstantVm, InstantError> {
        let qmp_path = qmp_socket(&spec.run_dir);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            match QmpClient::connect(&qmp_path, &spec.name, log.clone()).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() > deadline || !child::pid_alive(pid) => {
                    return Err(e.into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Ok(InstantVm {
            serial_log: serial_log(&spec.run_dir),
            qmp_socket: qmp_path,
            spec,
            qmp,
            pid,
            child: None,
        })
    }

    /// The QEMU process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether QEMU still runs.
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            // Reaps it when it exited (a zombie of ours is not alive).
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => child::pid_alive(self.pid),
        }
    }

    /// Starts one block-stream job per disk (`on-error: stop`, the spec's `speed`).
    pub async fn start_streams(&self) -> Result<(), InstantError> {
        for d in &self.spec.disks {
            self.start_stream(d.disk_key).await?;
        }
        Ok(())
    }

    /// Starts the stream of disk `key` (again, when an earlier one ended without finishing).
    pub async fn start_stream(&self, key: i64) -> Result<(), InstantError> {
        let mut args = json!({
            "job-id": job_id(key), "device": overlay_node(key),
            "on-error": "stop", "auto-dismiss": true,
        });
        if let Some(s) = self.spec.speed {
            args["speed"] = json!(s);
        }
        self.qmp.execute("block-stream", args).await?;
        Ok(())
    }

    /// A new bound of every disk's stream (`None`: none): the running jobs take it at once
    /// (`block-job-set-speed`), a stream started later starts with it.
    pub async fn set_speed(&mut self, speed: Option<u64>) -> Result<(), InstantError> {
        self.spec.speed = speed;
        let jobs = self.qmp.execute("query-block-jobs", json!({})).await?;
        for d in &self.spec.disks {
            let id = job_id(d.disk_key);
            let running = jobs
                .as_array()
                .into_iter()
                .flatten()
                .any(|j| j.get("device").and_then(Value::as_str) == Some(id.as_str()));
            if running {
                self.qmp
                    .execute(
                        "block-job-set-speed",
                        json!({"device": id, "speed": speed.unwrap_or(0)}),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Each disk's stream progress (`query-block-jobs`; for a disk without a job,
    /// `query-named-block-nodes` says whether its overlay still has a backing).
    pub async fn progress(&self) -> Result<Vec<StreamProgress>, InstantError> {
        let jobs = self.qmp.execute("query-block-jobs", json!({})).await?;
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        let job = |key: i64| {
            let id = job_id(key);
            jobs.iter()
                .find(|j| j.get("device").and_then(Value::as_str) == Some(&id))
                .cloned()
        };
        let backed: Vec<i64> = if self.spec.disks.iter().any(|d| job(d.disk_key).is_none()) {
            let nodes = self
                .qmp
                .execute("query-named-block-nodes", json!({"flat": true}))
                .await?;
            self.spec
                .disks
                .iter()
                .map(|d| d.disk_key)
                .filter(|k| {
                    nodes.as_array().into_iter().flatten().any(|n| {
                        n.get("node-name").and_then(Value::as_str) == Some(&overlay_node(*k))
                            && n.get("backing_file").and_then(Value::as_str).is_some()
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(self
            .spec
            .disks
            .iter()
            .map(|d| match job(d.disk_key) {
                Some(j) => StreamProgress {
                    disk_key: d.disk_key,
                    done: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
                    total: j.get("len").and_then(Value::as_u64).unwrap_or(d.size),
                    status: j
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("running")
                        .to_string(),
                },
                None if backed.contains(&d.disk_key) => StreamProgress {
                    disk_key: d.disk_key,
                    done: 0,
                    total: d.size,
                    status: "pending".into(),
                },
                None => StreamProgress {
                    disk_key: d.disk_key,
                    done: d.size,
                    total: d.size,
                    status: "finished".into(),
                },
            })
            .collect())
    }

    /// QEMU's run state (`running`, `paused`, `io-error`, ...).
    pub async fn run_state(&self) -> Result<String, InstantError> {
        let s = self.qmp.execute("query-status", json!({})).await?;
        Ok(s.get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// What holds the recovery up now (see [`Stall`]): [`InstantVm::stall`] of fresh figures.
    pub async fn stalled(&self) -> Result<Stall, InstantError> {
        let progress = self.progress().await?;
        let state = self.run_state().await?;
        self.stall(&progress, &state).await
    }

    /// The stall of figures already read: streams paused on an error, the guest devices whose
    /// I/O failed (`query-block`'s `io-status`: the disks a paused VM waits for), and whether
    /// the VM is paused on an I/O error.
    pub async fn stall(
        &self,
        progress: &[StreamProgress],
        run_state: &str,
    ) -> Result<Stall, InstantError> {
        let paused_streams: Vec<i64> = progress
            .iter()
            .filter(|p| p.status == "paused")
            .map(|p| p.disk_key)
            .collect();
        let io_error = run_state == "io-error";
        let mut failed_devices = Vec::new();
        if io_error || !paused_streams.is_empty() {
            let block = self.qmp.execute("query-block", json!({})).await?;
            for dev in block.as_array().into_iter().flatten() {
                if dev.get("io-status").and_then(Value::as_str) != Some("failed") {
                    continue;
                }
                let qdev = dev.get("qdev").and_then(Value::as_str).unwrap_or_default();
                if let Some(d) = self
                    .spec
                    .disks
                    .iter()
                    .find(|d| qdev.contains(&format!("/disk{}/", d.disk_key)))
                {
                    failed_devices.push(d.disk_key);
                }
            }
        }
        Ok(Stall {
            paused_streams,
            failed_devices,
            io_error,
        })
    }

    /// Continues the VM and every stream `stall` names as paused, after the export came back
    /// (they pause again while the export is still gone).
    pub async fn resume(&self, stall: &Stall) -> Result<(), InstantError> {
        for k in &stall.paused_streams {
            self.qmp
                .execute("block-job-resume", json!({"device": job_id(*k)}))
                .await?;
        }
        if stall.io_error {
            self.qmp.execute("cont", json!({})).await?;
        }
        Ok(())
    }

    /// Names of the NBD nodes the VM still references.
    pub async fn nbd_nodes(&self) -> Result<Vec<String>, InstantError> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n.get("drv").and_then(Value::as_str) == Some("nbd"))
            .filter_map(|n| n.get("node-name").and_then(Value::as_str))
            .map(str::to_string)
            .collect())
    }

    /// Removes the NBD nodes once no stream needs them, then the TLS credentials they used;
    /// answers an error naming a node that is still in use (a stream not finished).
    pub async fn drop_nbd_nodes(&self) -> Result<(), InstantError> {
        for name in self.nbd_nodes().await? {
            self.qmp
                .execute("blockdev-del", json!({"node-name": name}))
                .await?;
        }
        let left = self.nbd_nodes().await?;
        if !left.is_empty() {
            return Err(InstantError::State(format!(
                "NBD nodes still referenced: {}",
                left.join(", ")
            )));
        }
        // Asked of QEMU, not the spec: an adopted VM's spec has no TLS material.
        let objects = self
            .qmp
            .execute("qom-list", json!({"path": "/objects"}))
            .await?;
        for d in &self.spec.disks {
            let id = tls_object(d.disk_key);
            if objects
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o.get("name").and_then(Value::as_str) == Some(&id))
            {
                self.qmp.execute("object-del", json!({"id": id})).await?;
            }
        }
        Ok(())
    }

    /// Removes the exports' TLS material (once no NBD node uses it).
    pub fn remove_tls(&self) -> Result<(), InstantError> {
        remove_dir_if_present(&tls_dir(&self.spec.run_dir))
    }

    /// SIGKILL by PID (an adopted PID only while it is still the VM's QEMU), then waits until it
    /// is gone (reaped when it is this process's child).
    async fn kill(&mut self) -> Result<(), InstantError> {
        match &mut self.child {
            Some(c) => {
                let _ = c.start_kill();
                if tokio::time::timeout(EXIT_WAIT, c.wait()).await.is_err() {
                    return Err(InstantError::State(format!(
                        "QEMU PID {} still runs {EXIT_WAIT:?} after SIGKILL",
                        self.pid
                    )));
                }
            }
            None => {
                if is_our_qemu(self.pid, &self.qmp_socket) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let deadline = tokio::time::Instant::now() + EXIT_WAIT;
                while child::pid_alive(self.pid) {
                    if tokio::time::Instant::now() > deadline {
                        return Err(InstantError::State(format!(
                            "QEMU PID {} still runs {EXIT_WAIT:?} after SIGKILL",
                            self.pid
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }

    /// Stops QEMU (SIGKILL by PID, then reaped) and removes the overlays and run files:
    /// whatever the guest wrote is lost.
    pub async fn destroy(mut self) -> Result<(), InstantError> {
        self.kill().await?;
        for d in &self.spec.disks {
            remove_if_present(&d.overlay)?;
        }
        remove_run_files(&self.spec)
    }

    /// Stops QEMU gracefully (`quit`) keeping the overlays (the recovered disks).
    pub async fn quit(mut self) -> Result<(), InstantError> {
        let _ = self.qmp.execute("quit", json!({})).await;
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        while self.is_alive() {
            if tokio::time::Instant::now() > deadline {
                return self.kill().await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// QEMU's command line for `spec` (after the binary).
fn command_args(spec: &InstantSpec) -> Vec<String> {
    let run = &spec.run_dir;
    let mut a: Vec<String> = vec![
        "-machine".into(),
        format!("{},accel=tcg", spec.machine),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-name".into(),
        spec.name.clone(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.cpus.max(1).to_string(),
        "-qmp".into(),
        qmp_arg(&qmp_socket(run)),
        "-serial".into(),
        format!("file:{}", serial_log(run).display()),
        "-pidfile".into(),
        pid_file(run).display().to_string(),
    ];
    if spec.paused {
        a.push("-S".into());
    }
    if let Some(s) = &spec.agent_socket {
        a.extend([
            "-device".into(),
            "virtio-serial".into(),
            "-chardev".into(),
            format!("socket,path={},server=on,wait=off,id=qga0", s.display()),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
    }
    if let Some(k) = &spec.kernel {
        a.extend(["-kernel".into(), k.clone()]);
        if let Some(i) = &spec.initrd {
            a.extend(["-initrd".into(), i.clone()]);
        }
        if let Some(ap) = &spec.append {
            a.extend(["-append".into(), ap.clone()]);
        }
    }
    for d in &spec.disks {
        let k = d.disk_key;
        let mut nbd = json!({
            "driver": "nbd", "node-name": nbd_node(k), "read-only": true,
            "server": d.server.qapi(),
            "export": d.export, "reconnect-delay": RECONNECT_DELAY_S,
        });
        if d.tls.is_some() {
            // JSON: a directory name with a comma cannot break the option.
            a.extend([
                "-object".into(),
                json!({
                    "qom-type": "tls-creds-x509", "id": tls_object(k),
                    "dir": tls_dir(run).join(k.to_string()), "endpoint": "client",
                    "verify-peer": true,
                })
                .to_string(),
            ]);
            nbd["tls-creds"] = json!(tls_object(k));
            nbd["tls-hostname"] = json!(sendense_shared::nbd::tls::SERVER_NAME);
        }
        a.extend(["-blockdev".into(), nbd.to_string()]);
        a.extend([
            "-blockdev".into(),
            json!({
                "driver": "qcow2", "node-name": overlay_node(k),
                "file": {"driver": "file", "filename": d.overlay},
                "backing": nbd_node(k),
            })
            .to_string(),
        ]);
        a.extend([
            "-device".into(),
            format!(
                "virtio-blk-pci,id=disk{k},drive={},rerror=stop,werror=stop",
                overlay_node(k)
            ),
        ]);
    }
    a
}

/// The run files of `spec`'s VM (sockets, logs, PID file, TLS material), then its run
/// directory when nothing else is left in it.
fn remove_run_files(spec: &InstantSpec) -> Result<(), InstantError> {
    let run = &spec.run_dir;
    for f in [
        qmp_socket(run),
        serial_log(run),
        pid_file(run),
        qemu_log(run),
    ]
    .iter()
    .chain(spec.agent_socket.iter())
    {
        remove_if_present(f)?;
    }
    remove_dir_if_present(&tls_dir(run))?;
    match std::fs::remove_dir(run) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Not empty: someone else's files; left.
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
        Err(source) => Err(InstantError::Io {
            what: "removing",
            path: run.clone(),
            source,
        }),
    }
}

/// A 0700 directory of this user's, not a symlink ([`sendense_shared::fsmode::private_dir`]).
fn private_dir(path: &Path, what: &'static str) -> Result<(), InstantError> {
    sendense_shared::fsmode::private_dir(path)
        .map_err(|source| InstantError::Private { what, source })
}

/// `tls/<key>/{ca-cert,client-cert,client-key}.pem`: the names QEMU's `tls-creds-x509` reads
/// on the client side; directories 0700, files 0600 (the key is the job's credential).
fn write_tls(run_dir: &Path, key: i64, tls: &NbdTls) -> Result<(), InstantError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let top = tls_dir(run_dir);
    private_dir(&top, "creating the TLS directory")?;
    let dir = top.join(key.to_string());
    private_dir(&dir, "creating the TLS directory")?;
    for (name, pem) in [
        ("ca-cert.pem", &tls.ca_pem),
        ("client-cert.pem", &tls.cert_pem),
        ("client-key.pem", &tls.key_pem),
    ] {
        let path = dir.join(name);
        let io = |source| InstantError::Io {
            what: "writing TLS material",
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
    }
    Ok(())
}

fn remove_if_present(p: &Path) -> Result<(), InstantError> {
    crate::fsutil::remove_if_present(p).map_err(|source| InstantError::Io {
        what: "removing",
        path: p.to_path_buf(),
        source,
    })
}

fn remove_dir_if_present(p: &Path) -> Result<(), InstantError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(InstantError::Io {
            what: "removing",
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// A new, empty QCOW2 of `size`, created exclusively with mode 0600 (the backing is given at
/// open time): an existing file or a symlink at `path` is refused and left alone.
async fn create_overlay(
    path: &Path,
    size: u64,
) -> Result<crate::fsutil::CreatedFile, InstantError> {
    let created = match crate::fsutil::CreatedFile::create(path, 0o600) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(InstantError::State(format!(
                "overlay {} exists already",
                path.display()
            )));
        }
        Err(source) => {
            return Err(InstantError::Io {
                what: "creating the overlay",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Through the created inode, not the path (which may have been swapped meanwhile).
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(created.fd_path())
        .arg(size.to_string())
        .output()
        .await;
    let failed = match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(InstantError::Tool {
            tool: "qemu-img create",
            detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        }),
        Err(source) => Some(InstantError::Io {
            what: "running qemu-img create",
            path: path.to_path_buf(),
            source,
        }),
    };
    match failed {
        None => Ok(created),
        Some(e) => {
            let _ = created.remove();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tls: bool) -> InstantSpec {
        InstantSpec {
            name: "vm1".into(),
            memory_mib: 64,
            cpus: 1,
            machine: "q35".into(),
            kernel: None,
            initrd: None,
            append: None,
            disks: vec![
                InstantDisk {
                    disk_key: 2000,
                    server: NbdServer::Unix {
                        path: "/run/sendense-nbd/10100.sock".into(),
                    },
                    export: "vm-disk-2000".into(),
                    tls: tls.then(|| NbdTls {
                        ca_pem: "CA".into(),
                        cert_pem: "CERT".into(),
                        key_pem: "KEY".into(),
                    }),
                    size: 1 << 20,
                    overlay: "/data/vm1-disk-2000.qcow2".into(),
                },
                InstantDisk {
                    disk_key: 2001,
                    server: NbdServer::Inet {
                        host: "127.0.0.2".into(),
                        port: 10101,
                    },
                    export: "vm-disk-2001".into(),
                    tls: None,
                    size: 1 << 20,
                    overlay: "/data/vm1-disk-2001.qcow2".into(),
                },
            ],
            run_dir: "/run/node/recovery-r1".into(),
            speed: None,
            paused: false,
            agent_socket: Some("/run/node/recovery-r1/qga.sock".into()),
        }
    }

    fn blockdevs(args: &[String]) -> Vec<Value> {
        args.windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect()
    }

    #[test]
    fn unix_and_inet_exports_and_tls_on_the_nbd_node() {
        let args = command_args(&spec(true));
        let nbd = blockdevs(&args);
        assert_eq!(
            nbd[0]["server"],
            json!({"type": "unix", "path": "/run/sendense-nbd/10100.sock"})
        );
        assert_eq!(nbd[0]["tls-creds"], "tls-2000");
        assert_eq!(nbd[0]["tls-hostname"], "sendense-nbd");
        assert_eq!(
            nbd[2]["server"],
            json!({"type": "inet", "host": "127.0.0.2", "port": "10101"})
        );
        assert!(nbd[2].get("tls-creds").is_none(), "{}", nbd[2]);
        let objects: Vec<Value> = args
            .windows(2)
            .filter(|w| w[0] == "-object")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(
            objects,
            vec![json!({
                "qom-type": "tls-creds-x509", "id": "tls-2000",
                "dir": "/run/node/recovery-r1/tls/2000", "endpoint": "client",
                "verify-peer": true,
            })]
        );
        // Not paused, may reboot, recognisable by its QMP socket, writes its PID.
        assert!(
            !args.iter().any(|a| a == "-S" || a == "-no-reboot"),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w[0] == "-qmp"
                && w[1] == "unix:/run/node/recovery-r1/qmp.sock,server=on,wait=off"),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "-pidfile" && w[1] == "/run/node/recovery-r1/qemu.pid")
        );
        assert!(args.iter().any(|a| a.contains("org.qemu.guest_agent.0")));
        assert!(!command_args(&spec(false)).iter().any(|a| a == "-object"));
    }

    #[test]
    fn tls_material_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tls = spec(true).disks[0].tls.clone().unwrap();
        write_tls(dir.path(), 7, &tls).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tls_dir(dir.path())), 0o700);
        let d = tls_dir(dir.path()).join("7");
        assert_eq!(mode(&d), 0o700);
        for (f, want) in [
            ("ca-cert.pem", "CA"),
            ("client-cert.pem", "CERT"),
            ("client-key.pem", "KEY"),
        ] {
            assert_eq!(mode(&d.join(f)), 0o600, "{f}");
            assert_eq!(std::fs::read_to_string(d.join(f)).unwrap(), want);
        }
    }

    #[test]
    fn a_stall_names_each_disk_once() {
        let s = Stall {
            paused_streams: vec![3, 1],
            failed_devices: vec![1],
            io_error: true,
        };
        assert!(s.is_stalled());
        assert_eq!(s.disks(), vec![1, 3]);
        assert!(!Stall::default().is_stalled());
    }
}
