//! The command line. Without a subcommand it opens the TUI; with one it runs once, prints to
//! stdout what a script reads (ids, JSON), progress and errors to stderr, and exits with a
//! status that says the outcome (see [`exit`]).

use crate::config::{self, Overrides};
use crate::format;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use sendense_shared::api::{Backup, BackupRequest, BackupType, JobStatus};
use sendense_shared::client::{ClientError, HubClient};
use sendense_shared::errors::chain;
use sendense_shared::ids::BackupId;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit statuses.
pub mod exit {
    /// Done; with `--wait`, the backup completed.
    pub const OK: u8 = 0;
    /// The hub could not be asked or refused (unreachable, bad token, unknown VM, bad input).
    pub const ERROR: u8 = 1;
    /// `--wait`: the backup failed.
    pub const FAILED: u8 = 3;
    /// `--wait`: the backup was cancelled.
    pub const CANCELLED: u8 = 4;
}

/// How often `--wait` asks the hub for the job.
const WAIT_POLL: Duration = Duration::from_secs(1);
/// How long `--wait` tolerates a hub that does not answer before giving up.
const WAIT_LOST_AFTER: u32 = 30;

const AFTER_HELP: &str = "\
Exit status: 0 done (with --wait: the backup completed), 1 error talking to the hub,
2 bad usage, 3 the backup failed, 4 the backup was cancelled.
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
        /// Follow the job until it ends (progress on stderr); the exit status says how it ended.
        #[arg(long)]
        wait: bool,
        /// Print the backup as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// Ask the hub to cancel a backup.
    Cancel {
        id: String,
        /// Print the backup as JSON.
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
    let client = HubClient::with_agent(
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
            let _guard = init_file_logging(cli.log_file);
            match runtime.block_on(crate::tui::run(client)) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("error: {}", chain(&e));
                    ExitCode::from(exit::ERROR)
                }
            }
        }
        Some(command) => {
            init_stderr_logging();
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
fn init_file_logging(path: Option<PathBuf>) -> Option<tracing_appender::non_blocking::WorkerGuard> {
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
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .ok()?;
    Some(guard)
}

/// One-shot commands log warnings (or `RUST_LOG`) to stderr.
fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

fn fail(e: &ClientError) -> u8 {
    eprintln!("error: {}", chain(e));
    exit::ERROR
}

/// Run one subcommand; returns the exit status.
pub async fn run_command(client: &HubClient, command: Command) -> u8 {
    match command {
        Command::Backups {
            command: BackupsCommand::List { json },
        } => match client.backups().await {
            Ok(mut list) => {
                list.sort_by_key(|b| std::cmp::Reverse(b.created_at));
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                } else {
                    print!("{}", backups_table(&list));
                }
                exit::OK
            }
            Err(e) => fail(&e),
        },
        Command::Backup {
            command:
                BackupCommand::Start {
                    vm,
                    backup_type,
                    repository,
                    wait,
                    json,
                },
        } => {
            let repository_id = match repository {
                Some(r) => r,
                None => match pick_repository(client).await {
                    Ok(r) => r,
                    Err(code) => return code,
                },
            };
            let req = BackupRequest {
                vm_name: vm,
                repository_id,
                backup_type: backup_type.into(),
            };
            let backup = match client.start_backup(&req).await {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            eprintln!(
                "started {} backup {} of {} into {}",
                backup.backup_type.as_str(),
                backup.backup_id,
                backup.vm_name,
                backup.repository_id
            );
            if !wait {
                print_backup(&backup, json);
                return exit::OK;
            }
            if !json {
                println!("{}", backup.backup_id);
            }
            wait_for(client, &backup.backup_id, json).await
        }
        Command::Backup {
            command: BackupCommand::Cancel { id, json },
        } => match client.cancel_backup(&BackupId(id)).await {
            Ok(b) => {
                eprintln!(
                    "backup {} of {} is {}",
                    b.backup_id,
                    b.vm_name,
                    b.status.as_str()
                );
                print_backup(&b, json);
                exit::OK
            }
            Err(e) => fail(&e),
        },
    }
}

fn print_backup(b: &Backup, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(b).unwrap_or_default());
    } else {
        println!("{}", b.backup_id);
    }
}

async fn pick_repository(client: &HubClient) -> Result<String, u8> {
    let repos = client.repositories().await.map_err(|e| fail(&e))?;
    match repos.as_slice() {
        [only] => Ok(only.id.clone()),
        [] => {
            eprintln!(
                "error: the hub has no repository; add one first (POST /api/v1/repositories)"
            );
            Err(exit::ERROR)
        }
        many => {
            let ids: Vec<&str> = many.iter().map(|r| r.id.as_str()).collect();
            eprintln!(
                "error: the hub has several repositories ({}): pick one with --repository ID",
                ids.join(", ")
            );
            Err(exit::ERROR)
        }
    }
}

