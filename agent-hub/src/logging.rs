//! Logging: human lines on stderr and the same lines in daily files
//! (`<log_dir>/sendense-hub.log.YYYY-MM-DD`, tracing-appender), so an operator who was not
//! watching the terminal can still read what happened.

use std::io::IsTerminal;
use std::path::Path;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot create log directory {path}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open daily log file in {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: tracing_appender::rolling::InitError,
    },
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Installs the global subscriber. `filter` is a `tracing` directive string; `SENDENSE_HUB_LOG`
/// (same syntax) overrides it. Keep the guard alive for the life of the process: dropping it
/// flushes the file writer.
pub fn init(log_dir: &Path, filter: &str) -> Result<WorkerGuard, LoggingError> {
    std::fs::create_dir_all(log_dir).map_err(|source| LoggingError::Dir {
        path: log_dir.to_path_buf(),
        source,
    })?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("sendense-hub.log")
        .build(log_dir)
        .map_err(|source| LoggingError::File {
            path: log_dir.to_path_buf(),
            source,
        })?;
    let (file_writer, guard) = tracing_appender::non_blocking(appender);
    let filter = std::env::var("SENDENSE_HUB_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(file_writer)
                .with_ansi(false),
        )
        .try_init()
        .map_err(|_| LoggingError::AlreadySet)?;
    Ok(guard)
}
