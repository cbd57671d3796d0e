//! One `qemu-nbd` per disk: the NBD export a backup writes into.
//!
//! Each export is its own qemu-nbd process (own process group, see [`sendense_shared::child`]):
//! `--format=qcow2 --export-name=NAME --bind=ADDR --port=PORT --persistent --shared=N
//! --discard=unmap --detect-zeroes=unmap --cache=MODE [--aio=MODE] [--read-only] FILE`.
//!
//! - `--persistent`: the readiness probe connects and disconnects; without it qemu-nbd would
//!   exit after that first client.
//! - `--shared=N` with N > 1: qemu-nbd 7.2 only advertises multi-conn on a writable export when
//!   it accepts several clients, and writers use several connections per disk.
//! - `--discard=unmap` must precede `--detect-zeroes=unmap` (qemu-nbd 7.2 refuses the other
//!   order), so zeroes written by a copy engine stay holes in the QCOW2.
//! - Ready means an NBD handshake (`NBD_OPT_GO` for this export) succeeded AND the listening
//!   socket on the port belongs to the spawned PID: a foreign server still holding the port (an
//!   old qemu-nbd serving the same export name) answers the handshake while ours is dying of
//!   "Address already in use".
//! - Stop is SIGTERM to the group, `stop_grace`, SIGKILL, reap. qemu-nbd flushes the image on
//!   SIGTERM and exits with status 0.
//! - After a hub restart, [`stop_orphan`] stops a recorded PID only if `/proc/PID/cmdline` is a
//!   qemu-nbd serving the same port and export ([`is_our_qemu_nbd`]): PIDs are reused.
//!
//! ## Cache mode (measured by `bench/qemu-nbd-cache.sh`)
//!
//! Copy of N GiB of random data (from a qcow2 twice that size, the rest holes) by
//! `nbdcopy --destination-is-zero --flush` into a fresh qcow2 served by qemu-nbd with the options
//! above, plus the SIGTERM stop of that qemu-nbd: wall seconds, median of 5 runs with the modes
//! interleaved, on the shared 2-core Debian 12 build machine (qemu 7.2, ext4 on virtio, load
//! average up to 12 from other builds, hence the spread).
//!
//! | cache / aio          | 1 GiB median (range) | 2 GiB median (range) | vs writeback/threads |
//! |----------------------|----------------------|----------------------|----------------------|
//! | writeback / threads  | 3.08 (2.29-3.94)     | 5.90 (5.66-8.18)     | 1.00                 |
//! | writeback / io_uring | 3.39 (2.14-4.47)     | 6.74 (5.65-9.90)     | 1.10-1.14            |
//! | **none / threads**   | **1.78 (1.57-2.39)** | **3.38 (3.14-4.80)** | **0.57-0.58**        |
//! | none / native        | 2.88 (2.66-3.34)     | 4.60 (4.34-8.54)     | 0.78-0.94            |
//! | writethrough/threads | 11.34 (9.38-15.82)   | 30.41 (20.34-32.83)  | 3.7-5.2              |
//! | unsafe / threads     | 2.07 (1.64-5.44)     | 5.70 (3.99-6.45)     | 0.67-0.97            |
//!
//! Default: `cache=none`, `aio=threads`, the fastest in both sizes: a backup target is written
//! once and not read back through this process, so the page cache only costs a copy and a
//! write-back storm at the final flush. On a file system that refuses O_DIRECT the image is served
//! with `cache=writeback` instead (see `adapt_to_file_system`).
//!
//! `unsafe` ignores flushes, so an acknowledged backup could be lost on a host crash; it is
//! measured for reference only and never chosen.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sendense_shared::child::{self, ChildError, ExitReport, StartGuard, Supervised};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

/// qemu-nbd's port when none is given on its command line.
const QEMU_NBD_DEFAULT_PORT: u16 = 10809;

/// Bound on one handshake attempt while waiting for readiness (a listener that accepts but
/// never answers must not eat the whole ready timeout in one attempt).
const PROBE_ATTEMPT_BOUND: Duration = Duration::from_secs(2);

