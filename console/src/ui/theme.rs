//! Colours and status symbols. A colour is never the only carrier of meaning: every styled
//! status also has a symbol and a word.

use crate::strings;
use ratatui::style::{Color, Modifier, Style};
use sendense_shared::api::{
    ConsistencyLevel, DiskStatus, Integrity, JobStatus, RunStatus, TunnelState, TunnelStateKind,
};

pub fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}
pub fn border() -> Style {
    Style::default().fg(Color::Gray)
}
pub fn key() -> Style {
    Style::default().fg(Color::Cyan)
}
pub fn info() -> Style {
    Style::default().fg(Color::Cyan)
}
pub fn good() -> Style {
    Style::default().fg(Color::Green)
}
pub fn warn() -> Style {
    Style::default().fg(Color::Yellow)
}
pub fn bad() -> Style {
    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
}
pub fn busy() -> Style {
    Style::default().fg(Color::Cyan)
}
pub fn selected() -> Style {
    Style::default().add_modifier(Modifier::REVERSED)
}
/// The open view's tab: explicit colours, because reversing the other tabs' dark grey gives
/// black on dark grey, which many terminals make unreadable.
pub fn tab_selected() -> Style {
    Style::default()
        .fg(Color::Black)
        .bg(Color::Gray)
        .add_modifier(Modifier::BOLD)
}
pub fn header() -> Style {
    Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
}

/// Symbol and style of a job status.
pub fn job(status: JobStatus) -> (&'static str, Style) {
    match status {
        JobStatus::Completed => (strings::SYM_OK, good()),
        JobStatus::Failed => (strings::SYM_BAD, bad()),
        JobStatus::Cancelling | JobStatus::Cancelled => (strings::SYM_WARN, warn()),
        JobStatus::Pending => (strings::SYM_IDLE, dim()),
        JobStatus::Preparing | JobStatus::Running | JobStatus::Finalizing => {
            (strings::SYM_BUSY, busy())
        }
    }
}

/// Symbol and style of a policy run's status.
pub fn run(status: RunStatus) -> (&'static str, Style) {
    match status {
        RunStatus::Completed => (strings::SYM_OK, good()),
        RunStatus::Failed => (strings::SYM_BAD, bad()),
        RunStatus::GaveUp => (strings::SYM_WARN, warn()),
        RunStatus::Queued => (strings::SYM_IDLE, warn()),
        RunStatus::Skipped => (strings::SYM_IDLE, Style::default()),
        RunStatus::Running => (strings::SYM_BUSY, busy()),
    }
}

/// Symbol and style of a disk status.
pub fn disk(status: DiskStatus) -> (&'static str, Style) {
    match status {
        DiskStatus::Completed => (strings::SYM_OK, good()),
        DiskStatus::Failed => (strings::SYM_BAD, bad()),
        DiskStatus::Cancelled => (strings::SYM_WARN, warn()),
        DiskStatus::Pending => (strings::SYM_IDLE, dim()),
        DiskStatus::Preparing | DiskStatus::Ready | DiskStatus::Running => {
            (strings::SYM_BUSY, busy())
        }
    }
}

/// Symbol, word and style of a tunnel state.
pub fn tunnel(state: Option<TunnelStateKind>) -> (&'static str, &'static str, Style) {
    match state {
        Some(TunnelStateKind::Up) => (strings::SYM_OK, strings::TUNNEL_UP, good()),
        Some(TunnelStateKind::Connecting) => {
            (strings::SYM_BUSY, strings::TUNNEL_CONNECTING, warn())
        }
        Some(TunnelStateKind::Down) => (strings::SYM_BAD, strings::TUNNEL_DOWN, bad()),
        None => (strings::SYM_IDLE, strings::TUNNEL_UNKNOWN, dim()),
    }
}

/// Symbol, word and style of a node's tunnel report. A node without a configured tunnel
/// reports `down` with no forwards, no restarts and no error (a configured one always lists
/// its forwards, whatever its state): that is a direct connection, not a failure.
pub fn tunnel_of(t: Option<&TunnelState>) -> (&'static str, &'static str, Style) {
    match t {
        // Plain, not dim: a normal state, and dim text turns unreadable in a selected row.
        Some(t) if is_direct(t) => (strings::SYM_IDLE, strings::TUNNEL_DIRECT, Style::default()),
        _ => tunnel(t.map(|t| t.state)),
    }
}

/// The node runs without a tunnel (see [`tunnel_of`]).
pub fn is_direct(t: &TunnelState) -> bool {
    t.state == TunnelStateKind::Down
        && t.forwards.is_empty()
        && t.restarts == 0
        && t.last_error.is_none()
}

/// Symbol and style of an event level.
pub fn level(level: &str) -> (&'static str, Style) {
    match level {
        "error" => (strings::SYM_BAD, bad()),
        "warn" => (strings::SYM_WARN, warn()),
        _ => (strings::SYM_PORT_FREE, Style::default()),
    }
}

/// Symbol, word and style of a backup point's integrity. Corrupt is loud (red, capitals); a
/// completed point never read back against its checksums is a warning.
pub fn integrity(i: Integrity) -> (&'static str, &'static str, Style) {
    match i {
        Integrity::Verified => (strings::SYM_OK, strings::VERIFIED, good()),
        // Checked against the image itself, not against the source: fine, not proven.
        Integrity::HubComputed => (strings::SYM_OK, strings::HUB_COMPUTED, Style::default()),
        Integrity::Legacy => (strings::SYM_IDLE, strings::LEGACY, Style::default()),
        Integrity::Corrupt => (strings::SYM_BAD, strings::CORRUPT, bad()),
        Integrity::Unverified => (strings::SYM_WARN, strings::UNVERIFIED, warn()),
    }
}

/// Symbol, word and style of a point's consistency.
pub fn consistency(c: ConsistencyLevel) -> (&'static str, &'static str, Style) {
    match c {
        ConsistencyLevel::Application => (strings::SYM_OK, strings::APPLICATION, good()),
        ConsistencyLevel::Crash => (strings::SYM_WARN, strings::CRASH, warn()),
    }
}

/// Symbol and style of an instant recovery's disk stream, by QEMU's word for it.
pub fn stream(state: &str) -> (&'static str, Style) {
    match state {
        strings::STREAM_FINISHED => (strings::SYM_OK, good()),
        strings::STREAM_RUNNING => (strings::SYM_BUSY, busy()),
        strings::STREAM_PENDING => (strings::SYM_IDLE, dim()),
        "failed" | "error" | "aborting" | "concluded" => (strings::SYM_BAD, bad()),
        // paused, standby, ready, ...: waiting, not moving.
        _ => (strings::SYM_WARN, warn()),
    }
}

/// Symbol and style of a recovered VM's QEMU run state.
pub fn vm_state(state: Option<&str>) -> (&'static str, Style) {
    match state {
        Some("running") => (strings::SYM_OK, good()),
        Some("io-error" | "internal-error" | "guest-panicked" | "shutdown") => {
            (strings::SYM_BAD, bad())
        }
        Some(_) => (strings::SYM_WARN, warn()),
        None => (strings::SYM_IDLE, dim()),
    }
}
