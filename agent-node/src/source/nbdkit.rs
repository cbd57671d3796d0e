//! One nbdkit per disk of a vSphere snapshot: the NBD export the copy engine reads.
//!
//! Each nbdkit is a supervised child in its own process group ([`sendense_shared::child`]), the
//! way the hub runs qemu-nbd:
//! `nbdkit --exit-with-parent --foreground --readonly --unix SOCK --exportname NAME PLUGIN ...`.
//!
//! - Plugin `curl` (no VDDK here): `url=<datastore file URL> protocols=https`, the cookie as
//!   `cookie-script='cat <file>' cookie-script-renew=<secs>` (or `cookie=+<file>` read once),
//!   and `cainfo=<pem>` (a CA file, or for a pinned certificate the server's own certificate
//!   as the client captured it) or `sslverify=false` only when configured insecure. The cookie
//!   (the SOAP session) is in a 0600 file in the run directory, never on the command line;
//!   when the node logs in again it rewrites the file ([`rewrite_cookie`], atomically) and
//!   nbdkit reads it again within the renew interval. The `retry-request` filter retries a
//!   failed read ([`READ_RETRIES`] times, [`READ_RETRY_DELAY_SECS`] apart), so that the gap
//!   between a session's end and the renewed cookie, or an HTTP hiccup, is not an EIO.
//! - Plugin `vddk` (VMware's VDDK installed, production): `libdir= server= [port=] user=
//!   password=+<file> thumbprint= vm=moref= snapshot= file= transports=`; built by
//!   [`command_args`] and unit-tested, but it cannot run on this machine (no VDDK).
//! - `--exit-with-parent`: nbdkit dies with the node. (Linux delivers this when the *thread*
//!   that spawned it ends; the node spawns from its runtime's worker threads, which live as long
//!   as the runtime.)
//! - Ready means an NBD handshake on the socket succeeded. A handshake the server refuses means
//!   the plugin could not open the disk (HTTP 401/404, TLS): that is an error at once, with the
//!   cause read from nbdkit's stderr.
//! - Stop: SIGTERM to the group, a grace period, SIGKILL, reap; then the socket, the pid file and
//!   the secret files are removed.
//! - A pid file (`nbdkit-<stem>.pid`, JSON) is written as soon as the process exists, so that
//!   [`stop_leftovers`] (start-up recovery) can stop an nbdkit a crashed run left, after checking
//!   `/proc/PID/cmdline` is nbdkit serving that socket (PIDs are reused).
//!
//! This module runs the process (start, readiness, stop, the secret files); `args` builds what
//! it is told ([`NbdkitSpec`], [`command_args`]); `leftovers` is the start-up recovery.

mod args;
mod leftovers;

pub use args::{
    CaInfo, NbdkitSpec, Plugin, READ_RETRIES, READ_RETRY_DELAY_SECS, VddkArgs, command_args,
};
pub use leftovers::{LeftoverReport, is_our_nbdkit, stop_leftovers};

use sendense_shared::child::{ChildError, ExitReport, StartGuard, Supervised};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient, NbdError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;
use tokio::process::Command;

/// Prefix of every file the node puts in the run directory for an nbdkit.
pub const FILE_PREFIX: &str = "nbdkit-";
/// How long nbdkit may take to answer its first handshake.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nbdkit gets after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bound on one readiness probe.
const PROBE_BOUND: Duration = Duration::from_secs(20);
/// Unix socket paths are limited to 108 bytes (with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of the nbdkit supervisor; each names the disk (the export) and the cause.
#[derive(Debug, Error)]
pub enum NbdkitError {
    #[error("writing {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start nbdkit ({binary})")]
    Spawn {
        binary: String,
        #[source]
        source: ChildError,
    },
    #[error("nbdkit for {export} exited before it was ready ({status}): {cause}")]
    Exited {
        export: String,
        status: String,
        cause: String,
    },
    #[error("nbdkit for {export} cannot open the disk: {cause} (NBD handshake: {handshake})")]
    Refused {
        export: String,
        handshake: String,
        cause: String,
    },
    #[error("nbdkit for {export} did not answer an NBD handshake within {waited:?} ({last})")]
    NotReady {
        export: String,
        waited: Duration,
        last: String,
    },
    #[error("socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run_dir")]
    SocketPath { path: PathBuf },
}

/// What the pid file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PidFile {
    pid: u32,
    socket: PathBuf,
    export: String,
}

