//! [`VsphereError`]: everything that can go wrong talking to vSphere, with the fault type a
//! caller matches on ([`VsphereError::fault`]) rather than on message text.

/// Everything that can go wrong talking to vSphere.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("cannot reach vSphere at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("TLS certificate of {url} refused: {detail}")]
    Certificate { url: String, detail: String },
    #[error(
        "vSphere at {url} refused the login of user {user:?} (InvalidLogin: wrong user name or password)"
    )]
    Login { url: String, user: String },
    #[error("vSphere call {method} failed: {fault}: {message}")]
    Fault {
        method: String,
        fault: String,
        message: String,
    },
    #[error("{what} failed: {fault}: {message}")]
    Task {
        what: String,
        fault: String,
        message: String,
    },
    #[error("{what}: task {task} still running after {waited_secs} s")]
    TaskTimeout {
        what: String,
        task: String,
        waited_secs: u64,
    },
    #[error("vSphere call {method}: unexpected response: {detail}")]
    Protocol { method: String, detail: String },
}

impl VsphereError {
    /// The SOAP/task fault type, if any ("ManagedObjectNotFound", "FileFault", ...).
    pub fn fault(&self) -> Option<&str> {
        match self {
            Self::Fault { fault, .. } | Self::Task { fault, .. } => Some(fault),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_type_is_exposed() {
        let e = VsphereError::Task {
            what: "x".into(),
            fault: "FileFault".into(),
            message: "m".into(),
        };
        assert_eq!(e.fault(), Some("FileFault"));
        let e = VsphereError::Unreachable {
            url: "u".into(),
            detail: "d".into(),
        };
        assert_eq!(e.fault(), None);
    }
}