/// Errors of the qemu-nbd manager.
#[derive(Debug, thiserror::Error)]
pub enum QemuNbdError {
    #[error("invalid qemu-nbd setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("invalid qemu-nbd export `{field}`: {reason}")]
    InvalidSpec { field: &'static str, reason: String },
    #[error("cannot start qemu-nbd binary `{}`", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "qemu-nbd for export {export:?} on port {port} exited before it was ready ({status}): {cause}"
    )]
    ExitedBeforeReady {
        pid: u32,
        export: String,
        port: u16,
        status: String,
        /// The cause read from stderr ("port 10105 already in use", ...).
        cause: String,
        /// The whole stderr tail.
        stderr: String,
    },
    #[error(
        "qemu-nbd for export {export:?} on port {port} did not answer an NBD handshake within {waited:?} ({last_error}); it was stopped"
    )]
    NotReady {
        pid: u32,
        port: u16,
        export: String,
        waited: Duration,
        last_error: String,
    },
    #[error("cannot stop orphaned qemu-nbd PID {pid}")]
    StopOrphan {
        pid: u32,
        #[source]
        source: ChildError,
    },
}

/// How qemu-nbd processes are started; a table of the hub's TOML config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuNbdConfig {
    /// The qemu-nbd executable (looked up in `PATH` when it has no `/`).
    pub binary: PathBuf,
    /// Address every export listens on. Loopback: writers reach it through the SSH tunnel.
    pub bind: IpAddr,
    /// `--shared=N`: clients one export accepts at once; more than 1 so it advertises multi-conn.
    pub shared_connections: u32,
    /// `--cache=`: none, writeback, writethrough, directsync (unsafe is refused).
    pub cache: String,
    /// `--aio=`: threads, native (needs cache none or directsync), io_uring; none = qemu's default.
    pub aio: Option<String>,
    /// How long qemu-nbd may take to answer its first NBD handshake (seconds, or "500ms").
    #[serde(with = "duration_serde")]
    pub ready_timeout: Duration,
    /// How long qemu-nbd gets after SIGTERM before SIGKILL (seconds, or "500ms").
    #[serde(with = "duration_serde")]
    pub stop_grace: Duration,
}

impl Default for QemuNbdConfig {
    fn default() -> Self {
        QemuNbdConfig {
            binary: PathBuf::from("qemu-nbd"),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            shared_connections: 8,
            // Measured: see the module doc.
            cache: "none".to_string(),
            aio: Some("threads".to_string()),
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
        }
    }
}

impl QemuNbdConfig {
    /// Checks every field; the error names the field. [`QemuNbd::start`] calls it too.
    pub fn validate(&self) -> Result<(), QemuNbdError> {
        let bad = |field, reason: String| Err(QemuNbdError::InvalidConfig { field, reason });
        if self.binary.as_os_str().is_empty() {
            return bad("binary", "is empty".into());
        }
        if self.shared_connections < 2 {
            return bad(
                "shared_connections",
                format!(
                    "is {}; it must be at least 2, or qemu-nbd does not advertise multi-conn \
                     and a writer cannot open a second connection",
                    self.shared_connections
                ),
            );
        }
        match self.cache.as_str() {
            "none" | "writeback" | "writethrough" | "directsync" => {}
            "unsafe" => {
                return bad(
                    "cache",
                    "\"unsafe\" ignores flushes: a backup reported complete could be lost on a \
                     host crash"
                        .into(),
                );
            }
            other => {
                return bad(
                    "cache",
                    format!("{other:?} is not one of none, writeback, writethrough, directsync"),
                );
            }
        }
        match self.aio.as_deref() {
            None | Some("threads") | Some("io_uring") => {}
            Some("native") if matches!(self.cache.as_str(), "none" | "directsync") => {}
            Some("native") => {
                return bad(
                    "aio",
                    format!(
                        "\"native\" needs cache \"none\" or \"directsync\" (O_DIRECT), cache is {:?}",
                        self.cache
                    ),
                );
            }
            Some(other) => {
                return bad(
                    "aio",
                    format!("{other:?} is not one of threads, native, io_uring"),
                );
            }
        }
        if self.ready_timeout.is_zero() {
            return bad("ready_timeout", "must be more than 0".into());
        }
        Ok(())
    }

    /// Where a client connects: the bind address, or loopback when bound to every address.
    fn connect_host(&self) -> IpAddr {
        match self.bind {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            a => a,
        }
    }
}

/// What one qemu-nbd serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The QCOW2 image (the backup target).
    pub qcow2_path: PathBuf,
    /// The NBD export name, e.g. `pgtest1-disk-2000`.
    pub export_name: String,
    /// TCP port, from the hub's allocator.
    pub port: u16,
    /// Serve read-only (`--read-only`), e.g. for a restore or a verification read.
    pub read_only: bool,
}

impl ExportSpec {
    fn validate(&self) -> Result<(), QemuNbdError> {
        sendense_shared::names::validate_name("export_name", &self.export_name).map_err(|e| {
            QemuNbdError::InvalidSpec {
                field: "export_name",
                reason: e.to_string(),
            }
        })?;
        if self.port == 0 {
            return Err(QemuNbdError::InvalidSpec {
                field: "port",
                reason: "is 0; qemu-nbd needs the allocated port".into(),
            });
        }
        if self.qcow2_path.as_os_str().is_empty() {
            return Err(QemuNbdError::InvalidSpec {
                field: "qcow2_path",
                reason: "is empty".into(),
            });
        }
        Ok(())
    }
}

