//! Logging: human lines on stderr and the same lines in daily files
//! (`<log_dir>/sendense-hub.log.YYYY-MM-DD`, tracing-appender), so an operator who was not
//! watching the terminal can still read what happened. `--log-format json` (`log_format`,
//! `SENDENSE_HUB_LOG_FORMAT`) writes both as one JSON object a line instead, for journald and
//! log shippers.

use sendense_shared::cli::LogFormat;
use std::io::IsTerminal;
use std::path::Path;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
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
/// (same syntax) overrides it. `format` applies to stderr and the files alike. Keep the guard
/// alive for the life of the process: dropping it flushes the file writer.
pub fn init(log_dir: &Path, filter: &str, format: LogFormat) -> Result<WorkerGuard, LoggingError> {
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
    let (stderr, file) = match format {
        LogFormat::Text => (
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .boxed(),
            tracing_subscriber::fmt::layer()
                .with_writer(file_writer)
                .with_ansi(false)
                .boxed(),
        ),
        LogFormat::Json => (
            json_layer(std::io::stderr).boxed(),
            json_layer(file_writer).boxed(),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init()
        .map_err(|_| LoggingError::AlreadySet)?;
    Ok(guard)
}

/// One JSON object a line with `timestamp`, `level`, `target`, `message` and the event's fields
/// at the top level (what journald's and log shippers' JSON parsers pick up without a mapping),
/// plus `span` (the innermost span and its fields) when there is one.
pub fn json_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
}
