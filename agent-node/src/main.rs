//! `sendense-node`: the agent next to the hypervisor. `serve` (the default) runs the daemon,
//! `copy` runs the copy engine alone, `tunnel authorized-key` prints the hub's key line; the
//! hidden `man DIR` / `completions SHELL` write its man pages and completion scripts.
use agent_node::config::{NodeConfig, ServeArgs};
use clap::{CommandFactory, Parser, Subcommand};
use sendense_shared::cli::{DocsCommand, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "sendense-node",
    version = sendense_shared::identity::VERSION,
    long_version = long_version(),
    about = "Sendense node: snapshots VMs and copies their disks over NBD to the hub",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Log lines on stderr as `text` or `json` (one object a line: timestamp, level, target,
    /// message, fields) [default: text].
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "SENDENSE_NODE_LOG_FORMAT",
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Copy one NBD export to another with the copy engine.
    Copy(agent_node::copy::cli::CopyArgs),
    /// The SSH tunnel to the hub (deployment helpers).
    #[command(subcommand)]
    Tunnel(agent_node::tunnel::authorized_key::TunnelCommand),
    /// A delaying TCP relay (benchmarks: a simulated WAN on loopback).
    #[command(hide = true)]
    Relay(agent_node::copy::relay::RelayArgs),
    /// Hidden: `man DIR`, `completions SHELL` (the Debian packages are built with them).
    #[command(flatten)]
    Docs(DocsCommand),
}

/// clap prints the command name itself before this text.
fn long_version() -> &'static str {
    let text = sendense_shared::identity::long_version("sendense-node");
    let text = text
        .strip_prefix("sendense-node ")
        .map(str::to_string)
        .unwrap_or(text);
    Box::leak(text.into_boxed_str())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Docs(docs)) = &cli.command {
        return Ok(sendense_shared::cli::run_docs(Cli::command(), docs)?);
    }
    agent_node::logging::init(cli.log_format);
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Copy(args)) => agent_node::copy::cli::run_cli(args).await,
        Some(Command::Tunnel(cmd)) => agent_node::tunnel::authorized_key::run_cli(cmd),
        Some(Command::Relay(args)) => agent_node::copy::relay::run_cli(args).await,
        Some(Command::Docs(_)) => Ok(()),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = NodeConfig::load(&args)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding --listen {}: {e}", config.listen))?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    // Installed before the daemon announces itself, so an early SIGTERM drains too.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down: cancelling jobs, releasing snapshots");
        s.cancel();
    });
    agent_node::daemon::run(config, listener, shutdown).await
}
