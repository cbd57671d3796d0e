//! Logging: one subscriber on stderr (the journal under systemd), filtered by `RUST_LOG`
//! (default `info`). `--log-format json` (`SENDENSE_NODE_LOG_FORMAT=json`) writes one JSON
//! object a line (`timestamp`, `level`, `target`, `message`, the event's fields, `span`) for
//! journald and log shippers.

use sendense_shared::cli::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call (tests) leaves the first in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
