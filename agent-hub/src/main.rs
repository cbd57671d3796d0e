//! `sendense-hub`: parse flags, load the configuration, start logging, open the hub, serve until
//! SIGTERM or SIGINT; or run one `node enroll|rotate|revoke` or `check-image` command
//! ([`agent_hub::cli`]), or write its man pages or a completion script (hidden `man DIR`,
//! `completions SHELL`).

use agent_hub::config::{Cli, Command, HubConfig};
use agent_hub::hub::Hub;
use agent_hub::server::serve;
use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Docs(docs)) = &cli.command {
        // Build time of the packages: no configuration, no logging.
        use clap::CommandFactory;
        return match sendense_shared::cli::run_docs(Cli::command(), docs) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sendense-hub: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if cli.version {
        println!(
            "{}",
            sendense_shared::identity::long_version("sendense-hub")
        );
        return std::process::ExitCode::SUCCESS;
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sendense-hub: {e:#}");
            tracing::error!("exiting: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = HubConfig::load(&cli).context("configuration")?;
    if let Some(Command::Node(cmd)) = &cli.command {
        // A one-shot command: no log files, no API.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        return rt.block_on(agent_hub::cli::node_command(&config, cmd));
    }
    if let Some(Command::CheckImage(args)) = &cli.command {
        // Cells are hashed on the runtime's workers: both cores.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let code = rt.block_on(agent_hub::cli::check_image(&config, args))?;
        std::process::exit(code);
    }
    // Before the logs go there: the database, the token and the logs are the hub's alone.
    sendense_shared::fsmode::private_dir(&config.data_dir)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    let _guard = agent_hub::logging::init(&config.log_dir, &config.log_level, config.log_format)
        .context("starting logging")?;
    tracing::info!(
        version = sendense_shared::identity::VERSION,
        commit = sendense_shared::identity::GIT_COMMIT,
        executable = %sendense_shared::identity::executable(),
        pid = std::process::id(),
        data_dir = %config.data_dir.display(),
        "sendense-hub starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listen = config.listen;
        let state = Hub::open(config).await.context("opening the hub")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the API to {listen}"))?;
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        // Installed before the API says it listens: a SIGTERM from then on drains, never the
        // default action (a test that stopped the hub right after "listening" saw it killed).
        let stop = stop_signals();
        tokio::spawn(async move {
            wait_for_signal(stop).await;
            tracing::info!("stop signal received: draining");
            signals.cancel();
        });
        serve(listener, state, shutdown).await.context("serving")
    })
}

type StopSignals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn stop_signals() -> StopSignals {
    use tokio::signal::unix::{SignalKind, signal};
    (
        signal(SignalKind::terminate()).expect("SIGTERM handler"),
        signal(SignalKind::interrupt()).expect("SIGINT handler"),
    )
}

async fn wait_for_signal((mut term, mut int): StopSignals) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
