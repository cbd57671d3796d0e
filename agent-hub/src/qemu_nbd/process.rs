//! One running qemu-nbd: spawned in its own process group, ready once an NBD handshake for its
//! export is answered by the spawned PID itself, stopped by SIGTERM to the group, and the cause
//! of an early exit read from its stderr.

use std::fmt;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sendense_shared::child::{ChildError, ExitReport, StartGuard, Supervised};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

use super::QemuNbdError;
use super::config::{ExportSpec, QemuNbdConfig, adapt_to_file_system, command_args};

/// Bound on one handshake attempt while waiting for readiness (a listener that accepts but
/// never answers must not eat the whole ready timeout in one attempt).
const PROBE_ATTEMPT_BOUND: Duration = Duration::from_secs(2);

/// A running qemu-nbd serving one export. Clones share the process.
#[derive(Clone)]
pub struct QemuNbd {
    inner: Arc<Inner>,
}

struct Inner {
    child: Supervised,
    spec: ExportSpec,
    host: IpAddr,
    started_at: DateTime<Utc>,
    stop_grace: Duration,
    /// The hub's client certificate when the export requires TLS.
    hub_tls: Option<sendense_shared::api::NbdTls>,
}

impl fmt::Debug for QemuNbd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuNbd")
            .field("pid", &self.pid())
            .field("spec", &self.inner.spec)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl QemuNbd {
    /// Spawns qemu-nbd and returns once an NBD handshake for its export succeeds against the
    /// spawned process. If it exits first, the error carries the cause read from its stderr; if
    /// it does not answer within `ready_timeout`, it is stopped and the error says so.
    ///
    /// Cancel-safe: if this future is dropped before it returns (a job cancelled while its
    /// exports start), the half-started qemu-nbd gets SIGKILL and is reaped, as nobody could
    /// record or stop it otherwise.
    pub async fn start(cfg: &QemuNbdConfig, spec: ExportSpec) -> Result<QemuNbd, QemuNbdError> {
        cfg.validate()?;
        spec.validate()?;
        let spec = spec.placed(cfg);
        let shared_socket = spec.in_socket_dir(cfg);
        let cfg = &adapt_to_file_system(cfg, &spec.qcow2_path);
        let hub_tls = cfg
            .tls
            .as_ref()
            .filter(|_| spec.uses_tls(cfg))
            .map(|ca| ca.hub_client().clone());
        let mut cmd = Command::new(&cfg.binary);
        cmd.args(command_args(cfg, &spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = Supervised::spawn(cmd).map_err(|e| QemuNbdError::Spawn {
            binary: cfg.binary.clone(),
            source: match e {
                ChildError::Spawn { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            },
        })?;
        let started_at = Utc::now();
        tracing::info!(
            pid = child.pid(),
            port = spec.port,
            export = %spec.export_name,
            command = %child.command_line_string(),
            "started qemu-nbd"
        );
        let unfinished = StartGuard::new(&child, "qemu-nbd");
        let qn = QemuNbd {
            inner: Arc::new(Inner {
                child,
                spec,
                host: cfg.connect_host(),
                started_at,
                stop_grace: cfg.stop_grace,
                hub_tls,
            }),
        };
        let ready = match qn.wait_ready(cfg.ready_timeout).await {
            Ok(waited) if shared_socket => qn.share_socket().map(|()| waited),
            other => other,
        };
        unfinished.defuse();
        match ready {
            Ok(waited) => {
                tracing::info!(
                    pid = qn.pid(),
                    port = qn.inner.spec.port,
                    ?waited,
                    "qemu-nbd ready"
                );
                Ok(qn)
            }
            Err(e) => {
                // Whatever the failure, leave no process behind.
                qn.stop().await;
                tracing::warn!(error = %e, "qemu-nbd failed to start");
                Err(e)
            }
        }
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<Duration, QemuNbdError> {
        let spec = &self.inner.spec;
        let addr = self.nbd_addr();
        let begin = Instant::now();
        let deadline = begin + timeout;
        let mut pause = Duration::from_millis(5);
        let mut last_error = "no attempt finished".to_string();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QemuNbdError::NotReady {
                    pid: self.pid(),
                    port: spec.port,
                    export: spec.export_name.clone(),
                    waited: timeout,
                    last_error,
                });
            }
            // With TLS the probe presents the hub's certificate: a handshake that passes the
            // authz proves the export is up as it will be served.
            let opts = ConnectOptions {
                connect_timeout: remaining.min(PROBE_ATTEMPT_BOUND),
                ..self.hub_connect_options()
            };
            tokio::select! {
                biased;
                report = self.inner.child.exited() => {
                    return Err(self.exited_error(report));
                }
                probe = NbdClient::connect(&addr, &opts) => match probe {
                    Ok(client) => {
                        let _ = client.disconnect().await;
                        // A unix socket in the hub's private directory cannot be squatted.
                        if spec.socket.is_some() || listens_on(self.pid(), spec.port) {
                            return Ok(begin.elapsed());
                        }
                        last_error = format!(
                            "the handshake on port {} was answered by another process",
                            spec.port
                        );
                    }
                    Err(e) => last_error = e.to_string(),
                },
            }
            tokio::select! {
                biased;
                report = self.inner.child.exited() => {
                    return Err(self.exited_error(report));
                }
                _ = tokio::time::sleep(pause.min(remaining)) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Opens a socket of the shared directory to the directory's group (the tunnel user): mode
    /// 0660 and that group. qemu-nbd created it with the hub's umask, so until here only the
    /// hub could connect, which fails closed; the directory's 0750 keeps everyone else out.
    fn share_socket(&self) -> Result<(), QemuNbdError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let spec = &self.inner.spec;
        let Some(path) = &spec.socket else {
            return Ok(());
        };
        let fail = |source: std::io::Error| QemuNbdError::Socket {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(path);
        let gid = std::fs::metadata(dir).map_err(fail)?.gid();
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| fail(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(fail)
    }

    fn exited_error(&self, report: Option<ExitReport>) -> QemuNbdError {
        let spec = &self.inner.spec;
        let (status, stderr) = match report {
            Some(r) => (r.status, r.stderr_tail),
            None => ("unknown".to_string(), self.inner.child.stderr_tail()),
        };
        QemuNbdError::ExitedBeforeReady {
            pid: self.pid(),
            export: spec.export_name.clone(),
            port: spec.port,
            status,
            cause: diagnose(&stderr, spec),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.inner.child.pid()
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.inner.started_at
    }

    pub fn spec(&self) -> &ExportSpec {
        &self.inner.spec
    }

    /// The full command line as spawned (binary first).
    pub fn command_line(&self) -> &[String] {
        self.inner.child.command_line()
    }

    /// Where a client reaches this export.
    pub fn nbd_addr(&self) -> NbdAddr {
        if let Some(path) = &self.inner.spec.socket {
            return NbdAddr::Unix {
                path: path.clone(),
                export: self.inner.spec.export_name.clone(),
            };
        }
        NbdAddr::Tcp {
            host: self.inner.host.to_string(),
            port: self.inner.spec.port,
            export: self.inner.spec.export_name.clone(),
        }
    }

    /// How the hub itself connects (its client certificate when the export requires TLS).
    pub fn hub_connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            tls: self.inner.hub_tls.clone(),
            ..ConnectOptions::default()
        }
    }

    /// A fresh client certificate for the spec's client (the job's writer), when the export
    /// requires TLS; it goes into the start request, never into a log.
    pub fn client_tls(
        &self,
        ca: Option<&crate::nbd_ca::NbdCa>,
    ) -> Result<Option<sendense_shared::api::NbdTls>, QemuNbdError> {
        match (ca, &self.inner.spec.client) {
            (Some(ca), Some(cn)) if self.requires_tls() => ca
                .issue_client(cn)
                .map(Some)
                .map_err(QemuNbdError::ClientCert),
            _ => Ok(None),
        }
    }

    /// Where a client reaches this export, as one entry of the targets string.
    pub fn nbd_uri(&self) -> sendense_shared::targets::NbdUri {
        self.nbd_export().into()
    }

    /// Whether clients need a certificate (the hub's `nbd_tls`, an export a node opens).
    pub fn requires_tls(&self) -> bool {
        self.inner.hub_tls.is_some()
    }

    /// Where a client reaches this export, as the API's structured form (an IPv6 host is put in
    /// brackets only when it is written as a URI).
    pub fn nbd_export(&self) -> sendense_shared::api::NbdExport {
        sendense_shared::api::NbdExport {
            host: self.inner.host.to_string(),
            port: self.inner.spec.port,
            export: self.inner.spec.export_name.clone(),
            socket: self
                .inner
                .spec
                .socket
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            // The caller adds the client's own certificate ([`crate::nbd_ca::NbdCa`]).
            tls: None,
        }
    }

    /// `None` while it runs, `Some(report)` once it exited for any cause; `report.to_string()`
    /// ("exit status 1: qemu-nbd: ...") is what an operator should see.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitReport>> {
        self.inner.child.exit_watch()
    }

    pub fn is_alive(&self) -> bool {
        self.inner.child.is_alive()
    }

    /// SIGTERM to its group, `stop_grace`, SIGKILL, reap. Idempotent.
    pub async fn stop(&self) -> ExitReport {
        let report = self.inner.child.stop(self.inner.stop_grace).await;
        tracing::info!(
            pid = self.pid(),
            port = self.inner.spec.port,
            status = %report.status,
            "qemu-nbd stopped"
        );
        report
    }
}

/// Turns qemu-nbd's stderr into the cause an operator needs, keeping its own words after it.
fn diagnose(stderr: &str, spec: &ExportSpec) -> String {
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let path = spec.qcow2_path.display();
    let cause = if stderr.contains("Address already in use") {
        format!("port {} already in use", spec.port)
    } else if stderr.contains("Cannot assign requested address") {
        "the bind address is not on this host".to_string()
    } else if stderr.contains("Could not open backing file") {
        format!("the backing file of {path} cannot be opened")
    } else if stderr.contains("No such file or directory") {
        format!("image {path} not found")
    } else if stderr.contains("Permission denied") {
        format!("permission denied opening {path}")
    } else if stderr.contains("Failed to get") && stderr.contains("lock") {
        format!("image {path} is in use by another process")
    } else if stderr.contains("not in qcow2 format") {
        format!("{path} is not a qcow2 image")
    } else if last.is_empty() {
        return "it wrote nothing on stderr".to_string();
    } else {
        return last.trim_start_matches("qemu-nbd: ").to_string();
    };
    format!("{cause} ({last})")
}

/// True when `pid` holds a listening TCP socket on `port` (any address), from
/// `/proc/net/tcp{,6}` and `/proc/PID/fd`.
fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_nbd::test_support::spec;

    #[test]
    fn diagnosis_names_the_cause() {
        let s = spec();
        assert_eq!(
            diagnose(
                "qemu-nbd: Failed to find an available port: Address already in use\n",
                &s
            ),
            "port 10105 already in use (qemu-nbd: Failed to find an available port: Address already in use)"
        );
        let missing = "qemu-nbd: Failed to blk_new_open '/repo/vm1/2000/b1.qcow2': Could not open \
                       '/repo/vm1/2000/b1.qcow2': No such file or directory\n";
        assert!(diagnose(missing, &s).starts_with("image /repo/vm1/2000/b1.qcow2 not found ("));
        assert_eq!(diagnose("qemu-nbd: something new\n", &s), "something new");
        assert_eq!(diagnose("", &s), "it wrote nothing on stderr");
    }
}
