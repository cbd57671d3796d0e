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

use sendense_shared::child::{self, ChildError, ExitReport, StartGuard, Supervised};
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

/// How nbdkit reaches the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    /// The datastore's HTTPS file access with the session cookie.
    Curl {
        /// `https://host/folder/dir/name-flat.vmdk?dcPath=..&dsName=..`.
        url: String,
        /// The `Cookie` header value (`vmware_soap_session="..."`); goes into a 0600 file.
        cookie: String,
        /// Re-read the cookie file when this many seconds passed since it was last read
        /// (`cookie-script-renew`); `None`: read once at start.
        cookie_renew_secs: Option<u32>,
        /// A CA bundle, or the pinned server certificate (PEM).
        cainfo: Option<CaInfo>,
        /// `sslverify=false` (only when configured `insecure = true`).
        insecure: bool,
    },
    /// VMware's VDDK.
    Vddk(VddkArgs),
}

/// Where curl's trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaInfo {
    /// An existing PEM file (the configured `ca_file`).
    File(PathBuf),
    /// PEM text to write into a file of the run directory (the pinned server certificate).
    Pem(String),
}

/// Arguments of the vddk plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VddkArgs {
    pub libdir: PathBuf,
    /// vCenter/ESXi host name (no scheme, no port).
    pub server: String,
    pub port: Option<u16>,
    pub user: String,
    /// Goes into a 0600 file (`password=+FILE`).
    pub password: String,
    /// The server certificate's SHA-1 thumbprint, colon-separated hex (VDDK's format).
    pub thumbprint: String,
    /// `vm-42`.
    pub vm_moref: String,
    /// `snapshot-43`.
    pub snapshot_moref: String,
    /// `[datastore1] vm1/vm1.vmdk`, as the snapshot's configuration names the disk.
    pub file: String,
}

/// What one nbdkit serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdkitSpec {
    /// `<run_dir>/nbdkit-<stem>.sock`; the pid file and secret files share the stem.
    pub run_dir: PathBuf,
    /// Unique per disk of a snapshot: `<backup id>-<disk key>`.
    pub stem: String,
    /// The NBD export name.
    pub export: String,
    pub plugin: Plugin,
}

