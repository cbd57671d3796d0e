//! Who is answering: version, git commit, build time, executable path, PID. Printed by
//! `--version` and served by `/health`, so an operator can tell which binary holds a port.

use chrono::{DateTime, Utc};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("SENDENSE_GIT_COMMIT");
const BUILD_EPOCH: &str = env!("SENDENSE_BUILD_EPOCH");

/// RFC 3339 time of the build.
pub fn build_time() -> String {
    BUILD_EPOCH
        .parse::<i64>()
        .ok()
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Absolute path of the running executable.
pub fn executable() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The long `--version` text of a binary named `name`.
pub fn long_version(name: &str) -> String {
    format!(
        "{name} {VERSION}\ncommit: {GIT_COMMIT}\nbuilt: {}\nexecutable: {}",
        build_time(),
        executable()
    )
}

/// Identity fields as a [`crate::api::Health`] with the given status.
pub fn health(
    status: &str,
    started_at: DateTime<Utc>,
    database: Option<crate::api::DatabaseHealth>,
) -> crate::api::Health {
    crate::api::Health {
        status: status.to_string(),
        version: VERSION.to_string(),
        git_commit: GIT_COMMIT.to_string(),
        build_time: build_time(),
        executable: executable(),
        pid: std::process::id(),
        started_at,
        database,
    }
}