/// The arguments after the binary, for `cfg` as given (see [`QemuNbd::start`] for the one case
/// where the cache mode is adapted to the file system).
pub fn command_args(cfg: &QemuNbdConfig, spec: &ExportSpec) -> Vec<String> {
    let mut args = vec![
        "--format=qcow2".to_string(),
        format!("--export-name={}", spec.export_name),
        format!("--bind={}", cfg.bind),
        format!("--port={}", spec.port),
        "--persistent".to_string(),
        format!("--shared={}", cfg.shared_connections),
        // This order: qemu-nbd 7.2 refuses detect-zeroes=unmap before discard=unmap.
        "--discard=unmap".to_string(),
        "--detect-zeroes=unmap".to_string(),
        format!("--cache={}", cfg.cache),
    ];
    if let Some(aio) = &cfg.aio {
        args.push(format!("--aio={aio}"));
    }
    if spec.read_only {
        args.push("--read-only".to_string());
    }
    // A relative path starting with '-' would be parsed as an option.
    let path = &spec.qcow2_path;
    let path = if path.is_relative() && path.as_os_str().to_string_lossy().starts_with('-') {
        Path::new(".").join(path)
    } else {
        path.clone()
    };
    args.push(path.to_string_lossy().into_owned());
    args
}

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
        let cfg = &adapt_to_file_system(cfg, &spec.qcow2_path);
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
            }),
        };
        let ready = qn.wait_ready(cfg.ready_timeout).await;
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
            let opts = ConnectOptions {
                connect_timeout: remaining.min(PROBE_ATTEMPT_BOUND),
                ..ConnectOptions::default()
            };
            tokio::select! {
                biased;
                report = self.inner.child.exited() => {
                    return Err(self.exited_error(report));
                }
                probe = NbdClient::connect(&addr, &opts) => match probe {
                    Ok(client) => {
                        let _ = client.disconnect().await;
                        if listens_on(self.pid(), spec.port) {
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
        NbdAddr::Tcp {
            host: self.inner.host.to_string(),
            port: self.inner.spec.port,
            export: self.inner.spec.export_name.clone(),
        }
    }

    /// Where a client reaches this export, as the API's structured form (an IPv6 host is put in
    /// brackets only when it is written as a URI).
    pub fn nbd_export(&self) -> sendense_shared::api::NbdExport {
        sendense_shared::api::NbdExport {
            host: self.inner.host.to_string(),
            port: self.inner.spec.port,
            export: self.inner.spec.export_name.clone(),
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

/// cache=none and directsync open the image with O_DIRECT, which some file systems refuse (tmpfs
/// before Linux 6.6): there qemu-nbd would exit with "Invalid argument". Such an image is served
/// with cache=writeback (and qemu's default aio) instead, and the log says so.
fn adapt_to_file_system(cfg: &QemuNbdConfig, image: &Path) -> QemuNbdConfig {
    use std::os::unix::fs::OpenOptionsExt;
    let mut cfg = cfg.clone();
    if !matches!(cfg.cache.as_str(), "none" | "directsync") {
        return cfg;
    }
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(image);
    if let Err(e) = probe
        && e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32)
    {
        tracing::warn!(
            image = %image.display(),
            cache = %cfg.cache,
            "file system refuses O_DIRECT; serving this image with cache=writeback"
        );
        cfg.cache = "writeback".to_string();
        cfg.aio = None;
    }
    cfg
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

/// The port and export name a qemu-nbd command line serves, with qemu-nbd's defaults (10809 and
/// the empty name) when not given. `None` when argv[0] is not qemu-nbd.
fn served_by(cmdline: &[String]) -> Option<(u16, String)> {
    let program = Path::new(cmdline.first()?).file_name()?.to_str()?;
    if !program.starts_with("qemu-nbd") {
        return None;
    }
    let mut port = QEMU_NBD_DEFAULT_PORT.to_string();
    let mut export = String::new();
    let mut args = cmdline[1..].iter();
    while let Some(arg) = args.next() {
        let mut take = |slot: &mut String| {
            if let Some(v) = args.next() {
                *slot = v.clone();
            }
        };
        match arg.as_str() {
            "--" => break,
            "-p" | "--port" => take(&mut port),
            "-x" | "--export-name" => take(&mut export),
            a => {
                if let Some(v) = a.strip_prefix("--port=") {
                    port = v.to_string();
                } else if let Some(v) = a.strip_prefix("--export-name=") {
                    export = v.to_string();
                } else if let Some(v) = a.strip_prefix("-p").filter(|_| !a.starts_with("--")) {
                    port = v.to_string();
                } else if let Some(v) = a.strip_prefix("-x").filter(|_| !a.starts_with("--")) {
                    export = v.to_string();
                }
            }
        }
    }
    Some((port.parse().ok()?, export))
}

/// True when `/proc/PID/cmdline` is a live qemu-nbd serving this port and export. The reconciler
/// never signals a PID that fails this check: PIDs are reused.
pub fn is_our_qemu_nbd(pid: u32, port: u16, export_name: &str) -> bool {
    if !child::pid_alive(pid) {
        return false;
    }
    read_cmdline_checked(pid)
        .as_deref()
        .and_then(served_by)
        .is_some_and(|(p, e)| p == port && e == export_name)
}

fn read_cmdline_checked(pid: u32) -> Option<Vec<String>> {
    child::read_cmdline(pid).filter(|c| !c.is_empty())
}

/// What [`stop_orphan`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrphanOutcome {
    /// It was our qemu-nbd and is gone now.
    Stopped,
    /// No live process has that PID.
    AlreadyGone,
    /// The PID belongs to something else now; it was left alone.
    NotOurs { cmdline: String },
}

/// The reconciler's stop after a hub restart: checks [`is_our_qemu_nbd`], then stops the process
/// group (SIGTERM, `grace`, SIGKILL).
pub async fn stop_orphan(
    pid: u32,
    port: u16,
    export_name: &str,
    grace: Duration,
) -> Result<OrphanOutcome, QemuNbdError> {
    if !child::pid_alive(pid) {
        return Ok(OrphanOutcome::AlreadyGone);
    }
    if !is_our_qemu_nbd(pid, port, export_name) {
        return Ok(match read_cmdline_checked(pid) {
            Some(cmdline) if child::pid_alive(pid) => OrphanOutcome::NotOurs {
                cmdline: child::shell_words(&cmdline),
            },
            // Kernel threads have an empty command line; they are never ours either.
            None if child::pid_alive(pid) => OrphanOutcome::NotOurs {
                cmdline: String::new(),
            },
            _ => OrphanOutcome::AlreadyGone,
        });
    }
    tracing::info!(
        pid,
        port,
        export = export_name,
        "stopping orphaned qemu-nbd"
    );
    match child::stop_group(pid, grace).await {
        Ok(true) => Ok(OrphanOutcome::Stopped),
        Ok(false) => Ok(OrphanOutcome::AlreadyGone),
        Err(source) => Err(QemuNbdError::StopOrphan { pid, source }),
    }
}

/// Durations in the TOML config: a number of seconds (`10`, `0.5`) or a string with a unit
/// (`"500ms"`, `"10s"`, `"2m"`).
mod duration_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(secs) => Ok(Duration::from_secs(secs)),
            Raw::Float(secs) => Duration::try_from_secs_f64(secs).map_err(D::Error::custom),
            Raw::Text(t) => parse(&t).map_err(D::Error::custom),
        }
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like \"500ms\", \"10s\" or 10"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" => n * 60.0,
            other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m)")),
        };
        Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExportSpec {
        ExportSpec {
            qcow2_path: PathBuf::from("/repo/vm1/2000/b1.qcow2"),
            export_name: "vm1-disk-2000".into(),
            port: 10105,
            read_only: false,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_line_has_every_option_in_the_order_qemu_nbd_needs() {
        let args = command_args(&QemuNbdConfig::default(), &spec());
        assert_eq!(
            args,
            strings(&[
                "--format=qcow2",
                "--export-name=vm1-disk-2000",
                "--bind=127.0.0.1",
                "--port=10105",
                "--persistent",
                "--shared=8",
                "--discard=unmap",
                "--detect-zeroes=unmap",
                "--cache=none",
                "--aio=threads",
                "/repo/vm1/2000/b1.qcow2",
            ])
        );
        let ro = ExportSpec {
            read_only: true,
            qcow2_path: "-odd.qcow2".into(),
            ..spec()
        };
        let args = command_args(&QemuNbdConfig::default(), &ro);
        assert_eq!(
            &args[args.len() - 2..],
            strings(&["--read-only", "./-odd.qcow2"])
        );
    }

    #[test]
    fn our_own_command_line_is_recognised() {
        let mut cmd = vec!["/usr/bin/qemu-nbd".to_string()];
        cmd.extend(command_args(&QemuNbdConfig::default(), &spec()));
        assert_eq!(served_by(&cmd), Some((10105, "vm1-disk-2000".into())));
    }

    #[test]
    fn other_spellings_and_programs() {
        let c = strings(&["qemu-nbd", "-p", "10100", "-x", "a", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10100, "a".into())));
        let c = strings(&["qemu-nbd", "-p10101", "-xb", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10101, "b".into())));
        let c = strings(&["qemu-nbd", "--port", "10102", "--export-name", "c", "f"]);
        assert_eq!(served_by(&c), Some((10102, "c".into())));
        let c = strings(&["qemu-nbd", "f.qcow2"]);
        assert_eq!(served_by(&c), Some((10809, String::new())));
        // After "--" everything is a file name.
        let c = strings(&["qemu-nbd", "--port=1", "--", "--port=2"]);
        assert_eq!(served_by(&c), Some((1, String::new())));
        // nbdcopy running a qemu-nbd: argv[0] decides.
        let c = strings(&[
            "nbdcopy",
            "--",
            "[",
            "qemu-nbd",
            "--port=10105",
            "-x",
            "vm1-disk-2000",
            "]",
        ]);
        assert_eq!(served_by(&c), None);
        assert_eq!(served_by(&strings(&["sleep", "30"])), None);
        assert_eq!(served_by(&[]), None);
        assert_eq!(served_by(&strings(&["qemu-nbd", "--port=notaport"])), None);
    }

    #[test]
    fn config_refuses_what_would_break_a_backup() {
        let check = |cfg: QemuNbdConfig, field: &str| match cfg.validate() {
            Err(QemuNbdError::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field, "{reason}")
            }
            other => panic!("expected an error on {field}, got {other:?}"),
        };
        let d = QemuNbdConfig::default;
        d().validate().unwrap();
        check(
            QemuNbdConfig {
                shared_connections: 1,
                ..d()
            },
            "shared_connections",
        );
        check(
            QemuNbdConfig {
                cache: "unsafe".into(),
                ..d()
            },
            "cache",
        );
        check(
            QemuNbdConfig {
                cache: "fast".into(),
                ..d()
            },
            "cache",
        );
        check(
            QemuNbdConfig {
                cache: "writeback".into(),
                aio: Some("native".into()),
                ..d()
            },
            "aio",
        );
        check(
            QemuNbdConfig {
                aio: Some("posix".into()),
                ..d()
            },
            "aio",
        );
        check(
            QemuNbdConfig {
                ready_timeout: Duration::ZERO,
                ..d()
            },
            "ready_timeout",
        );
        check(
            QemuNbdConfig {
                binary: PathBuf::new(),
                ..d()
            },
            "binary",
        );
        QemuNbdConfig {
            cache: "none".into(),
            aio: Some("native".into()),
            ..d()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn spec_refuses_bad_names_and_port_zero() {
        for (s, field) in [
            (
                ExportSpec {
                    export_name: "../x".into(),
                    ..spec()
                },
                "export_name",
            ),
            (
                ExportSpec {
                    export_name: String::new(),
                    ..spec()
                },
                "export_name",
            ),
            (
                ExportSpec {
                    export_name: "a b".into(),
                    ..spec()
                },
                "export_name",
            ),
            (ExportSpec { port: 0, ..spec() }, "port"),
            (
                ExportSpec {
                    qcow2_path: PathBuf::new(),
                    ..spec()
                },
                "qcow2_path",
            ),
        ] {
            match s.validate() {
                Err(QemuNbdError::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn config_from_toml_with_defaults_and_durations() {
        let cfg: QemuNbdConfig = toml::from_str(
            "cache = \"none\"\naio = \"native\"\nready_timeout = \"1500ms\"\nstop_grace = 2\n",
        )
        .unwrap();
        assert_eq!(cfg.cache, "none");
        assert_eq!(cfg.ready_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.stop_grace, Duration::from_secs(2));
        assert_eq!(cfg.shared_connections, 8);
        let cfg: QemuNbdConfig = toml::from_str("stop_grace = 0.25").unwrap();
        assert_eq!(cfg.stop_grace, Duration::from_millis(250));
        let err = toml::from_str::<QemuNbdConfig>("ready_timeout = \"10 parsecs\"").unwrap_err();
        assert!(err.to_string().contains("parsecs"), "{err}");
        let err = toml::from_str::<QemuNbdConfig>("chache = \"none\"").unwrap_err();
        assert!(err.to_string().contains("chache"), "{err}");
        assert_eq!(
            toml::from_str::<QemuNbdConfig>("").unwrap(),
            QemuNbdConfig::default()
        );
    }

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