impl NbdkitSpec {
    fn path(&self, ext: &str) -> PathBuf {
        self.run_dir
            .join(format!("{FILE_PREFIX}{}.{ext}", self.stem))
    }
    pub fn socket(&self) -> PathBuf {
        self.path("sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.path("pid")
    }
    fn cookie_file(&self) -> PathBuf {
        self.path("cookie")
    }
    fn cookie_tmp(&self) -> PathBuf {
        self.path("cookie.tmp")
    }
    fn password_file(&self) -> PathBuf {
        self.path("password")
    }
    fn pem_file(&self) -> PathBuf {
        self.path("pem")
    }
    /// Every file this spec may create.
    fn files(&self) -> [PathBuf; 6] {
        [
            self.socket(),
            self.pid_file(),
            self.cookie_file(),
            self.cookie_tmp(),
            self.password_file(),
            self.pem_file(),
        ]
    }
}

/// curl plugin: how often a failed read is retried, and how long apart (the `retry-request`
/// filter). Together they bridge about 10 s, longer than the cookie's renew interval at the
/// driver's default keepalive cap.
pub const READ_RETRIES: u32 = 5;
pub const READ_RETRY_DELAY_SECS: u32 = 2;

/// The arguments after the binary. Secrets are referenced by file (`+FILE`), never inline.
pub fn command_args(spec: &NbdkitSpec) -> Vec<String> {
    let mut args = vec![
        "--exit-with-parent".to_string(),
        "--foreground".to_string(),
        "--readonly".to_string(),
        "--unix".to_string(),
        spec.socket().to_string_lossy().into_owned(),
        "--exportname".to_string(),
        spec.export.clone(),
    ];
    match &spec.plugin {
        Plugin::Curl {
            url,
            cainfo,
            insecure,
            cookie_renew_secs,
            ..
        } => {
            // A failed read is tried again a few times before the copy sees EIO: an HTTP hiccup,
            // or a 401 between the end of a session and the renewed cookie, must not fail a
            // backup. Opening is not retried, so that a refused start is named at once.
            args.push("--filter=retry-request".into());
            args.push("curl".into());
            args.push(format!("url={url}"));
            args.push(format!("retry-request-retries={READ_RETRIES}"));
            args.push(format!("retry-request-delay={READ_RETRY_DELAY_SECS}"));
            args.push("retry-request-open=false".into());
            match cookie_renew_secs {
                Some(secs) => {
                    // A shell fragment: the path is quoted for /bin/sh.
                    args.push(format!(
                        "cookie-script=exec cat {}",
                        shell_quote(&spec.cookie_file().to_string_lossy())
                    ));
                    args.push(format!("cookie-script-renew={}", (*secs).max(1)));
                }
                None => args.push(format!("cookie=+{}", spec.cookie_file().display())),
            }
            // A redirect must not lead to another protocol (or to plain HTTP with the cookie).
            args.push("protocols=https".into());
            match cainfo {
                Some(CaInfo::File(p)) => args.push(format!("cainfo={}", p.display())),
                Some(CaInfo::Pem(_)) => args.push(format!("cainfo={}", spec.pem_file().display())),
                None => {}
            }
            if *insecure {
                args.push("sslverify=false".into());
            }
        }
        Plugin::Vddk(v) => {
            args.push("vddk".into());
            args.push(format!("libdir={}", v.libdir.display()));
            args.push(format!("server={}", v.server));
            if let Some(port) = v.port {
                args.push(format!("port={port}"));
            }
            args.push(format!("user={}", v.user));
            args.push(format!("password=+{}", spec.password_file().display()));
            args.push(format!("thumbprint={}", v.thumbprint));
            args.push(format!("vm=moref={}", v.vm_moref));
            args.push(format!("snapshot={}", v.snapshot_moref));
            // Advanced transports first where the host offers them; NBD(SSL) always works.
            args.push("transports=file:san:hotadd:nbdssl:nbd".into());
            args.push(format!("file={}", v.file));
        }
    }
    args
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

/// `'text'` for /bin/sh, a `'` inside written as `'\''`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
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

/// What [`stop_leftovers`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LeftoverReport {
    /// "nbdkit PID 123 (socket ...)" for each stopped process.
    pub stopped: Vec<String>,
    pub files_removed: Vec<PathBuf>,
    pub errors: Vec<String>,
}

/// True when `pid` is alive and its command line is nbdkit serving `socket`.
pub fn is_our_nbdkit(pid: u32, socket: &Path) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    let Some(cmdline) = child::read_cmdline(pid) else {
        return false;
    };
    let is_nbdkit = cmdline
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("nbdkit"));
    let socket = socket.to_string_lossy();
    is_nbdkit
        && cmdline
            .windows(2)
            .any(|w| (w[0] == "--unix" || w[0] == "-U") && w[1] == socket)
}

