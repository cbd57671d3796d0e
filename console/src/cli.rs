//! The command line. Without a subcommand it opens the TUI; with one it runs once, prints to
//! stdout what a script reads (ids, JSON), progress and errors to stderr, and exits with a
//! status that says the outcome (see [`exit`]).
//!
//! - `backups`: `backups list`, `backup start`, `backup cancel`.
//! - `restores`: `restores list`, `restore start`, `restore cancel`.
//! - `recover`: `recover start|list|show|cancel` (instant recoveries: a point booted on a node
//!   while its disks stream home).
//! - `verify`: `verify --backup ID | --vm NAME | --repository ID`, `verify list`,
//!   `verify cancel`.
//! - `policies`: `policy create|list|show|update|delete|run-now`.
//! - `files`: `files ls BACKUP [PATH]`, `files get BACKUP PATH > out.tar` (browse a point).
//! - `prune`: `points list VM`, `point protect|unprotect ID`, `prune VM [--dry-run]`.

mod backups;
pub mod files;
mod policies;
mod policy_args;
mod prune;
mod recover;

pub use policy_args::{PointCommand, PointsCommand, PolicyCommand};
mod resources;
mod restores;
mod table;
mod verify;

use crate::config::{self, Overrides};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use sendense_shared::api::{
    BackupType, BootCheckSpec, RecoveryRequest, RestoreRequest, RestoreTarget, VerifyRequest,
};
use sendense_shared::cli::{DocsCommand, LogFormat};
use sendense_shared::client::{ClientError, HubClient};
use sendense_shared::errors::chain;
use sendense_shared::ids::{BackupId, DiskKey};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit statuses.
pub mod exit {
    /// Done; with `--wait`, the backup (or restore) completed.
    pub const OK: u8 = 0;
    /// The hub could not be asked or refused (unreachable, bad token, unknown VM, bad input:
    /// a 4xx, printed with the hub's detail, which names the field).
    pub const ERROR: u8 = 1;
    /// Bad usage: a flag or argument clap refuses, or a `--file` that is not a policy.
    pub const USAGE: u8 = 2;
    /// `--wait`: the backup (restore, verify, prune) failed.
    pub const FAILED: u8 = 3;
    /// `--wait`: the backup (restore, verify, prune) was cancelled.
    pub const CANCELLED: u8 = 4;
}

/// How often `--wait` asks the hub for the job.
const WAIT_POLL: Duration = Duration::from_secs(1);
/// How long `--wait` tolerates a hub that does not answer before giving up.
const WAIT_LOST_AFTER: u32 = 30;