/// One progress line: `b-1 running 37% 7.4 GiB/20.0 GiB · 2000 running 39% · 2001 running 27%`.
pub fn progress_line(b: &Backup) -> String {
    let mut line = format!(
        "{} {} {}% {}/{}",
        b.backup_id,
        b.status.as_str(),
        format::percent(format::done_bytes(b), b.total_bytes),
        format::bytes(b.bytes_transferred),
        format::bytes(b.total_bytes)
    );
    for d in &b.disk_results {
        line.push_str(&format!(
            " · {} {} {}%",
            d.disk_key,
            d.status.as_str(),
            format::percent(d.bytes_done, d.bytes_total)
        ));
    }
    line
}

async fn wait_for(client: &HubClient, id: &BackupId, json: bool) -> u8 {
    let mut last_line = String::new();
    let mut misses = 0;
    loop {
        let backup = match client.backup(id).await {
            Ok(b) => {
                misses = 0;
                b
            }
            Err(e) if e.is_unreachable() && misses < WAIT_LOST_AFTER => {
                misses += 1;
                tokio::time::sleep(WAIT_POLL).await;
                continue;
            }
            Err(e) => {
                eprintln!("error: lost track of backup {id}: {}", chain(&e));
                return exit::ERROR;
            }
        };
        let line = progress_line(&backup);
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if backup.status.is_terminal() {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&backup).unwrap_or_default()
                );
            }
            return outcome(&backup);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Say how a finished job ended and pick the exit status.
fn outcome(b: &Backup) -> u8 {
    match b.status {
        JobStatus::Completed => {
            let took = match (b.started_at, b.completed_at) {
                (Some(s), Some(c)) => {
                    format!(" in {}", format::duration_secs((c - s).num_seconds()))
                }
                _ => String::new(),
            };
            eprintln!(
                "backup {} completed: {} written{took}",
                b.backup_id,
                format::bytes(b.bytes_transferred)
            );
            exit::OK
        }
        JobStatus::Cancelled => {
            eprintln!("backup {} was cancelled", b.backup_id);
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "backup {} failed: {}",
                b.backup_id,
                b.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            for d in &b.disk_results {
                if let Some(e) = &d.error_message {
                    eprintln!("  disk {}: {e}", d.disk_key);
                }
            }
            exit::FAILED
        }
    }
}

/// The human table of `backups list`: columns as wide as their longest value (the hub's ids
/// are UUIDs; scripts that need fields use `--json`).
pub fn backups_table(list: &[Backup]) -> String {
    let bytes = |b: &Backup| {
        format!(
            "{}/{}",
            format::bytes(b.bytes_transferred),
            format::bytes(b.total_bytes)
        )
    };
    let width = |head: &str, f: &dyn Fn(&Backup) -> usize| {
        list.iter().map(f).max().unwrap_or(0).max(head.len())
    };
    let wid = width("ID", &|b| b.backup_id.0.chars().count());
    let wvm = width("VM", &|b| b.vm_name.chars().count());
    let wby = width("BYTES", &|b| bytes(b).chars().count());
    let mut out = format!(
        "{:<wid$}  {:<wvm$}  {:<11}  {:<10}  {:>4}  {:>wby$}  {}\n",
        "ID", "VM", "TYPE", "STATUS", "DONE", "BYTES", "CREATED"
    );
    for b in list {
        out.push_str(&format!(
            "{:<wid$}  {:<wvm$}  {:<11}  {:<10}  {:>3}%  {:>wby$}  {}\n",
            b.backup_id.0,
            b.vm_name,
            b.backup_type.as_str(),
            b.status.as_str(),
            format::percent(format::done_bytes(b), b.total_bytes),
            bytes(b),
            b.created_at.format("%Y-%m-%d %H:%M:%S")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    /// A CBT incremental that wrote 212 MiB of a 40 GiB disk is done, not 0 % done.
    #[test]
    fn progress_counts_disks_done_and_bytes_written() {
        let b = fixtures::vsphere_job();
        assert_eq!(
            progress_line(&b),
            "b-4e11c0a7 completed 100% 212.0 MiB/40.0 GiB · 2000 completed 100%"
        );
        let table = backups_table(&[b]);
        let row = table.lines().nth(1).unwrap();
        assert!(row.contains(" 100%  212.0 MiB/40.0 GiB "), "{table}");
        let running = fixtures::running_job([8 * fixtures::GIB, 2 * fixtures::GIB]);
        assert!(progress_line(&running).contains(" running 50% 10.0 GiB/20.0 GiB"));
    }
}
