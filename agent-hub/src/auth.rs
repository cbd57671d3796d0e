//! The API's bearer token: read from a file (created with mode 0600 when missing, so a fresh
//! install is protected from its first start), and checked on every `/api/v1` request.
//! The token never appears on a command line or in a log line.

use crate::api::ApiError;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create token file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    Empty { path: PathBuf },
}

/// The shared secret; compared in constant time.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn new(s: impl Into<String>) -> Self {
        Token(Arc::from(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so the answer time does not leak how much of a guess matched.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// Reads the token (trimmed); creates the file with a random token when it does not exist.
pub fn load_or_create(path: &Path) -> Result<Token, AuthError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let t = s.trim();
            if t.is_empty() {
                return Err(AuthError::Empty {
                    path: path.to_path_buf(),
                });
            }
            Ok(Token::new(t))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
        Err(source) => Err(AuthError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// 256 bits from the kernel's generator, hex-encoded (uuid v4 uses getrandom underneath).
fn random_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

/// Middleware: `Authorization: Bearer <token>` or 401 naming what was wrong.
pub async fn require_bearer(
    State(token): State<Token>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(ApiError::Unauthorized(
            "missing Authorization header: send `Authorization: Bearer <token>` (token file of the hub)",
        ));
    };
    let Some(given) = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    }) else {
        return Err(ApiError::Unauthorized(
            "Authorization header is not `Bearer <token>`",
        ));
    };
    if !token.matches(given.trim()) {
        return Err(ApiError::Unauthorized(
            "bearer token does not match the hub's token file",
        ));
    }
    Ok(next.run(req).await)
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
        assert!(matches!(
            load_or_create(&path),
            Err(AuthError::Empty { .. })
        ));
    }
}
