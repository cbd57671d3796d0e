//! The hub's configuration: built-in defaults, then a TOML file (`--config`), then environment
//! variables (`SENDENSE_HUB_*`), then command-line flags; a later source wins.
//!
//! Defaults work with no file at all: everything lives under one data directory
//! (`/var/lib/sendense-hub`, or `$SENDENSE_HUB_DATA_DIR`): the SQLite database `hub.db`, the
//! repository `repo/` (registered as id `default`), the token file `token`, the node
//! credentials' key `node-credentials.key` and the logs `logs/`. Repositories registered
//! through the API must lie under `repository_roots` (default: the data directory).
//! A MySQL password comes from `database_password_file` (or `SENDENSE_HUB_DATABASE_PASSWORD`),
//! so it never has to be on a command line.

use crate::ports::PortRange;
use crate::qemu_nbd::{NbdListen, QemuNbdConfig};
use clap::Parser;
use sendense_shared::cli::{DocsCommand, LogFormat};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Where everything lives when nothing else is said.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sendense-hub";
/// The API port of the original system; the node's tunnel forwards it.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8082);
/// 101 ports: the ceiling of concurrent disk exports.
pub const DEFAULT_NBD_PORTS: PortRange = PortRange {
    first: 10100,
    last: 10200,
};
/// Id under which `<data>/repo` is registered at start-up.
pub const DEFAULT_REPOSITORY_ID: &str = "default";

