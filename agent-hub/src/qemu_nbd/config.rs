//! The `[qemu_nbd]` table of the hub's config, what one export serves, and the command line
//! both make.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::QemuNbdError;
use super::duration_serde;
use crate::nbd_ca::{HUB_CN, NbdCa, dn};

/// Where the exports a node opens listen (the hub's `nbd_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NbdListen {
    /// `<nbd_socket_dir>/<port>.sock`, reachable only by the directory's group (the tunnel
    /// user): the default, see the module doc of [`crate::qemu_nbd`].
    Unix,
    /// `nbd_bind:port`: any local user can connect (and TLS must then refuse it).
    Tcp,
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
    /// How long qemu-nbd may take to answer its first NBD handshake (seconds, or "500ms";
    /// default 30 s: a loaded host took 4.5 s once, and a slow start is not a dead export).
    #[serde(with = "duration_serde")]
    pub ready_timeout: Duration,
    /// How long qemu-nbd gets after SIGTERM before SIGKILL (seconds, or "500ms").
    #[serde(with = "duration_serde")]
    pub stop_grace: Duration,
    /// The hub's NBD CA when the hub's `nbd_tls` is on (set at start-up, not in the file): every
    /// TCP export then requires TLS with a client certificate its authz names (the job's writer,
    /// the hub). Unix-socket exports (the hub's own read-backs, 0700 directory) stay plain.
    #[serde(skip)]
    pub tls: Option<NbdCa>,
    /// The exports' socket directory when the hub's `nbd_listen` is `unix` (set at start-up):
    /// an export without its own `socket` is then served on `<dir>/<port>.sock`.
    #[serde(skip)]
    pub socket_dir: Option<PathBuf>,
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
            ready_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            tls: None,
            socket_dir: None,
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
    pub(super) fn connect_host(&self) -> IpAddr {
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
    /// Serve on this unix socket instead of TCP: the hub's own read-backs, in a 0700 directory
    /// nobody else can reach. `None`: the config's listen mode, i.e. `<socket_dir>/<port>.sock`
    /// when the hub listens on unix sockets ([`ExportSpec::placed`]), else TCP on `port`.
    pub socket: Option<PathBuf>,
    /// The CN of the one client besides the hub that may open a TLS export
    /// ([`crate::nbd_ca::backup_identity`], [`crate::nbd_ca::restore_identity`],
    /// [`crate::nbd_ca::recovery_identity`]); `None`: the
    /// hub only. Unused without TLS.
    pub client: Option<String>,
}

impl ExportSpec {
    /// Whether this export is served with TLS under `cfg`: every export a client besides the
    /// hub opens (TCP or the shared socket directory: defense in depth behind its modes); the
    /// hub's own read-back sockets stay plain.
    pub fn uses_tls(&self, cfg: &QemuNbdConfig) -> bool {
        cfg.tls.is_some() && (self.socket.is_none() || self.client.is_some())
    }

    /// With the listen mode applied: an export without a socket of its own gets
    /// `<socket_dir>/<port>.sock` when the hub listens on unix sockets.
    pub fn placed(mut self, cfg: &QemuNbdConfig) -> ExportSpec {
        if self.socket.is_none()
            && let Some(dir) = &cfg.socket_dir
        {
            self.socket = Some(socket_path(dir, self.port));
        }
        self
    }

    /// Whether its socket lies in the shared socket directory (the tunnel user's group must
    /// reach it), as opposed to a private one or TCP.
    pub fn in_socket_dir(&self, cfg: &QemuNbdConfig) -> bool {
        match (&self.socket, &cfg.socket_dir) {
            (Some(s), Some(dir)) => s.parent() == Some(dir.as_path()),
            _ => false,
        }
    }
}

/// The socket of slot `port` in the socket directory: `<dir>/<port>.sock`, the name the node's
/// streamlocal forwards point at.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("{port}.sock"))
}