/// Start-up recovery: stops every nbdkit recorded in a pid file of `run_dir` that still is our
/// nbdkit (checked through `/proc`), and removes every `nbdkit-*` file left there.
pub async fn stop_leftovers(run_dir: &Path) -> LeftoverReport {
    let mut report = LeftoverReport::default();
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return report;
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(FILE_PREFIX))
        })
        .collect();
    files.sort();
    for pid_path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
    {
        let record = std::fs::read_to_string(pid_path)
            .ok()
            .and_then(|t| serde_json::from_str::<PidFile>(&t).ok());
        let Some(record) = record else {
            report
                .errors
                .push(format!("{}: not a pid file of ours", pid_path.display()));
            continue;
        };
        if !is_our_nbdkit(record.pid, &record.socket) {
            continue;
        }
        match child::stop_group(record.pid, STOP_GRACE).await {
            Ok(_) => report.stopped.push(format!(
                "nbdkit PID {} ({})",
                record.pid,
                record.socket.display()
            )),
            Err(e) => report.errors.push(format!(
                "nbdkit PID {} ({}): {e}",
                record.pid,
                record.socket.display()
            )),
        }
    }
    for f in files {
        if std::fs::remove_file(&f).is_ok() {
            report.files_removed.push(f);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(plugin: Plugin) -> NbdkitSpec {
        NbdkitSpec {
            run_dir: PathBuf::from("/run/sd"),
            stem: "b1-2000".into(),
            export: "vm1-disk-2000".into(),
            plugin,
        }
    }

    #[test]
    fn curl_arguments_keep_secrets_in_files() {
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/folder/vm1/vm1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0".into(),
            cookie: "vmware_soap_session=\"secret\"".into(),
            cookie_renew_secs: None,
            cainfo: Some(CaInfo::Pem("PEM".into())),
            insecure: false,
        }));
        assert_eq!(
            a,
            [
                "--exit-with-parent",
                "--foreground",
                "--readonly",
                "--unix",
                "/run/sd/nbdkit-b1-2000.sock",
                "--exportname",
                "vm1-disk-2000",
                "--filter=retry-request",
                "curl",
                "url=https://vc/folder/vm1/vm1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0",
                "retry-request-retries=5",
                "retry-request-delay=2",
                "retry-request-open=false",
                "cookie=+/run/sd/nbdkit-b1-2000.cookie",
                "protocols=https",
                "cainfo=/run/sd/nbdkit-b1-2000.pem",
            ]
        );
        assert!(!a.iter().any(|x| x.contains("secret")));
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: None,
            cainfo: None,
            insecure: true,
        }));
        assert!(a.contains(&"sslverify=false".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("cainfo")));
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: None,
            cainfo: Some(CaInfo::File("/etc/ca.pem".into())),
            insecure: false,
        }));
        assert!(a.contains(&"cainfo=/etc/ca.pem".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("sslverify")));
        // Renewed: nbdkit runs `cat` on the file again, the path quoted for the shell.
        let mut s = spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: Some(7),
            cainfo: None,
            insecure: false,
        });
        s.run_dir = PathBuf::from("/run/it's here");
        let a = command_args(&s);
        assert!(
            a.contains(
                &r"cookie-script=exec cat '/run/it'\''s here/nbdkit-b1-2000.cookie'".to_string()
            ),
            "{a:?}"
        );
        assert!(a.contains(&"cookie-script-renew=7".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("cookie=")), "{a:?}");
    }

    #[test]
    fn vddk_arguments() {
        let a = command_args(&spec(Plugin::Vddk(VddkArgs {
            libdir: "/opt/vmware-vix-disklib-distrib".into(),
            server: "vcenter.example".into(),
            port: Some(8443),
            user: "backup@vsphere.local".into(),
            password: "hunter2".into(),
            thumbprint: "AA:BB".into(),
            vm_moref: "vm-42".into(),
            snapshot_moref: "snapshot-43".into(),
            file: "[datastore1] vm1/vm1.vmdk".into(),
        })));
        assert_eq!(
            a[7..],
            [
                "vddk",
                "libdir=/opt/vmware-vix-disklib-distrib",
                "server=vcenter.example",
                "port=8443",
                "user=backup@vsphere.local",
                "password=+/run/sd/nbdkit-b1-2000.password",
                "thumbprint=AA:BB",
                "vm=moref=vm-42",
                "snapshot=snapshot-43",
                "transports=file:san:hotadd:nbdssl:nbd",
                "file=[datastore1] vm1/vm1.vmdk",
            ]
        );
        assert!(!a.iter().any(|x| x.contains("hunter2")));
    }

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

    #[tokio::test]
    async fn leftovers_are_stopped_only_when_they_are_our_nbdkit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbdkit-old-2000.sock");
        // An nbdkit a crashed run left, recorded in its pid file.
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--foreground", "--unix"])
            .arg(&sock)
            .args(["memory", "1M"])
            .stdin(Stdio::null());
        let nbdkit = Supervised::spawn(cmd).unwrap();
        let record = PidFile {
            pid: nbdkit.pid(),
            socket: sock.clone(),
            export: "e".into(),
        };
        std::fs::write(
            dir.path().join("nbdkit-old-2000.pid"),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        // A pid file whose PID is now something else: left alone.
        let mut other = Command::new("sleep");
        other.arg("30").stdin(Stdio::null());
        let sleeper = Supervised::spawn(other).unwrap();
        let record = PidFile {
            pid: sleeper.pid(),
            socket: dir.path().join("nbdkit-other-2001.sock"),
            export: "e".into(),
        };
        std::fs::write(
            dir.path().join("nbdkit-other-2001.pid"),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("nbdkit-old-2000.cookie"), "c").unwrap();
        std::fs::write(dir.path().join("unrelated"), "u").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdkit did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(is_our_nbdkit(nbdkit.pid(), &sock));
        assert!(!is_our_nbdkit(sleeper.pid(), &sock));
        let report = stop_leftovers(dir.path()).await;
        assert_eq!(report.stopped.len(), 1, "{report:?}");
        assert!(report.stopped[0].contains(&nbdkit.pid().to_string()));
        let mut exit = nbdkit.exit_watch();
        tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
            .await
            .expect("nbdkit gone")
            .unwrap();
        assert!(
            sleeper.is_alive(),
            "a process that is not our nbdkit is left alone"
        );
        sleeper.stop(Duration::from_secs(1)).await;
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["unrelated"]);
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