/// Why the configuration could not be built.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("database_password_file")]
    PasswordFile(#[source] sendense_shared::token::TokenError),
    #[error(
        "database_password_file / SENDENSE_HUB_DATABASE_PASSWORD: the database URL already \
         holds a password; give it in one place only (the file, so it is on no command line)"
    )]
    PasswordTwice,
    #[error(
        "database_password_file / SENDENSE_HUB_DATABASE_PASSWORD: {url} is not a mysql:// URL \
         with a user (mysql://user@host:3306/database)"
    )]
    PasswordUrl { url: String },
    #[error("{field}: {value:?} is not a port range like 10100-10200 ({reason})")]
    Ports {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Command line of `sendense-hub`. Each flag also reads `SENDENSE_HUB_<FLAG>` from the
/// environment (the flag wins), and falls back to the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "sendense-hub",
    about = "Sendense backup server: HTTP API, NBD exports (qemu-nbd), QCOW2 repository",
    disable_version_flag = true
)]
pub struct Cli {
    /// Print version, git commit, build time and executable path, then exit.
    #[arg(short = 'V', long)]
    pub version: bool,
    /// TOML configuration file.
    #[arg(long, env = "SENDENSE_HUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8082].
    #[arg(long, env = "SENDENSE_HUB_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, repository, token and logs [default: /var/lib/sendense-hub].
    #[arg(long, env = "SENDENSE_HUB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// `sqlite:///path/hub.db` or `mysql://user:password@host:3306/db` [default: <data>/hub.db].
    #[arg(
        long,
        env = "SENDENSE_HUB_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// File holding the MySQL/MariaDB password (mode 0600; one line), put into the
    /// `--database-url` (which then names only the user), so no password is on a command
    /// line. `SENDENSE_HUB_DATABASE_PASSWORD` gives it through the environment instead.
    #[arg(long, env = "SENDENSE_HUB_DATABASE_PASSWORD_FILE", value_name = "FILE")]
    pub database_password_file: Option<PathBuf>,
    /// File holding the bearer token of the API; created (mode 0600) if missing
    /// [default: <data>/token].
    #[arg(long, env = "SENDENSE_HUB_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Inclusive range of NBD ports handed to qemu-nbd [default: 10100-10200].
    #[arg(long, env = "SENDENSE_HUB_NBD_PORTS", value_name = "FIRST-LAST")]
    pub nbd_ports: Option<String>,
    /// Address qemu-nbd binds its exports to [default: 127.0.0.1].
    #[arg(long, env = "SENDENSE_HUB_NBD_BIND", value_name = "ADDR")]
    pub nbd_bind: Option<IpAddr>,
    /// TLS with per-job client certificates on the NBD exports; `false` for writers without a
    /// certificate (nbdcopy on the hub, an older node) [default: true].
    #[arg(long, env = "SENDENSE_HUB_NBD_TLS", value_name = "BOOL")]
    pub nbd_tls: Option<bool>,
    /// Where the exports listen: `unix` (sockets `<nbd_socket_dir>/<port>.sock`, reached through
    /// the node's ssh streamlocal forwards; nobody outside the directory's group can connect)
    /// or `tcp` (`nbd_bind:port`, for writers on the hub such as nbdcopy) [default: unix].
    #[arg(long, env = "SENDENSE_HUB_NBD_LISTEN", value_name = "unix|tcp")]
    pub nbd_listen: Option<NbdListen>,
    /// Directory of the exports' unix sockets (0750; group `nbd_socket_group` of the file)
    /// [default: <data>/nbd].
    #[arg(long, env = "SENDENSE_HUB_NBD_SOCKET_DIR", value_name = "DIR")]
    pub nbd_socket_dir: Option<PathBuf>,
    /// Group given the socket directory: the ssh tunnel user's (the hub's user must be a
    /// member) [default: the hub's own group].
    #[arg(long, env = "SENDENSE_HUB_NBD_SOCKET_GROUP", value_name = "GROUP")]
    pub nbd_socket_group: Option<String>,
    /// TEST KNOB, never for production: read the hub's time from this file (an RFC 3339
    /// instant; see `agent_hub::clock::FileClock`), so a test runs months of schedule in
    /// minutes.
    #[arg(
        long,
        env = "SENDENSE_HUB_TEST_CLOCK_FILE",
        value_name = "FILE",
        hide = true
    )]
    pub test_clock_file: Option<PathBuf>,
    /// Backups that may run at once on the hub before scheduled policy runs wait in the queue
    /// (manual backups are not held back) [default: 8].
    #[arg(long, env = "SENDENSE_HUB_MAX_CONCURRENT_BACKUPS", value_name = "N")]
    pub max_concurrent_backups: Option<usize>,
    /// The same limit per node [default: 2].
    #[arg(
        long,
        env = "SENDENSE_HUB_MAX_CONCURRENT_BACKUPS_PER_NODE",
        value_name = "N"
    )]
    pub max_concurrent_backups_per_node: Option<usize>,
    /// How often the policy scheduler looks for due slots and queued runs, in seconds
    /// [default: 5].
    #[arg(
        long,
        env = "SENDENSE_HUB_POLICY_CHECK_INTERVAL_SECS",
        value_name = "SECS"
    )]
    pub policy_check_interval_secs: Option<u64>,
    /// Directory of the daily log files [default: <data>/logs].
    #[arg(long, env = "SENDENSE_HUB_LOG_DIR", value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Log lines as `text` or `json` (one object a line: timestamp, level, target, message,
    /// fields), on stderr and in the daily files [default: text].
    #[arg(
        long,
        env = "SENDENSE_HUB_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum
    )]
    pub log_format: Option<LogFormat>,
    /// A directory under which the API may register repositories; repeatable, replaces
    /// `repository_roots` of the file [default: the data directory].
    #[arg(long = "repository-root", value_name = "DIR")]
    pub repository_roots: Vec<PathBuf>,
    /// A command instead of serving (`sendense-hub node enroll NAME`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `sendense-hub` does instead of serving the API.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Node credentials: each node calls the hub with its own, which acts only on its VMs,
    /// jobs and restores.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Read a backup image (with its backing chain) back and compare it with its whole-disk
    /// checksums, without the database or a running hub: exit 0 when every cell matches, 3
    /// when some differ (listed), 1 when it cannot be read.
    CheckImage(CheckImageArgs),
    /// Hidden: `man DIR`, `completions SHELL` (the Debian packages are built with them).
    #[command(flatten)]
    Docs(DocsCommand),
}