impl ExportSpec {
    pub(super) fn validate(&self) -> Result<(), QemuNbdError> {
        // `<vm>-disk-<key>`: longer than a name may be.
        sendense_shared::names::validate_name_up_to(
            "export_name",
            &self.export_name,
            sendense_shared::names::MAX_EXPORT_NAME_LEN,
        )
        .map_err(|e| QemuNbdError::InvalidSpec {
            field: "export_name",
            reason: e.to_string(),
        })?;
        if self.port == 0 && self.socket.is_none() {
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
    ];
    match &spec.socket {
        Some(socket) => args.push(format!("--socket={}", socket.display())),
        None => {
            args.push(format!("--bind={}", cfg.bind));
            args.push(format!("--port={}", spec.port));
        }
    }
    args.extend([
        "--persistent".to_string(),
        format!("--shared={}", cfg.shared_connections),
        // This order: qemu-nbd 7.2 refuses detect-zeroes=unmap before discard=unmap.
        "--discard=unmap".to_string(),
        "--detect-zeroes=unmap".to_string(),
        format!("--cache={}", cfg.cache),
    ]);
    if let Some(aio) = &cfg.aio {
        args.push(format!("--aio={aio}"));
    }
    if spec.read_only {
        args.push("--read-only".to_string());
    }
    if let Some(ca) = cfg.tls.as_ref().filter(|_| spec.uses_tls(cfg)) {
        args.extend(tls_args(ca, spec));
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

/// TLS with client certificates (`verify-peer`) and an authz allowing the writer and the hub.
/// As JSON (qemu 7.2 takes `--object` as JSON; `authz-list` needs it for its rules, and a
/// directory name with a comma cannot break it).
fn tls_args(ca: &NbdCa, spec: &ExportSpec) -> Vec<String> {
    let creds = serde_json::json!({
        "qom-type": "tls-creds-x509",
        "id": "tls0",
        "dir": ca.server_dir().to_string_lossy(),
        "endpoint": "server",
        "verify-peer": true,
    });
    let mut rules = vec![serde_json::json!({"match": dn(HUB_CN), "policy": "allow"})];
    if let Some(cn) = &spec.client {
        rules.push(serde_json::json!({"match": dn(cn), "policy": "allow"}));
    }
    let authz = serde_json::json!({
        "qom-type": "authz-list",
        "id": "auth0",
        "policy": "deny",
        "rules": rules,
    });
    vec![
        "--object".to_string(),
        creds.to_string(),
        "--object".to_string(),
        authz.to_string(),
        "--tls-creds=tls0".to_string(),
        "--tls-authz=auth0".to_string(),
    ]
}

/// cache=none and directsync open the image with O_DIRECT, which some file systems refuse (tmpfs
/// before Linux 6.6): there qemu-nbd would exit with "Invalid argument". Such an image is served
/// with cache=writeback (and qemu's default aio) instead, and the log says so.
pub(super) fn adapt_to_file_system(cfg: &QemuNbdConfig, image: &Path) -> QemuNbdConfig {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_nbd::test_support::{spec, strings};

    #[test]
    fn tls_exports_name_the_writer_and_the_hub_and_private_sockets_stay_plain() {
        let data = tempfile::tempdir().unwrap();
        let cfg = QemuNbdConfig {
            tls: Some(NbdCa::open(data.path()).unwrap()),
            ..QemuNbdConfig::default()
        };
        let s = ExportSpec {
            client: Some(crate::nbd_ca::backup_identity("b1")),
            ..spec()
        };
        let args = command_args(&cfg, &s);
        let objects: Vec<serde_json::Value> = args
            .windows(2)
            .filter(|w| w[0] == "--object")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(objects[0]["qom-type"], "tls-creds-x509");
        assert_eq!(objects[0]["verify-peer"], true);
        assert_eq!(objects[0]["endpoint"], "server");
        assert_eq!(objects[1]["qom-type"], "authz-list");
        assert_eq!(objects[1]["policy"], "deny");
        let allowed: Vec<&str> = objects[1]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["match"].as_str().unwrap())
            .collect();
        assert_eq!(allowed, ["CN=sendense-hub", "CN=sendense-job-b1"]);
        assert!(args.contains(&"--tls-creds=tls0".to_string()));
        assert!(args.contains(&"--tls-authz=auth0".to_string()));
        assert_eq!(args.last().unwrap(), "/repo/vm1/2000/b1.qcow2");
        // The hub's read-backs: a unix socket in a private directory, no client but the hub,
        // no TLS. (An export a node opens keeps TLS on a socket too.)
        let unix = ExportSpec {
            socket: Some("/run/x/s".into()),
            client: None,
            ..s
        };
        assert!(!command_args(&cfg, &unix).iter().any(|a| a.contains("tls")));
    }

    #[test]
    fn unix_listen_mode_serves_slot_sockets_with_tls_for_the_writer() {
        let data = tempfile::tempdir().unwrap();
        let cfg = QemuNbdConfig {
            tls: Some(NbdCa::open(data.path()).unwrap()),
            socket_dir: Some("/run/sendense-nbd".into()),
            ..QemuNbdConfig::default()
        };
        let s = ExportSpec {
            client: Some(crate::nbd_ca::backup_identity("b1")),
            ..spec()
        }
        .placed(&cfg);
        assert_eq!(
            s.socket.as_deref(),
            Some(Path::new("/run/sendense-nbd/10105.sock"))
        );
        assert!(s.in_socket_dir(&cfg));
        let args = command_args(&cfg, &s);
        assert!(args.contains(&"--socket=/run/sendense-nbd/10105.sock".to_string()));
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--port") || a.starts_with("--bind"))
        );
        assert!(args.contains(&"--tls-creds=tls0".to_string()), "{args:?}");
        // A private socket of its own stays where it is, and TCP mode stays TCP.
        let own = ExportSpec {
            socket: Some("/x/readback/1.sock".into()),
            client: None,
            ..spec()
        }
        .placed(&cfg);
        assert_eq!(own.socket.as_deref(), Some(Path::new("/x/readback/1.sock")));
        assert!(!own.in_socket_dir(&cfg));
        assert_eq!(spec().placed(&QemuNbdConfig::default()).socket, None);
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
            socket: None,
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
}