/// Print `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// `--wait`: polls a job (`fetch`) until it is terminal, printing its progress line on stderr
/// when it changes and, with `--json`, the final job on stdout; rides out a hub that stops
/// answering for up to [`WAIT_LOST_AFTER`] polls. Answers `outcome` of the final job.
async fn follow<T, F, Fut>(
    what: &str,
    fetch: F,
    status: impl Fn(&T) -> sendense_shared::api::JobStatus,
    line: impl Fn(&T) -> String,
    outcome: impl Fn(&T) -> u8,
    json: bool,
) -> u8
where
    T: serde::Serialize,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last_line = String::new();
    let mut misses = 0;
    loop {
        let job = match fetch().await {
            Ok(j) => {
                misses = 0;
                j
            }
            Err(e) if e.is_unreachable() && misses < WAIT_LOST_AFTER => {
                misses += 1;
                tokio::time::sleep(WAIT_POLL).await;
                continue;
            }
            Err(e) => {
                eprintln!("error: lost track of {what}: {}", chain(&e));
                return exit::ERROR;
            }
        };
        let l = line(&job);
        if l != last_line {
            eprintln!("{l}");
            last_line = l;
        }
        if status(&job).is_terminal() {
            if json {
                print_json(&job);
            }
            return outcome(&job);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

const AFTER_HELP: &str = "\
Exit status: 0 done (with --wait: the backup, restore, recovery or prune completed), 1 error
talking to the hub or the hub refused the request (a 4xx such as 422 on a policy: the message
has the hub's detail, which names the field), 2 bad usage (a flag, or a --file that is not a
policy), 3 the job failed, 4 the job was cancelled.
The token is read from --token-file, SENDENSE_TOKEN_FILE, SENDENSE_TOKEN or the config file
(~/.config/sendense/console.toml: hub_url, token_file); never pass it on the command line.";

#[derive(Debug, Parser)]
#[command(name = "sendense-console", about = "Sendense operator console: live TUI, or one-shot commands", after_help = AFTER_HELP)]
pub struct Cli {
    /// Hub URL.
    #[arg(long, env = "SENDENSE_HUB_URL", global = true, value_name = "URL")]
    pub hub: Option<String>,
    /// File holding the hub's bearer token.
    #[arg(long, env = "SENDENSE_TOKEN_FILE", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Config file (default ~/.config/sendense/console.toml, if present).
    #[arg(
        long,
        env = "SENDENSE_CONSOLE_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Log file of the TUI (default ~/.local/state/sendense/console.log).
    #[arg(long, env = "SENDENSE_CONSOLE_LOG", global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Log lines (the TUI's file, `RUST_LOG` of one-shot commands on stderr) as `text` or
    /// `json` (one object a line: timestamp, level, target, message, fields).
    #[arg(
        long,
        env = "SENDENSE_CONSOLE_LOG_FORMAT",
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// All backups.
    Backups {
        #[command(subcommand)]
        command: BackupsCommand,
    },
    /// One backup: start or cancel.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// All restores.
    Restores {
        #[command(subcommand)]
        command: RestoresCommand,
    },
    /// One restore: start or cancel.
    Restore {
        #[command(subcommand)]
        command: RestoreCommand,
    },
    /// Instant recovery: boot a backup point as a new VM on a node at once while its disks
    /// stream home; `recover start|list|show|cancel`.
    Recover {
        #[command(subcommand)]
        command: RecoverCommand,
    },
    /// Re-read completed backup points against their stored checksums (a verify job); prints
    /// the job id. `verify list`, `verify cancel ID`.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Verify {
        #[command(subcommand)]
        command: Option<VerifyCommand>,
        #[command(flatten)]
        start: VerifyStart,
    },
    /// Backup policies: schedule, VMs, backup rule, retention, chain limit, priority.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// A VM's backup points with the retention rule that keeps each.
    Points {
        #[command(subcommand)]
        command: PointsCommand,
    },
    /// One backup point: protect it from pruning, or unprotect it.
    Point {
        #[command(subcommand)]
        command: PointCommand,
    },
    /// Prune a VM's points by the retention of the policy covering it; prints the prune job
    /// id. --dry-run: what it would keep by which rule and remove, with the bytes freed.
    Prune {
        /// Name of the VM.
        vm: String,
        /// Show the plan only; nothing is changed.
        #[arg(long)]
        dry_run: bool,
        /// Follow the prune job until it ends (progress on stderr); the exit status says how
        /// it ended.
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
        /// Print the plan (dry run) or the prune job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Browse a backup point's files without restoring it (the hub reads them in a
    /// libguestfs appliance): `files ls`, `files get ... > out.tar`.
    Files {
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// Registered VMs: node, disks, size, driver, last backup.
    Vms {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Nodes: version, tunnel, API address, last seen.
    Nodes {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The NBD port range: ports held by jobs and ports squatted by other processes.
    Ports {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The qemu-nbd processes the hub runs: PID, port, export, job.
    Processes {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Each node's SSH tunnel: state, restarts, last error.
    Tunnel {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Repositories with their free space.
    Repositories {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hub's health (version, commit, database); exit status 1 when it is not healthy.
    Health {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hub's event stream, one JSON object a line (`kind` says what it is): the next
    /// event only, or with --follow every event until interrupted.
    Events {
        /// Keep printing events as they happen.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Hidden: `man DIR`, `completions SHELL` (the Debian packages are built with them).
    #[command(flatten)]
    Docs(DocsCommand),
}

#[derive(Debug, clap::Args)]
#[group(skip)]
#[command(group(
    clap::ArgGroup::new("scope")
        .required(true)
        .multiple(false)
        .args(["backup", "vm", "repository"])
))]
pub struct VerifyStart {
    /// One backup point: its id, or the first 8 or more characters of it.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Every completed point of a VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Every completed point in a repository.
    #[arg(long, value_name = "ID")]
    repository: Option<String>,
    /// Also boot each point that reads back clean as a throwaway VM on the hub (overlays; the
    /// point is not written) and record boot_ok / boot_failed with its last console lines.
    #[arg(long)]
    boot: bool,
    /// Boot check: guest memory in MiB (default 512).
    #[arg(long, value_name = "MIB", requires = "boot")]
    boot_memory: Option<u32>,
    /// Boot check: direct kernel boot with this kernel on the hub.
    #[arg(long, value_name = "PATH", requires = "boot")]
    boot_kernel: Option<String>,
    /// Boot check: initrd on the hub for --boot-kernel.
    #[arg(long, value_name = "PATH", requires = "boot_kernel")]
    boot_initrd: Option<String>,
    /// Boot check: kernel command line for --boot-kernel.
    #[arg(long, value_name = "ARGS", requires = "boot_kernel")]
    boot_append: Option<String>,
    /// Boot check: the guest is up when a console line contains this (its guest agent
    /// answering guest-ping always counts).
    #[arg(long, value_name = "TEXT", requires = "boot")]
    boot_ready_line: Option<String>,
    /// Boot check: seconds the guest has to come up (default 120).
    #[arg(long, value_name = "SECS", requires = "boot")]
    boot_timeout: Option<u64>,
    /// Follow the job until it ends (progress on stderr); the exit status says how it ended
    /// (3 when it found corrupt points or, with --boot, a point that did not boot).
    #[arg(long)]
    wait: bool,
    /// Print the verify job as JSON instead of its id.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VerifyCommand {
    /// List verify jobs, newest first.
    List {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the hub to cancel a verify job.
    Cancel {
        /// Verify job id, or its first 8 or more characters.
        id: String,
        /// Print the verify job as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Without PATH: the disk's partitions, LVM volumes and filesystems; with PATH: that
    /// directory's entries (type, mode, owner, size, mtime, link target).
    Ls {
        /// The backup (point): its id, or the first 8 or more characters of it.
        backup_id: String,
        /// Absolute path inside the filesystem.
        path: Option<std::ffi::OsString>,
        /// Disk key (may be left out when the backup has one disk).
        #[arg(long, value_name = "KEY")]
        disk: Option<i64>,
        /// Filesystem device (`/dev/sda1`; may be left out when the disk has one).
        #[arg(long, value_name = "DEV")]
        fs: Option<String>,
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// A file or directory of the point as a tar archive on stdout (never to a terminal):
    /// `files get ID /etc > etc.tar`. A symlink comes as a link.
    Get {
        /// The backup (point): its id, or the first 8 or more characters of it.
        backup_id: String,
        /// Absolute path inside the filesystem.
        path: std::ffi::OsString,
        /// Disk key (may be left out when the backup has one disk).
        #[arg(long, value_name = "KEY")]
        disk: Option<i64>,
        /// Filesystem device (may be left out when the disk has one).
        #[arg(long, value_name = "DEV")]
        fs: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupsCommand {
    /// List backups, newest first.
    List {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TypeArg {
    Full,
    Incremental,
}

impl From<TypeArg> for BackupType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::Full => BackupType::Full,
            TypeArg::Incremental => BackupType::Incremental,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Start a backup of all disks of VM; prints the backup id.
    Start {
        /// Name of the VM.
        vm: String,
        #[arg(long = "type", value_enum)]
        backup_type: TypeArg,
        /// Repository id (may be left out when the hub has exactly one).
        #[arg(long, value_name = "ID")]
        repository: Option<String>,
        /// Fail rather than keep a crash-consistent point when the guest's file systems cannot
        /// be frozen (no guest agent, a timeout, a refusal).
        #[arg(long)]
        require_application_consistency: bool,
        /// Follow the job until it ends (progress on stderr); the exit status says how it ended.
        #[arg(long)]
        wait: bool,
        /// Print the backup as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// Ask the hub to cancel a backup.
    Cancel {
        /// Backup id, or its first 8 or more characters.
        id: String,
        /// Print the backup as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RestoresCommand {
    /// List restores, newest first.
    List {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RestoreCommand {
    /// Restore one disk of a completed backup into a new QCOW2 image on a node, or with --vm
    /// into a powered-off VM's own disk; prints the restore id.
    Start {
        /// The backup (point) to restore: its id, or the first 8 or more characters of it.
        backup_id: String,
        /// Name of the registered node that writes the image.
        #[arg(long)]
        node: String,
        /// Absolute path of the new image on the node (must not exist yet); with --vm the
        /// VM's disk image to replace (default: the disk's image as the point recorded it).
        #[arg(long, required_unless_present = "vm")]
        path: Option<String>,
        /// Into this powered-off VM's own disk (refused while it runs): the node writes beside
        /// the disk and renames over it once the copy read back equal.
        #[arg(long)]
        vm: Option<String>,
        /// Disk key (may be left out when the backup has one disk).
        #[arg(long, value_name = "KEY")]
        disk: Option<i64>,
        /// Follow the restore until it ends (progress on stderr); the exit status says how it
        /// ended.
        #[arg(long)]
        wait: bool,
        /// Print the restore as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// Ask the hub to cancel a restore.
    Cancel {
        /// Restore id, or its first 8 or more characters.
        id: String,
        /// Print the restore as JSON.
        #[arg(long)]
        json: bool,
    },
}

// Parsed once per run: the size of `Start` beside the others costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RecoverCommand {
    /// Boot a completed backup point as a new VM on a node at once (its disks served by the
    /// hub, pulled home while the guest runs); prints the recovery id.
    Start {
        /// The backup (point) to boot: its id, or the first 8 or more characters of it.
        backup_id: String,
        /// Name of the registered node that runs the VM.
        #[arg(long)]
        node: String,
        /// Name of the new VM on the node (must not be running there yet).
        #[arg(long = "name", value_name = "VM")]
        vm_name: String,
        /// Disk keys, in the order the guest sees them (vda, vdb, ...); default every disk.
        #[arg(long, value_name = "KEYS", value_delimiter = ',')]
        disks: Option<Vec<i64>>,
        /// Guest memory in MiB (default: the point's recorded hardware, else 512).
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// vCPUs (default: the point's recorded hardware, else 1).
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Direct kernel boot: a kernel on the node (default: the point's recorded one).
        #[arg(long, value_name = "PATH")]
        kernel: Option<String>,
        /// Initrd on the node for --kernel.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        initrd: Option<String>,
        /// Kernel command line for --kernel.
        #[arg(long, value_name = "ARGS", requires = "kernel")]
        append: Option<String>,
        /// Upper bound of each disk's stream home, bytes per second: 50M = 50 MiB/s, 800K
        /// (default: no limit).
        #[arg(long, value_name = "RATE", value_parser = recover::parse_speed)]
        speed: Option<u64>,
        /// Absolute directory on the node for the overlays, the recovered disks (default: the
        /// node's recovery directory).
        #[arg(long, value_name = "DIR", value_parser = recover::parse_overlay_dir)]
        overlay_dir: Option<String>,
        /// Follow it until every disk is home (each disk's bytes, rate and ETA on stderr, at
        /// most once a second); the exit status says how it ended.
        #[arg(long)]
        wait: bool,
        /// Print the recovery as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// List instant recoveries, newest first.
    List {
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// One recovery in full: VM, QEMU, each disk's export, qemu-nbd PID, overlay and stream.
    Show {
        /// Recovery id, or its first 8 or more characters.
        id: String,
        /// Print the hub's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the bound of a running recovery's streams (e.g. lift it once the guest is up).
    Speed {
        /// Recovery id, or its first 8 or more characters.
        id: String,
        /// Per disk: 50M, 1G (binary units, per second), or 0 for no bound.
        #[arg(value_parser = recover::parse_speed_or_zero)]
        rate: u64,
        /// Print the recovery as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a recovery: the VM is stopped and its overlays removed (what the guest wrote is
    /// lost). A completed recovery's VM is not touched: it runs on its own.
    Cancel {
        /// Recovery id, or its first 8 or more characters.
        id: String,
        /// Print the recovery as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let version: &'static str =
        Box::leak(sendense_shared::identity::long_version("sendense-console").into_boxed_str());
    let matches = Cli::command()
        .version(sendense_shared::identity::VERSION)
        .long_version(version)
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(Command::Docs(docs)) = &cli.command {
        // Build time of the packages: no hub, no token.
        return match sendense_shared::cli::run_docs(Cli::command(), docs) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(exit::ERROR)
            }
        };
    }
    let settings = match config::resolve(
        &Overrides {
            hub_url: cli.hub.clone(),
            token_file: cli.token_file.clone(),
            config: cli.config.clone(),
        },
        std::env::var(config::TOKEN_ENV).ok(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            return ExitCode::from(exit::ERROR);
        }
    };
    // The hub proves it holds the admin token before the console sends it (a process that
    // bound the hub's address while the hub is down gets nothing).
    let client = HubClient::proven_admin(
        &settings.hub_url,
        settings.token,
        concat!("sendense-console/", env!("CARGO_PKG_VERSION")),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match cli.command {
        None => {
            let _guard = init_file_logging(cli.log_file, cli.log_format);
            match runtime.block_on(crate::tui::run(client)) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("error: {}", chain(&e));
                    ExitCode::from(exit::ERROR)
                }
            }
        }
        Some(command) => {
            init_stderr_logging(cli.log_format);
            ExitCode::from(runtime.block_on(run_command(&client, command)))
        }
    }
}

fn default_log_path() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("sendense").join("console.log")
}

/// Logs of the TUI go to a file: the screen belongs to the UI.
fn init_file_logging(
    path: Option<PathBuf>,
    format: LogFormat,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let path = path.unwrap_or_else(default_log_path);
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name()?.to_owned();
    std::fs::create_dir_all(&dir).ok()?;
    let appender = tracing_appender::rolling::never(dir, name);
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .ok()?;
    Some(guard)
}

/// One-shot commands log warnings (or `RUST_LOG`) to stderr.
fn init_stderr_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Print why the hub could not be asked; the exit status of that.
fn fail(e: &ClientError) -> u8 {
    eprintln!("error: {}", chain(e));
    exit::ERROR
}

/// Every id argument of `command` that names a backup, restore, recovery or verify job, in place: a
/// short id (a prefix, as the tables show) becomes the whole id ([`table::resolve`]).
async fn resolve_ids(client: &HubClient, command: &mut Command) -> Result<(), u8> {
    use table::Kind::{Backup, Recovery, Restore, Verify};
    let (kind, id) = match command {
        Command::Files {
            command: FilesCommand::Ls { backup_id, .. } | FilesCommand::Get { backup_id, .. },
        }
        | Command::Restore {
            command: RestoreCommand::Start { backup_id, .. },
        }
        | Command::Recover {
            command: RecoverCommand::Start { backup_id, .. },
        } => (Backup, backup_id),
        Command::Backup {
            command: BackupCommand::Cancel { id, .. },
        }
        | Command::Point {
            command: PointCommand::Protect { id, .. } | PointCommand::Unprotect { id, .. },
        } => (Backup, id),
        Command::Verify {
            command: None,
            start: VerifyStart {
                backup: Some(id), ..
            },
        } => (Backup, id),
        Command::Restore {
            command: RestoreCommand::Cancel { id, .. },
        } => (Restore, id),
        Command::Verify {
            command: Some(VerifyCommand::Cancel { id, .. }),
            ..
        } => (Verify, id),
        Command::Recover {
            command:
                RecoverCommand::Show { id, .. }
                | RecoverCommand::Cancel { id, .. }
                | RecoverCommand::Speed { id, .. },
        } => (Recovery, id),
        _ => return Ok(()),
    };
    *id = table::resolve(client, kind, id).await?;
    Ok(())
}

/// Run one subcommand; returns the exit status.
pub async fn run_command(client: &HubClient, mut command: Command) -> u8 {
    if let Err(code) = resolve_ids(client, &mut command).await {
        return code;
    }
    match command {
        Command::Backups {
            command: BackupsCommand::List { json },
        } => backups::list(client, json).await,
        Command::Files { command } => match command {
            FilesCommand::Ls {
                backup_id,
                path,
                disk,
                fs,
                json,
            } => {
                let q = sendense_shared::client::FileQuery {
                    disk,
                    fs,
                    path: path.map(std::os::unix::ffi::OsStringExt::into_vec),
                };
                files::ls(client, &backup_id, q, json).await
            }
            FilesCommand::Get {
                backup_id,
                path,
                disk,
                fs,
            } => {
                let q = sendense_shared::client::FileQuery {
                    disk,
                    fs,
                    path: Some(std::os::unix::ffi::OsStringExt::into_vec(path)),
                };
                files::get(client, &backup_id, q).await
            }
        },
        Command::Vms { json } => resources::vms(client, json).await,
        Command::Nodes { json } => resources::nodes(client, json).await,
        Command::Ports { json } => resources::ports(client, json).await,
        Command::Processes { json } => resources::processes(client, json).await,
        Command::Tunnel { json } => resources::tunnel(client, json).await,
        Command::Repositories { json } => resources::repositories(client, json).await,
        Command::Health { json } => resources::health(client, json).await,
        Command::Events { follow } => resources::events(client, follow).await,
        Command::Backup {
            command:
                BackupCommand::Start {
                    vm,
                    backup_type,
                    repository,
                    require_application_consistency,
                    wait,
                    json,
                },
        } => {
            let req = backups::Start {
                vm,
                backup_type: backup_type.into(),
                repository,
                require_application_consistency,
            };
            backups::start(client, req, wait, json).await
        }
        Command::Backup {
            command: BackupCommand::Cancel { id, json },
        } => backups::cancel(client, &BackupId(id), json).await,
        Command::Restores {
            command: RestoresCommand::List { json },
        } => restores::list(client, json).await,
        Command::Restore {
            command:
                RestoreCommand::Start {
                    backup_id,
                    node,
                    path,
                    vm,
                    disk,
                    wait,
                    json,
                },
        } => {
            let req = RestoreRequest {
                backup_id: BackupId(backup_id),
                disk_key: disk.map(DiskKey),
                target: RestoreTarget {
                    node,
                    path: path.unwrap_or_default(),
                    vm,
                },
            };
            restores::start(client, &req, wait, json).await
        }
        Command::Restore {
            command: RestoreCommand::Cancel { id, json },
        } => restores::cancel(client, &id, json).await,
        Command::Recover { command } => match command {
            RecoverCommand::Start {
                backup_id,
                node,
                vm_name,
                disks,
                memory,
                cpus,
                kernel,
                initrd,
                append,
                speed,
                overlay_dir,
                wait,
                json,
            } => {
                let req = RecoveryRequest {
                    backup_id: BackupId(backup_id),
                    node,
                    vm_name,
                    disks: disks.map(|d| d.into_iter().map(DiskKey).collect()),
                    memory_mib: memory,
                    cpus,
                    kernel,
                    initrd,
                    append,
                    speed_bps: speed,
                    overlay_dir,
                };
                recover::start(client, &req, wait, json).await
            }
            RecoverCommand::List { json } => recover::list(client, json).await,
            RecoverCommand::Show { id, json } => recover::show(client, &id, json).await,
            RecoverCommand::Cancel { id, json } => recover::cancel(client, &id, json).await,
            RecoverCommand::Speed { id, rate, json } => {
                recover::speed(client, &id, rate, json).await
            }
        },
        Command::Verify {
            command: Some(VerifyCommand::List { json }),
            ..
        } => verify::list(client, json).await,
        Command::Verify {
            command: Some(VerifyCommand::Cancel { id, json }),
            ..
        } => verify::cancel(client, &id, json).await,
        Command::Verify {
            command: None,
            start,
        } => {
            let req = VerifyRequest {
                backup_id: start.backup.map(BackupId),
                vm_name: start.vm,
                repository_id: start.repository,
                boot: start.boot.then_some(BootCheckSpec {
                    memory_mib: start.boot_memory,
                    cpus: None,
                    kernel: start.boot_kernel,
                    initrd: start.boot_initrd,
                    append: start.boot_append,
                    ready_line: start.boot_ready_line,
                    timeout_secs: start.boot_timeout,
                }),
            };
            verify::start(client, &req, start.wait, start.json).await
        }
        Command::Policy { command } => match command {
            PolicyCommand::Create {
                name,
                file,
                fields,
                json,
            } => policies::create(client, name, &fields, file, json).await,
            PolicyCommand::List { json } => policies::list(client, json).await,
            PolicyCommand::Show { policy, json } => policies::show(client, &policy, json).await,
            PolicyCommand::Update {
                policy,
                name,
                file,
                fields,
                json,
            } => policies::update(client, &policy, name, &fields, file, json).await,
            PolicyCommand::Delete { policy, json } => policies::delete(client, &policy, json).await,
            PolicyCommand::RunNow { policy, json } => {
                policies::run_now(client, &policy, json).await
            }
        },
        Command::Points {
            command: PointsCommand::List { vm, json },
        } => prune::list(client, &vm, json).await,
        Command::Point { command } => {
            let (id, on, json) = match command {
                PointCommand::Protect { id, json } => (id, true, json),
                PointCommand::Unprotect { id, json } => (id, false, json),
            };
            prune::protect(client, &BackupId(id), on, json).await
        }
        Command::Prune {
            vm,
            dry_run,
            wait,
            json,
        } => prune::prune(client, &vm, dry_run, wait, json).await,
        // Handled in `main` before any hub is asked.
        Command::Docs(_) => exit::USAGE,
    }
}
