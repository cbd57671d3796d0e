//! `sendense-node`: the agent next to the hypervisor.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sendense-node")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Copy one NBD export to another with the copy engine.
    Copy(agent_node::copy::cli::CopyArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Some(Command::Copy(args)) => agent_node::copy::cli::run_cli(args).await,
        None => {
            println!(
                "{}",
                sendense_shared::identity::long_version("sendense-node")
            );
            Ok(())
        }
    }
}
