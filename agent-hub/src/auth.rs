//! Who calls the API. Two kinds of [`Principal`]:
//!
//! - the admin: the hub's token file (operators, the console), read from a file created with
//!   mode 0600 when missing (a fresh install is protected from its first start) and refused
//!   when group or others may read it;
//! - a node: a credential the hub issued it ([`credentials`]), which acts only on that node's
//!   VMs, jobs and restores (the scope checks are in `api::scope`).
//!
//! [`Authenticator::principal`] tells them apart on every request, asking the database for a
//! node credential each time. No secret appears on a command line or in a log line.

pub mod credentials;

pub use credentials::{CredentialError, Credentials, Identity};
pub use sendense_shared::token::Token;
use sendense_shared::token::{TokenError, read_token_file};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Read(#[from] TokenError),
    #[error("cannot create token file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The hub's token: everything.
    Admin,
    /// A node's credential: only what belongs to that node.
    Node(String),
}

impl Principal {
    /// The node, for a node's credential.
    pub fn node(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Node(n) => Some(n),
        }
    }
}

/// The admin token and the node credentials; cheap to clone.
#[derive(Clone, Debug)]
pub struct Authenticator {
    pub admin: Token,
    pub credentials: Credentials,
}

impl Authenticator {
    /// The principal of a bearer token, or why it is refused (for the 401's detail; never the
    /// token).
    pub async fn principal(
        &self,
        bearer: &str,
    ) -> Result<Result<Principal, String>, crate::db::DbError> {
        if self.admin.matches(bearer) {
            return Ok(Ok(Principal::Admin));
        }
        Ok(match self.credentials.identify(bearer).await? {
            Identity::Node(n) => Ok(Principal::Node(n)),
            Identity::Ended(n) => Err(format!(
                "the credential of node {n:?} was revoked or replaced;                  `sendense-hub node enroll|rotate {n}` issues a new one"
            )),
            Identity::Unknown => Err(
                "bearer token does not match the hub's token file nor any node credential"
                    .to_string(),
            ),
        })
    }
}

/// Reads the token (trimmed); creates the file with a random token when it does not exist.
pub fn load_or_create(path: &Path) -> Result<Token, AuthError> {
    match read_token_file(path) {
        Ok(t) => Ok(t),
        Err(e) if e.is_not_found() => {
            let create = |source| AuthError::Create {
                path: path.to_path_buf(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(create)?;
            }
            let token = random_token();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(create)?;
            writeln!(f, "{token}").map_err(create)?;
            tracing::info!(path = %path.display(), "created a new API token file (mode 0600)");
            Ok(Token::new(token))
        }
        Err(e) => Err(e.into()),
    }
}

/// 256 bits from the kernel's generator, hex-encoded (uuid v4 uses getrandom underneath).
fn random_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token");
        let t1 = load_or_create(&path).unwrap();
        assert_eq!(t1.as_str().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t2 = load_or_create(&path).unwrap();
        assert_eq!(t1.as_str(), t2.as_str());
        assert!(t1.matches(t2.as_str()));
        assert!(!t1.matches(&t2.as_str()[..63]));
        assert!(!t1.matches(""));
    }

    #[test]
    fn an_empty_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(AuthError::Read(TokenError::Empty { .. }))
        ));
    }

    #[test]
    fn a_token_file_others_may_read_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(
            matches!(
                &e,
                AuthError::Read(TokenError::Permissions { mode: 0o644, .. })
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret\n");
    }
}