/// `sendense-hub check-image IMAGE`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckImageArgs {
    /// The QCOW2 image of a backup point (`<repository>/<vm>/<disk>/<backup_id>.qcow2`).
    pub image: PathBuf,
    /// Its checksum sidecar [default: IMAGE.sums].
    #[arg(long, value_name = "FILE")]
    pub sums: Option<PathBuf>,
    /// The sidecar's BLAKE3 as the catalog recorded it (`backup_disks.manifest_blake3`): a
    /// sidecar that differs is refused.
    #[arg(long, value_name = "HEX")]
    pub digest: Option<String>,
    /// Compute the image's checksums and write them as the sidecar instead of checking (for
    /// an image that has none; the checksums are then only what the image holds now).
    #[arg(long)]
    pub compute: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sendense-hub node ...`. The credential is printed on stdout alone (or written to
/// `--output`, mode 0600); the node reads it from its `token_file`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCommand {
    /// Issue the first credential of node NAME (also after a revocation).
    Enroll {
        name: String,
        /// Write the credential to FILE (mode 0600, replaced atomically) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Issue a new credential for NAME; the old one keeps working until the node first uses
    /// the new one, or until the grace period (`credential_grace_secs`, 24 h) ends.
    Rotate {
        name: String,
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// End every credential of NAME now: its next request is refused.
    Revoke { name: String },
}

/// The TOML file. Every key is optional; unknown keys are refused so a typo does not silently
/// fall back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    /// File with the database password (see [`Cli::database_password_file`]).
    pub database_password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Directories under which `POST /api/v1/repositories` may register a repository
    /// [default: the data directory].
    pub repository_roots: Option<Vec<PathBuf>>,
    /// The key node credentials are derived from (created, mode 0600, if missing)
    /// [default: <data>/node-credentials.key].
    pub credential_key_file: Option<PathBuf>,
    /// How long a rotated node credential keeps working when the node does not switch
    /// earlier, in seconds [default: 86400].
    pub credential_grace_secs: Option<u64>,
    pub nbd_ports: Option<String>,
    pub nbd_bind: Option<IpAddr>,
    pub log_dir: Option<PathBuf>,
    /// `tracing` filter, e.g. `"info"` or `"agent_hub=debug,info"`.
    pub log_level: Option<String>,
    /// `"text"` or `"json"` (see [`Cli::log_format`]).
    pub log_format: Option<LogFormat>,
    /// Directory registered as repository `default` [default: <data>/repo].
    pub default_repository: Option<PathBuf>,
    /// How long a call to a node's API may take, in seconds [default: 30].
    pub node_timeout_secs: Option<u64>,
    /// A node job without a report for this long is checked with the node, in seconds
    /// [default: 5].
    pub node_watch_interval_secs: Option<u64>,
    /// A node that stays unreachable this long while its job runs fails the job, in seconds
    /// [default: 30].
    pub node_lost_after_secs: Option<u64>,
    /// A running job whose node reports progress but no byte moved for this long fails, in
    /// seconds [default: 600] (the node's own watchdog, 60 s, normally fails it first).
    pub job_stall_after_secs: Option<u64>,
    /// An instant recovery whose export cannot be started again for this long fails (its VM
    /// stops, the guest's writes are lost); until then the VM waits, paused, in seconds
    /// [default: 1800].
    pub recovery_export_grace_secs: Option<u64>,
    /// File browsing: a session's appliance closes after this long without a request, in
    /// seconds [default: 300].
    pub files_idle_timeout_secs: Option<u64>,
    /// File browsing: at most this many appliances at once [default: 4].
    pub files_max_sessions: Option<usize>,
    /// File browsing: the guestfish binary [default: guestfish].
    pub guestfish: Option<String>,
    /// How long a job's end (finalization) waits for an unreachable database before leaving
    /// the job `finalizing`, images kept, to the next start's reconciler, in seconds
    /// [default: 3600].
    pub db_outage_patience_secs: Option<u64>,
    /// qemu-nbd settings (binary, cache mode, `--shared`, timeouts).
    #[serde(default)]
    pub qemu_nbd: Option<QemuNbdConfig>,
    /// TLS with per-job client certificates on every NBD export (default true). `false` serves
    /// the exports plain, as before: for writers that cannot present a certificate (a hub-alone
    /// writer such as nbdcopy, an older node); any local user can then open a running job's
    /// exports.
    #[serde(default)]
    pub nbd_tls: Option<bool>,
    /// `unix` (default) or `tcp`, see [`Cli::nbd_listen`].
    #[serde(default)]
    pub nbd_listen: Option<NbdListen>,
    /// See [`Cli::nbd_socket_dir`].
    #[serde(default)]
    pub nbd_socket_dir: Option<PathBuf>,
    /// The group given the socket directory, e.g. `sendense-nbd`: the tunnel user's group (the
    /// hub's user must be a member too). Unset: the hub's own group.
    #[serde(default)]
    pub nbd_socket_group: Option<String>,
    /// Test knob (see [`Cli::test_clock_file`]).
    #[serde(default)]
    pub test_clock_file: Option<PathBuf>,
    /// See [`Cli::max_concurrent_backups`].
    pub max_concurrent_backups: Option<usize>,
    /// See [`Cli::max_concurrent_backups_per_node`].
    pub max_concurrent_backups_per_node: Option<usize>,
    /// See [`Cli::policy_check_interval_secs`].
    pub policy_check_interval_secs: Option<u64>,
    /// Webhook receivers, `[[webhook]]` tables ([`crate::webhooks`]).
    #[serde(default)]
    pub webhook: Option<Vec<crate::webhooks::WebhookConfig>>,
    /// How often the webhooks' periodic conditions are checked, in seconds [default: 60].
    pub alert_check_interval_secs: Option<u64>,
    /// A repository with less free space than this (percent) is nearly full [default: 10].
    pub repository_full_percent: Option<u8>,
    /// A tunnel not up for this long is told as down, in seconds [default: 300].
    pub tunnel_down_alert_secs: Option<u64>,
    /// Added to a policy's period and queue window before its VM is told as without a good
    /// point, in seconds [default: 3600].
    pub stale_point_grace_secs: Option<u64>,
}

/// The resolved configuration the hub runs with.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub token_file: PathBuf,
    /// Where the API may register repositories (as configured; canonicalized when checked).
    pub repository_roots: Vec<PathBuf>,
    pub credential_key_file: PathBuf,
    pub credential_grace: Duration,
    pub nbd_ports: PortRange,
    pub nbd_bind: IpAddr,
    pub log_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub default_repository: PathBuf,
    pub node_timeout: Duration,
    pub node_watch_interval: Duration,
    pub node_lost_after: Duration,
    pub job_stall_after: Duration,
    /// See [`ConfigFile::recovery_export_grace_secs`].
    pub recovery_export_grace: Duration,
    pub db_outage_patience: Duration,
    /// File browsing of backup points ([`crate::files`]).
    pub files: crate::files::FilesConfig,
    pub qemu_nbd: QemuNbdConfig,
    /// TLS with client certificates on the NBD exports (the CA is opened at start-up, see
    /// [`crate::nbd_ca`]).
    pub nbd_tls: bool,
    /// Unix sockets (default) or TCP for the exports nodes open.
    pub nbd_listen: NbdListen,
    /// The exports' socket directory (`nbd_listen = "unix"`).
    pub nbd_socket_dir: PathBuf,
    /// The group of that directory; `None`: the hub's own.
    pub nbd_socket_group: Option<String>,
    /// Test knob: the hub's time from this file instead of the wall clock
    /// ([`crate::clock::FileClock`]). `None` in production.
    pub test_clock_file: Option<PathBuf>,
    /// Concurrency limits of scheduled policy runs ([`crate::policies::admission`]).
    pub max_concurrent_backups: usize,
    pub max_concurrent_backups_per_node: usize,
    /// The policy scheduler's tick ([`crate::policies::scheduler`]).
    pub policy_check_interval: Duration,
    /// Webhook receivers and the limits of their periodic conditions.
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    pub alert_check_interval: Duration,
    pub alerts: crate::webhooks::watch::Settings,
}

impl HubConfig {
    /// Defaults for a data directory, nothing else set.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        HubConfig {
            listen: DEFAULT_LISTEN,
            database_url: sqlite_url(&data_dir.join("hub.db")),
            token_file: data_dir.join("token"),
            repository_roots: vec![data_dir.clone()],
            credential_key_file: data_dir.join("node-credentials.key"),
            credential_grace: crate::auth::credentials::DEFAULT_GRACE,
            nbd_ports: DEFAULT_NBD_PORTS,
            nbd_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            log_dir: data_dir.join("logs"),
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
            default_repository: data_dir.join("repo"),
            node_timeout: Duration::from_secs(30),
            node_watch_interval: Duration::from_secs(5),
            node_lost_after: Duration::from_secs(30),
            job_stall_after: Duration::from_secs(600),
            recovery_export_grace: Duration::from_secs(1800),
            db_outage_patience: Duration::from_secs(3600),
            files: crate::files::FilesConfig::default(),
            qemu_nbd: QemuNbdConfig {
                bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
                ..QemuNbdConfig::default()
            },
            nbd_tls: true,
            nbd_listen: NbdListen::Unix,
            nbd_socket_dir: data_dir.join("nbd"),
            nbd_socket_group: None,
            test_clock_file: None,
            max_concurrent_backups: 8,
            max_concurrent_backups_per_node: 2,
            policy_check_interval: Duration::from_secs(5),
            webhooks: Vec::new(),
            alert_check_interval: Duration::from_secs(60),
            alerts: crate::webhooks::watch::Settings::default(),
            data_dir,
        }
    }

    /// Resolves flags (which already carry the environment, see [`Cli`]) over the file over the
    /// defaults.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(cli, file)
    }

    /// The merge itself, separate from file reading so it is testable.
    pub fn resolve(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let data_dir = cli
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut cfg = HubConfig::with_data_dir(data_dir);
        if let Some(v) = cli.listen.or(file.listen) {
            cfg.listen = v;
        }
        if let Some(v) = cli.database_url.clone().or(file.database_url) {
            cfg.database_url = v;
        }
        if let Some(v) = cli.token_file.clone().or(file.token_file) {
            cfg.token_file = v;
        }
        if !cli.repository_roots.is_empty() {
            cfg.repository_roots = cli.repository_roots.clone();
        } else if let Some(v) = file.repository_roots {
            cfg.repository_roots = v;
        }
        if let Some(v) = file.credential_key_file {
            cfg.credential_key_file = v;
        }
        if let Some(v) = file.credential_grace_secs {
            cfg.credential_grace = Duration::from_secs(v);
        }
        let password = match cli
            .database_password_file
            .clone()
            .or(file.database_password_file)
        {
            Some(f) => Some(
                sendense_shared::token::read_token_file(&f).map_err(ConfigError::PasswordFile)?,
            ),
            None => std::env::var("SENDENSE_HUB_DATABASE_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty())
                .map(sendense_shared::token::Token::from),
        };
        if let Some(p) = password {
            cfg.database_url = with_password(&cfg.database_url, p.as_str())?;
        }
        if let Some(v) = cli.nbd_ports.clone().or(file.nbd_ports) {
            cfg.nbd_ports = parse_ports(&v)?;
        }
        if let Some(v) = cli.log_dir.clone().or(file.log_dir) {
            cfg.log_dir = v;
        }
        if let Some(v) = file.log_level {
            cfg.log_level = v;
        }
        if let Some(v) = cli.log_format.or(file.log_format) {
            cfg.log_format = v;
        }
        if let Some(v) = file.default_repository {
            cfg.default_repository = v;
        }
        if let Some(v) = file.node_timeout_secs {
            cfg.node_timeout = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.node_watch_interval_secs {
            cfg.node_watch_interval = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.node_lost_after_secs {
            cfg.node_lost_after = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.recovery_export_grace_secs {
            cfg.recovery_export_grace = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.job_stall_after_secs {
            cfg.job_stall_after = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.files_idle_timeout_secs {
            cfg.files.idle_timeout = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.files_max_sessions {
            cfg.files.max_sessions = v.max(1);
        }
        if let Some(v) = file.guestfish {
            cfg.files.guestfish = v;
        }
        if let Some(v) = file.webhook {
            cfg.webhooks = v;
        }
        if let Some(v) = file.alert_check_interval_secs {
            cfg.alert_check_interval = Duration::from_secs(v.max(1));
        }
        if let Some(v) = file.repository_full_percent {
            if v > 100 {
                return Err(ConfigError::Invalid {
                    field: "repository_full_percent",
                    reason: format!("{v} is more than 100"),
                });
            }
            cfg.alerts.repository_full_percent = v;
        }
        if let Some(v) = file.tunnel_down_alert_secs {
            cfg.alerts.tunnel_down_after = chrono::Duration::seconds(v as i64);
        }
        if let Some(v) = file.stale_point_grace_secs {
            cfg.alerts.stale_grace = chrono::Duration::seconds(v as i64);
        }
        if let Some(v) = file.db_outage_patience_secs {
            cfg.db_outage_patience = Duration::from_secs(v.max(1));
        }
        if let Some(q) = file.qemu_nbd {
            cfg.qemu_nbd = q;
        }
        if let Some(v) = cli.nbd_tls.or(file.nbd_tls) {
            cfg.nbd_tls = v;
        }
        if let Some(v) = cli.nbd_listen.or(file.nbd_listen) {
            cfg.nbd_listen = v;
        }
        if let Some(v) = cli.nbd_socket_dir.clone().or(file.nbd_socket_dir) {
            cfg.nbd_socket_dir = v;
        }
        cfg.nbd_socket_group = cli.nbd_socket_group.clone().or(file.nbd_socket_group);
        cfg.test_clock_file = cli.test_clock_file.clone().or(file.test_clock_file);
        if let Some(v) = cli.max_concurrent_backups.or(file.max_concurrent_backups) {
            cfg.max_concurrent_backups = v.max(1);
        }
        if let Some(v) = cli
            .max_concurrent_backups_per_node
            .or(file.max_concurrent_backups_per_node)
        {
            cfg.max_concurrent_backups_per_node = v.max(1);
        }
        if let Some(v) = cli
            .policy_check_interval_secs
            .or(file.policy_check_interval_secs)
        {
            cfg.policy_check_interval = Duration::from_secs(v.max(1));
        }
        // One bind address for the port test and for qemu-nbd: the test is only meaningful on
        // the address qemu-nbd will really use.
        if let Some(v) = cli.nbd_bind.or(file.nbd_bind) {
            cfg.nbd_bind = v;
        }
        cfg.qemu_nbd.bind = cfg.nbd_bind;
        Ok(cfg)
    }
}

/// `sqlite://` URL of a database file, created if missing.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `mysql://user@host/db` with `password` put in (percent-encoded, so any byte is fine).
fn with_password(url: &str, password: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::PasswordUrl {
        url: crate::db::redact(url),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if !matches!(scheme, "mysql" | "mariadb") {
        return Err(bad());
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (user, host) = rest[..authority_end].rsplit_once('@').ok_or_else(bad)?;
    if user.contains(':') {
        return Err(ConfigError::PasswordTwice);
    }
    if user.is_empty() {
        return Err(bad());
    }
    let mut encoded = String::new();
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!(
        "{scheme}://{user}:{encoded}@{host}{}",
        &rest[authority_end..]
    ))
}

/// Parses `FIRST-LAST` (inclusive, FIRST <= LAST, no port 0).
pub fn parse_ports(value: &str) -> Result<PortRange, ConfigError> {
    let err = |reason: &str| ConfigError::Ports {
        field: "nbd_ports",
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (a, b) = value
        .trim()
        .split_once('-')
        .ok_or_else(|| err("missing '-'"))?;
    let first: u16 = a
        .trim()
        .parse()
        .map_err(|_| err("first port is not a number in 1-65535"))?;
    let last: u16 = b
        .trim()
        .parse()
        .map_err(|_| err("last port is not a number in 1-65535"))?;
    if first == 0 {
        return Err(err("port 0 is not a port"));
    }
    if first > last {
        return Err(err("first port is above the last"));
    }
    Ok(PortRange { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_live_under_the_data_dir() {
        let cfg = HubConfig::resolve(
            &Cli {
                data_dir: Some("/tmp/x".into()),
                ..Cli::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(cfg.listen, DEFAULT_LISTEN);
        assert_eq!(cfg.database_url, "sqlite:///tmp/x/hub.db?mode=rwc");
        assert_eq!(cfg.token_file, PathBuf::from("/tmp/x/token"));
        assert_eq!(cfg.log_dir, PathBuf::from("/tmp/x/logs"));
        assert_eq!(cfg.default_repository, PathBuf::from("/tmp/x/repo"));
        assert_eq!((cfg.nbd_ports.first, cfg.nbd_ports.last), (10100, 10200));
        assert_eq!(cfg.nbd_bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn exports_listen_on_unix_sockets_unless_tcp_is_asked_for() {
        let cfg = HubConfig::resolve(&Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(cfg.nbd_listen, NbdListen::Unix);
        assert_eq!(
            cfg.nbd_socket_dir,
            PathBuf::from(DEFAULT_DATA_DIR).join("nbd")
        );
        let file: FileConfig = toml::from_str(
            "nbd_listen = \"tcp\"\nnbd_socket_dir = \"/run/sendense-nbd\"\nnbd_socket_group = \"sendense-nbd\"",
        )
        .unwrap();
        let cfg = HubConfig::resolve(&Cli::default(), file).unwrap();
        assert_eq!(cfg.nbd_listen, NbdListen::Tcp);
        assert_eq!(cfg.nbd_socket_dir, PathBuf::from("/run/sendense-nbd"));
        assert_eq!(cfg.nbd_socket_group.as_deref(), Some("sendense-nbd"));
        let cli = Cli::try_parse_from(["sendense-hub", "--nbd-listen", "unix"]).unwrap();
        let file: FileConfig = toml::from_str("nbd_listen = \"tcp\"").unwrap();
        assert_eq!(
            HubConfig::resolve(&cli, file).unwrap().nbd_listen,
            NbdListen::Unix
        );
        assert!(toml::from_str::<FileConfig>("nbd_listen = \"udp\"").is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/srv/hub"
            nbd_ports = "11000-11010"
            log_level = "debug"
            "#,
        )
        .unwrap();
        let cli = Cli {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Cli::default()
        };
        let cfg = HubConfig::resolve(&cli, file).unwrap();
        assert_eq!(cfg.listen.port(), 9001);
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/hub"));
        assert_eq!((cfg.nbd_ports.first, cfg.nbd_ports.last), (11000, 11010));
        assert_eq!(cfg.log_level, "debug");
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let file: FileConfig = toml::from_str(include_str!("../hub.example.toml")).unwrap();
        let cfg = HubConfig::resolve(&Cli::default(), file).unwrap();
        let defaults = HubConfig::with_data_dir(DEFAULT_DATA_DIR);
        assert_eq!(cfg.listen, defaults.listen);
        assert_eq!(cfg.data_dir, defaults.data_dir);
        assert_eq!(cfg.nbd_ports, defaults.nbd_ports);
        assert_eq!(cfg.node_lost_after, defaults.node_lost_after);
        assert_eq!(cfg.qemu_nbd, defaults.qemu_nbd);
        assert_eq!(cfg.nbd_tls, defaults.nbd_tls);
    }

    #[test]
    fn the_log_format_comes_from_the_flag_over_the_file() {
        let text = HubConfig::resolve(&Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(text.log_format, LogFormat::Text);
        let file: FileConfig = toml::from_str("log_format = \"json\"").unwrap();
        let json = HubConfig::resolve(&Cli::default(), file.clone()).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["sendense-hub", "--log-format", "text"]).unwrap();
        assert_eq!(
            HubConfig::resolve(&cli, file).unwrap().log_format,
            LogFormat::Text
        );
        assert!(toml::from_str::<FileConfig>("log_format = \"xml\"").is_err());
    }

    #[test]
    fn nbd_tls_is_on_unless_the_file_or_a_flag_turns_it_off() {
        let on = HubConfig::resolve(&Cli::default(), FileConfig::default()).unwrap();
        assert!(on.nbd_tls);
        let file: FileConfig = toml::from_str("nbd_tls = false").unwrap();
        assert!(!HubConfig::resolve(&Cli::default(), file).unwrap().nbd_tls);
        let file: FileConfig = toml::from_str("nbd_tls = false").unwrap();
        let cli = Cli {
            nbd_tls: Some(true),
            ..Cli::default()
        };
        assert!(HubConfig::resolve(&cli, file).unwrap().nbd_tls);
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_refused() {
        assert!(toml::from_str::<FileConfig>("listn = \"x\"").is_err());
        for bad in ["10100", "a-b", "10200-10100", "0-5", "10100-70000"] {
            let e = parse_ports(bad).unwrap_err().to_string();
            assert!(e.contains("nbd_ports"), "{bad}: {e}");
        }
        assert_eq!(parse_ports(" 10-12 ").unwrap().last, 12);
    }

    #[test]
    fn the_database_password_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("db-password");
        std::fs::write(&f, "p@ss:w/rd\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cli = Cli {
            data_dir: Some("/tmp/x".into()),
            database_url: Some("mysql://hub@127.0.0.1:3306/sendense".into()),
            database_password_file: Some(f.clone()),
            ..Cli::default()
        };
        let cfg = HubConfig::resolve(&cli, FileConfig::default()).unwrap();
        assert_eq!(
            cfg.database_url,
            "mysql://hub:p%40ss%3Aw%2Frd@127.0.0.1:3306/sendense"
        );
        assert_eq!(
            crate::db::redact(&cfg.database_url),
            "mysql://hub:***@127.0.0.1:3306/sendense"
        );
        // A password in two places is refused, not silently picked.
        let twice = Cli {
            database_url: Some("mysql://hub:x@127.0.0.1/sendense".into()),
            ..cli.clone()
        };
        let e = HubConfig::resolve(&twice, FileConfig::default()).unwrap_err();
        assert!(matches!(e, ConfigError::PasswordTwice), "{e}");
        // Readable by others: refused, naming the file and its mode.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = HubConfig::resolve(&cli, FileConfig::default()).unwrap_err();
        let shown = sendense_shared::errors::chain(&e);
        assert!(shown.contains(&f.display().to_string()), "{shown}");
        assert!(shown.contains("0644"), "{shown}");
    }

    #[test]
    fn the_cli_knows_the_node_commands() {
        let cli = Cli::try_parse_from(["sendense-hub", "--data-dir", "/d", "node", "enroll", "n1"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Node(NodeCommand::Enroll { ref name, output: None })) if name == "n1"
        ));
        for c in ["rotate", "revoke"] {
            assert!(Cli::try_parse_from(["sendense-hub", "node", c, "n1"]).is_ok());
        }
        assert!(Cli::try_parse_from(["sendense-hub", "node", "enroll"]).is_err());
    }

    #[test]
    fn the_cli_knows_the_documented_flags() {
        let cli = Cli::try_parse_from([
            "sendense-hub",
            "--config",
            "/c.toml",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            "/d",
            "--database-url",
            "sqlite::memory:",
            "--token-file",
            "/t",
            "--nbd-ports",
            "1-2",
            "--nbd-bind",
            "127.0.0.1",
            "--log-dir",
            "/l",
        ])
        .unwrap();
        assert_eq!(cli.nbd_ports.as_deref(), Some("1-2"));
        assert_eq!(cli.log_format, None);
        assert_eq!(cli.log_dir, Some(PathBuf::from("/l")));
    }
}