/// A running nbdkit serving one disk.
pub struct Nbdkit {
    child: Supervised,
    spec: NbdkitSpec,
}

impl std::fmt::Debug for Nbdkit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbdkit")
            .field("pid", &self.child.pid())
            .field("socket", &self.spec.socket())
            .field("export", &self.spec.export)
            .finish()
    }
}

/// Writes `text` to a new file readable by the owner only.
fn write_private(path: &Path, text: &str, what: &'static str) -> Result<(), NbdkitError> {
    let err = |source| NbdkitError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Replaces the session cookie nbdkit reads (its [`Nbdkit::cookie_file`]) with `cookie`: a
/// 0600 file written beside it and renamed over it, so that nbdkit never reads half of one.
pub fn rewrite_cookie(path: &Path, cookie: &str) -> Result<(), NbdkitError> {
    let tmp = path.with_extension("cookie.tmp");
    write_private(&tmp, cookie, "cookie file")?;
    std::fs::rename(&tmp, path).map_err(|source| {
        remove_quietly(&tmp);
        NbdkitError::File {
            what: "cookie file",
            path: path.to_path_buf(),
            source,
        }
    })
}

fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

impl Nbdkit {
    /// Writes the secret files, spawns nbdkit, records its pid file, and returns once an NBD
    /// handshake succeeds. On any failure nothing is left: the process is stopped and the files
    /// removed. Cancel-safe: dropped before it returns, the half-started nbdkit is killed.
    pub async fn start(binary: &Path, spec: NbdkitSpec) -> Result<Nbdkit, NbdkitError> {
        let socket = spec.socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(NbdkitError::SocketPath { path: socket });
        }
        let written = async {
            std::fs::create_dir_all(&spec.run_dir).map_err(|source| NbdkitError::File {
                what: "run directory",
                path: spec.run_dir.clone(),
                source,
            })?;
            remove_quietly(&socket);
            match &spec.plugin {
                Plugin::Curl { cookie, cainfo, .. } => {
                    write_private(&spec.cookie_file(), cookie, "cookie file")?;
                    if let Some(CaInfo::Pem(pem)) = cainfo {
                        write_private(&spec.pem_file(), pem, "certificate file")?;
                    }
                }
                Plugin::Vddk(v) => {
                    write_private(&spec.password_file(), &v.password, "password file")?
                }
            }
            Ok::<(), NbdkitError>(())
        };
        if let Err(e) = written.await {
            for f in spec.files() {
                remove_quietly(&f);
            }
            return Err(e);
        }
        let mut cmd = Command::new(binary);
        cmd.args(command_args(&spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = match Supervised::spawn(cmd) {
            Ok(c) => c,
            Err(source) => {
                for f in spec.files() {
                    remove_quietly(&f);
                }
                return Err(NbdkitError::Spawn {
                    binary: binary.display().to_string(),
                    source,
                });
            }
        };
        let guard = StartGuard::new(&child, "nbdkit");
        let me = Nbdkit { child, spec };
        tracing::info!(pid = me.pid(), export = %me.spec.export,
            command = %me.child.command_line_string(), "started nbdkit");
        let ready = async {
            let record = PidFile {
                pid: me.pid(),
                socket: me.spec.socket(),
                export: me.spec.export.clone(),
            };
            write_private(
                &me.spec.pid_file(),
                &serde_json::to_string(&record).unwrap_or_default(),
                "pid file",
            )?;
            me.wait_ready().await
        }
        .await;
        guard.defuse();
        match ready {
            Ok(()) => Ok(me),
            Err(e) => {
                me.stop().await;
                Err(e)
            }
        }
    }

    async fn wait_ready(&self) -> Result<(), NbdkitError> {
        let addr = NbdAddr::Unix {
            path: self.spec.socket(),
            export: self.spec.export.clone(),
        };
        let begin = tokio::time::Instant::now();
        let deadline = begin + READY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        let mut last = "no attempt finished".to_string();
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(NbdkitError::NotReady {
                    export: self.spec.export.clone(),
                    waited: READY_TIMEOUT,
                    last,
                });
            }
            let opts = ConnectOptions {
                connect_timeout: remaining.min(PROBE_BOUND),
                ..Default::default()
            };
            tokio::select! {
                biased;
                report = self.child.exited() => {
                    return Err(self.exited(report));
                }
                probe = NbdClient::connect(&addr, &opts) => match probe {
                    Ok(client) => {
                        let _ = client.disconnect().await;
                        return Ok(());
                    }
                    // Not listening yet.
                    Err(NbdError::Connect { .. }) => last = "socket not listening yet".into(),
                    Err(e @ NbdError::ConnectTimeout { .. }) => last = e.to_string(),
                    // The server answered and refused: the plugin cannot open the disk. Its
                    // words reach stderr a moment later.
                    Err(e) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return Err(NbdkitError::Refused {
                            export: self.spec.export.clone(),
                            handshake: e.to_string(),
                            cause: diagnose(&self.child.stderr_tail()),
                        });
                    }
                },
            }
            tokio::select! {
                biased;
                report = self.child.exited() => {
                    return Err(self.exited(report));
                }
                _ = tokio::time::sleep(pause.min(remaining)) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn exited(&self, report: Option<ExitReport>) -> NbdkitError {
        let (status, stderr) = match report {
            Some(r) => (r.status, r.stderr_tail),
            None => ("unknown".into(), self.child.stderr_tail()),
        };
        NbdkitError::Exited {
            export: self.spec.export.clone(),
            status,
            cause: diagnose(&stderr),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn socket(&self) -> PathBuf {
        self.spec.socket()
    }

    pub fn export(&self) -> &str {
        &self.spec.export
    }

    /// The file the session cookie is read from (curl plugin only).
    pub fn cookie_file(&self) -> Option<PathBuf> {
        matches!(self.spec.plugin, Plugin::Curl { .. }).then(|| self.spec.cookie_file())
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_alive()
    }

    /// The command line as spawned (binary first).
    pub fn command_line(&self) -> &[String] {
        self.child.command_line()
    }

    /// SIGTERM, grace, SIGKILL, reap; then the socket, pid file and secret files go.
    /// Idempotent.
    pub async fn stop(&self) -> ExitReport {
        let report = self.child.stop(STOP_GRACE).await;
        for f in self.spec.files() {
            remove_quietly(&f);
        }
        tracing::info!(pid = self.pid(), export = %self.spec.export, status = %report.status, "nbdkit stopped");
        // A read that failed mid-copy reaches the copy as EIO; the cause (HTTP 401 after the
        // session expired, a dropped connection) is only in nbdkit's words.
        if report.stderr_tail.contains("error") {
            tracing::warn!(export = %self.spec.export, cause = %diagnose(&report.stderr_tail),
                "nbdkit reported errors while serving");
        }
        report
    }
}

/// The cause in nbdkit's stderr: curl's and nbdkit's own error lines, most telling first.
fn diagnose(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let hint = if stderr.contains("401") || stderr.contains("Unauthorized") {
        Some("the datastore refused the session cookie (HTTP 401)")
    } else if stderr.contains("404") {
        Some("the disk file is not on the datastore (HTTP 404)")
    } else if stderr.contains("SSL certificate") || stderr.contains("certificate") {
        Some("the server certificate was not accepted")
    } else if stderr.contains("Could not resolve") || stderr.contains("Couldn't connect") {
        Some("the server cannot be reached")
    } else {
        None
    };
    let last = lines
        .iter()
        .rev()
        .find(|l| l.contains("error"))
        .or(lines.last())
        .copied()
        .unwrap_or("it wrote nothing on stderr");
    match hint {
        Some(h) => format!("{h} ({last})"),
        None => last.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_url_is_an_error_naming_the_cause_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = NbdkitSpec {
            run_dir: dir.path().to_path_buf(),
            stem: "b1-2000".into(),
            export: "vm1-disk-2000".into(),
            plugin: Plugin::Curl {
                url: format!("https://127.0.0.1:{port}/folder/x-flat.vmdk"),
                cookie: "vmware_soap_session=\"x\"".into(),
                cookie_renew_secs: Some(1),
                cainfo: None,
                insecure: false,
            },
        };
        let e = Nbdkit::start(Path::new("nbdkit"), s).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("vm1-disk-2000"), "{text}");
        assert!(text.contains("cannot be reached"), "{text}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "files left: {left:?}");
    }

    #[test]
    fn diagnosis_names_the_http_cause() {
        let e = diagnose(
            "nbdkit: curl[1]: error: problem doing HEAD request to fetch size of URL [https://x]: HTTP response code said error: The requested URL returned error: 401\n",
        );
        assert!(
            e.starts_with("the datastore refused the session cookie"),
            "{e}"
        );
        assert_eq!(diagnose(""), "it wrote nothing on stderr");
    }
}
