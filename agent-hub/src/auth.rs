//! The API's bearer token: read from a file (created with mode 0600 when missing, so a fresh
//! install is protected from its first start; refused when group or others may read it). The
//! check on every `/api/v1` request is `sendense_shared::http::require_bearer`, the node's too.
//! The token never appears on a command line or in a log line.

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
