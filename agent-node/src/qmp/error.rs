//! What a failed QMP exchange says, and what QEMU's refusals mean ([`QmpError::refusal`]): the
//! one place that reads QEMU's error sentences.

use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: no greeting within {timeout:?} (is another client connected?)")]
    GreetingTimeout { path: PathBuf, timeout: Duration },
    #[error("QMP socket {path}: protocol error: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("QMP socket {path}: I/O error")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: connection closed")]
    Closed { path: PathBuf },
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// QEMU refused the command: `class` and `desc` as QEMU gave them.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

impl QmpError {
    /// The QEMU error description, when QEMU refused the command.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }

    /// What a refusal means for the caller, as a value. QEMU sends most refusals as
    /// `GenericError` with only a sentence to tell them apart; this is the one place that reads
    /// those sentences (QEMU 7.2 to 10's wording), so no caller matches text.
    pub fn refusal(&self) -> Option<Refusal> {
        let QmpError::Command { class, desc, .. } = self else {
            return None;
        };
        Some(if class == "DeviceNotFound" || mentions_absence(desc) {
            Refusal::NotFound
        } else if desc.contains("already running") {
            Refusal::AlreadyRunning
        } else if desc.contains("not running") || desc.contains("No NBD server") {
            Refusal::NotRunning
        } else {
            Refusal::Other
        })
    }
}

/// QEMU's words for "there is no such node, job, export or bitmap".
fn mentions_absence(desc: &str) -> bool {
    [
        "not found",
        "No such",
        "not exist",
        "Cannot find",
        "Failed to find",
    ]
    .iter()
    .any(|w| desc.contains(w))
}

/// A QMP refusal, classified ([`QmpError::refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The object named does not exist (gone already: a release may go on).
    NotFound,
    /// The service is running already (the NBD server).
    AlreadyRunning,
    /// The service is not running (the NBD server).
    NotRunning,
    /// Anything else: a real failure.
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's refusals as the release and snapshot paths see them (the sentences are QEMU
    /// 7.2's, seen from the real QEMU in the node tests).
    #[test]
    fn refusals_are_classified_once() {
        let r = |class: &str, desc: &str| {
            QmpError::Command {
                command: "x".into(),
                class: class.into(),
                desc: desc.into(),
            }
            .refusal()
        };
        assert_eq!(
            r(
                "GenericError",
                "Failed to find node with node-name='fleece1'"
            ),
            Some(Refusal::NotFound)
        );
        assert_eq!(
            r("DeviceNotFound", "Device 'x' not found"),
            Some(Refusal::NotFound)
        );
        assert_eq!(
            r("GenericError", "Export 'e' is not found"),
            Some(Refusal::NotFound)
        );
        assert_eq!(
            r("GenericError", "NBD server already running"),
            Some(Refusal::AlreadyRunning)
        );
        assert_eq!(
            r("GenericError", "NBD server not running"),
            Some(Refusal::NotRunning)
        );
        assert_eq!(r("GenericError", "Permission denied"), Some(Refusal::Other));
        let io = QmpError::Closed {
            path: PathBuf::from("/run/x.qmp"),
        };
        assert_eq!(io.refusal(), None);
    }
}
