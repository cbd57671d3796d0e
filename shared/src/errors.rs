//! Errors on the wire and in logs: the [`ErrorCode`] every 4xx/5xx body carries, and the one
//! cause-chain formatter ([`chain`]) used by every log field, job event and CLI message.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The machine-readable cause of an error answer, carried in `ErrorBody.error`. Callers match
/// on it as a value; `detail` is for people and may change wording freely.
///
/// A code a peer does not know yet (a newer hub or node) deserialises as [`ErrorCode::Other`],
/// so an old console keeps working and shows the detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON at all (syntax, empty).
    InvalidJson,
    /// A name that would become a path component or export name is unsafe.
    InvalidName,
    /// JSON of the wrong shape, or a value refused by validation; `detail` names the field.
    InvalidField,
    /// No or a wrong bearer token.
    Unauthorized,
    /// The credential is valid but its scope does not cover the request (a node's credential
    /// acting on another node's VM, job or restore, or on what needs the admin credential);
    /// `detail` names the scope.
    Forbidden,
    /// The route, VM, backup, restore, node or repository does not exist; `detail` names it.
    NotFound,
    /// A record with that id exists already.
    AlreadyExists,
    /// The VM has an active job already.
    VmBusy,
    /// The backup point is being restored already.
    BackupBusy,
    /// The job is not in a state that allows the operation.
    WrongState,
    /// The job was cancelled while the request was being served.
    Cancelled,
    /// Only a completed (verified) backup can be restored.
    NotRestorable,
    /// An image the database names is not on disk.
    ImageMissing,
    /// An incremental has no valid changed-block map (QEMU dirty bitmap, vSphere change id):
    /// run a full backup. Nodes older than the codes answered the words `"bitmap missing"`;
    /// the alias keeps a newer hub's fallback to full working against them.
    #[serde(alias = "bitmap missing")]
    BitmapMissing,
    /// The VM belongs to a node that is not registered.
    NodeNotRegistered,
    /// The node could not be reached or answered wrongly.
    NodeUnreachable,
    /// The node cannot reach its hypervisor (QMP not answering, vCenter down, login refused).
    HypervisorUnavailable,
    /// The hypervisor refused the operation; `detail` has its cause.
    HypervisorError,
    /// The answering agent is shutting down and takes no new work.
    ShuttingDown,
    /// The repository lacks the space the job may need.
    InsufficientStorage,
    /// Every NBD port of the range is held.
    PortsExhausted,
    /// Starting a step of the job failed (qemu-nbd, an image, the snapshot); `detail` says why.
    JobFailed,
    /// The guest's file systems could not be frozen and the job requires an
    /// application-consistent snapshot; `detail` says why (no agent, timeout, refusal).
    ConsistencyRequired,
    /// The database could not be read or written.
    Database,
    /// A bug; the cause is in the answering agent's log.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The wire form (`"bitmap_missing"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::VmBusy => "vm_busy",
            ErrorCode::BackupBusy => "backup_busy",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::NotRestorable => "not_restorable",
            ErrorCode::ImageMissing => "image_missing",
            ErrorCode::BitmapMissing => "bitmap_missing",
            ErrorCode::NodeNotRegistered => "node_not_registered",
            ErrorCode::NodeUnreachable => "node_unreachable",
            ErrorCode::HypervisorUnavailable => "hypervisor_unavailable",
            ErrorCode::HypervisorError => "hypervisor_error",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::PortsExhausted => "ports_exhausted",
            ErrorCode::JobFailed => "job_failed",
            ErrorCode::ConsistencyRequired => "consistency_required",
            ErrorCode::Database => "database",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
        }
    }

    /// Every code, for tests that walk them all.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::InvalidName,
        ErrorCode::InvalidField,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::VmBusy,
        ErrorCode::BackupBusy,
        ErrorCode::WrongState,
        ErrorCode::Cancelled,
        ErrorCode::NotRestorable,
        ErrorCode::ImageMissing,
        ErrorCode::BitmapMissing,
        ErrorCode::NodeNotRegistered,
        ErrorCode::NodeUnreachable,
        ErrorCode::HypervisorUnavailable,
        ErrorCode::HypervisorError,
        ErrorCode::ShuttingDown,
        ErrorCode::InsufficientStorage,
        ErrorCode::PortsExhausted,
        ErrorCode::JobFailed,
        ErrorCode::ConsistencyRequired,
        ErrorCode::Database,
        ErrorCode::Internal,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and all its sources on one line, `: `-separated, with a cause dropped when an
/// earlier part already says it (reqwest, hyper and `#[error(transparent)]` layers tend to
/// repeat their source). Use it wherever an error becomes text: log fields, job events, the
/// `error_message` of a report, a CLI message.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("preparation failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn chain_names_every_cause_once() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(2),
        };
        let s = chain(&e);
        assert!(s.starts_with("reading /x: No such file"), "{s}");
        let e = Repeats(std::io::Error::other("disk full"));
        assert_eq!(chain(&e), "preparation failed: disk full");
    }

    #[test]
    fn codes_round_trip_and_unknown_is_other() {
        for c in ErrorCode::ALL {
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), *c);
        }
        let c: ErrorCode = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(c, ErrorCode::Other);
        let old: ErrorCode = serde_json::from_str("\"bitmap missing\"").unwrap();
        assert_eq!(old, ErrorCode::BitmapMissing);
    }
}
