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

use crate::qmp::{QmpClient, QmpLog};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Seconds a read waits for a lost export to come back before it fails (and the VM pauses).
pub const RECONNECT_DELAY_S: u32 = 5;

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
}

/// Where one disk's data is: an NBD export of the hub (`127.0.0.1:port`, `export`).
#[derive(Debug, Clone)]
pub struct InstantDisk {
    pub disk_key: i64,
    pub host: String,
    pub port: u16,
    pub export: String,
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
    /// QMP socket and serial log live here (0700).
    pub run_dir: PathBuf,
    /// block-stream's `speed` (bytes/s per disk); `None`: unlimited.
    pub speed: Option<u64>,
    /// Start with the CPUs stopped (`-S`), e.g. with no guest OS.
    pub paused: bool,
    /// The guest agent's channel (`org.qemu.guest_agent.0`) on this unix socket, when the VM
    /// had one.
    pub agent_socket: Option<PathBuf>,
}

/// One disk's stream progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamProgress {
    pub disk_key: i64,
    pub done: u64,
    pub total: u64,
    /// `running`, `paused`, `concluded`, ... (QEMU's job status); `finished` once gone.
    pub status: String,
}

/// A running recovered VM.
pub struct InstantVm {
    pub spec: InstantSpec,
    pub qmp: QmpClient,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    child: tokio::process::Child,
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

impl InstantVm {
    /// Creates the overlays and starts QEMU on them.
    pub async fn start(spec: InstantSpec, log: Arc<QmpLog>) -> Result<InstantVm, InstantError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spec.run_dir)
            .map_err(|source| InstantError::Io {
                what: "creating the recovery's run directory",
                path: spec.run_dir.clone(),
                source,
            })?;
        for d in &spec.disks {
            create_overlay(&d.overlay, d.size).await?;
        }
        let qmp_socket = spec.run_dir.join(format!("{}.qmp", spec.name));
        let serial_log = spec.run_dir.join(format!("{}.serial", spec.name));
        let _ = std::fs::remove_file(&qmp_socket);
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.arg("-machine")
            .arg(format!("{},accel=tcg", spec.machine))
            .args(["-nodefaults", "-display", "none", "-name", &spec.name])
            .arg("-m")
            .arg(spec.memory_mib.to_string())
            .arg("-smp")
            .arg(spec.cpus.max(1).to_string())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial_log.display()));
        if spec.paused {
            cmd.arg("-S");
        }
        if let Some(s) = &spec.agent_socket {
            cmd.args(["-device", "virtio-serial", "-chardev"])
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=qga0",
                    s.display()
                ))
                .args([
                    "-device",
                    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        if let Some(k) = &spec.kernel {
            cmd.arg("-kernel").arg(k);
            if let Some(i) = &spec.initrd {
                cmd.arg("-initrd").arg(i);
            }
            if let Some(a) = &spec.append {
                cmd.arg("-append").arg(a);
            }
        }
        for d in &spec.disks {
            let k = d.disk_key;
            cmd.arg("-blockdev").arg(
                json!({
                    "driver": "nbd", "node-name": nbd_node(k), "read-only": true,
                    "server": {"type": "inet", "host": d.host, "port": d.port.to_string()},
                    "export": d.export, "reconnect-delay": RECONNECT_DELAY_S,
                })
                .to_string(),
            );
            cmd.arg("-blockdev").arg(
                json!({
                    "driver": "qcow2", "node-name": overlay_node(k),
                    "file": {"driver": "file", "filename": d.overlay},
                    "backing": nbd_node(k),
                })
                .to_string(),
            );
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,id=disk{k},drive={},rerror=stop,werror=stop",
                overlay_node(k)
            ));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| InstantError::Io {
            what: "starting qemu-system-x86_64",
            path: PathBuf::from("qemu-system-x86_64"),
            source,
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let qmp = loop {
            if let Some(st) = child.try_wait().ok().flatten() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(InstantError::Tool {
                    tool: "qemu-system-x86_64",
                    detail: format!("exited ({st}): {}", err.trim()),
                });
            }
            match QmpClient::connect(&qmp_socket, &spec.name, log.clone()).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Ok(InstantVm {
            spec,
            qmp,
            qmp_socket,
            serial_log,
            child,
        })
    }

    /// The QEMU process.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts one block-stream job per disk (`on-error: stop`, the spec's `speed`).
    pub async fn start_streams(&self) -> Result<(), InstantError> {
        for d in &self.spec.disks {
            let mut args = json!({
                "job-id": job_id(d.disk_key), "device": overlay_node(d.disk_key),
                "on-error": "stop", "auto-dismiss": true,
            });
            if let Some(s) = self.spec.speed {
                args["speed"] = json!(s);
            }
            self.qmp.execute("block-stream", args).await?;
        }
        Ok(())
    }

    /// Each disk's stream progress (`query-block-jobs`); a disk whose job is gone is
    /// `finished` (done = total).
    pub async fn progress(&self) -> Result<Vec<StreamProgress>, InstantError> {
        let jobs = self.qmp.execute("query-block-jobs", json!({})).await?;
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        Ok(self
            .spec
            .disks
            .iter()
            .map(|d| {
                let id = job_id(d.disk_key);
                match jobs
                    .iter()
                    .find(|j| j.get("device").and_then(Value::as_str) == Some(&id))
                {
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
                    None => StreamProgress {
                        disk_key: d.disk_key,
                        done: d.size,
                        total: d.size,
                        status: "finished".into(),
                    },
                }
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

    /// What stopped: the disks whose stream is paused on an error, and whether the VM is
    /// paused on an I/O error; empty and false when all is well.
    pub async fn stalled(&self) -> Result<(Vec<i64>, bool), InstantError> {
        let paused: Vec<i64> = self
            .progress()
            .await?
            .into_iter()
            .filter(|p| p.status == "paused")
            .map(|p| p.disk_key)
            .collect();
        Ok((paused, self.run_state().await? == "io-error"))
    }

    /// Continues the VM and every paused stream after the export came back.
    pub async fn resume(&self) -> Result<(), InstantError> {
        let (paused, io_error) = self.stalled().await?;
        for k in paused {
            self.qmp
                .execute("block-job-resume", json!({"device": job_id(k)}))
                .await?;
        }
        if io_error {
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

    /// Removes the NBD nodes once no stream needs them; answers an error naming a node that
    /// is still in use (a stream not finished).
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
        Ok(())
    }

    /// Stops QEMU (SIGKILL by PID, then reaped) and removes the overlays and run files:
    /// whatever the guest wrote is lost.
    pub async fn destroy(mut self) -> Result<(), InstantError> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        for d in &self.spec.disks {
            remove_if_present(&d.overlay)?;
        }
        remove_if_present(&self.qmp_socket)?;
        remove_if_present(&self.serial_log)?;
        Ok(())
    }

    /// Stops QEMU gracefully (`quit`) keeping the overlays (the recovered disks).
    pub async fn quit(mut self) -> Result<(), InstantError> {
        let _ = self.qmp.execute("quit", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        Ok(())
    }
}

fn remove_if_present(p: &Path) -> Result<(), InstantError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(InstantError::Io {
            what: "removing",
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// A new, empty QCOW2 of `size` with mode 0600 (the backing is given at open time).
async fn create_overlay(path: &Path, size: u64) -> Result<(), InstantError> {
    if path.exists() {
        return Err(InstantError::State(format!(
            "overlay {} exists already",
            path.display()
        )));
    }
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|source| InstantError::Io {
            what: "running qemu-img create",
            path: path.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(InstantError::Tool {
            tool: "qemu-img create",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        InstantError::Io {
            what: "making the overlay 0600",
            path: path.to_path_buf(),
            source,
        }
    })
}
