//! The bearer token shared by hub, node and console: a [`Token`] that never prints itself and
//! compares in constant time, and [`read_token_file`], the one reader of token files.
//!
//! Not behind the `server` feature: reading a token needs no HTTP server, and the console
//! can use the same reader without pulling axum.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anyone who can read the file can call the API: refuse rather than serve with a leaked
    /// secret.
    #[error(
        "token file {path} is readable by group or others (mode {mode:04o}); `chmod 600` it \
         (and consider the token leaked)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("token file {path} is empty")]
    Empty { path: PathBuf },
}

impl TokenError {
    /// The file does not exist (the hub then creates one).
    pub fn is_not_found(&self) -> bool {
        matches!(self, TokenError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The shared secret. `Debug` shows `Token(..)`, so a config struct that holds one can be
/// logged.
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
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

impl From<String> for Token {
    fn from(s: String) -> Self {
        Token::new(s)
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Token::new(s)
    }
}

/// `secret == guess` in a time that depends only on the secret's length: every byte of the
/// secret is looked at, whatever matched. (The length itself is not secret: 64 hex digits.)
pub fn constant_time_eq(secret: &[u8], guess: &[u8]) -> bool {
    let mut diff = secret.len() ^ guess.len();
    for (i, x) in secret.iter().enumerate() {
        diff |= usize::from(x ^ guess.get(i).copied().unwrap_or(0));
        // Keeps the optimiser from turning the loop into an early-exit comparison.
        diff = std::hint::black_box(diff);
    }
    diff == 0
}

/// Reads a token file: refused when group or others may read it (`mode & 0o077 != 0`) or when
/// it is empty; surrounding white space (the trailing newline) is not part of the token. The
/// mode is checked on the opened file, so it is the mode of what was read.
pub fn read_token_file(path: &Path) -> Result<Token, TokenError> {
    let read = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read)?;
    let mode = f.metadata().map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Token::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_a_private_file_and_trims_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let t = read_token_file(&write(dir.path(), "s3cret\n", 0o600)).unwrap();
        assert_eq!(t.as_str(), "s3cret");
        assert_eq!(format!("{t:?}"), "Token(..)");
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret\n"));
        assert!(!t.matches(""));
        assert!(!t.matches("s3cret-and-more"));
        // Read-only for the owner is fine too.
        assert!(read_token_file(&write(dir.path(), "x", 0o400)).is_ok());
    }

    #[test]
    fn a_file_others_may_read_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let p = write(dir.path(), "s3cret\n", mode);
            let e = read_token_file(&p).unwrap_err();
            assert!(
                matches!(&e, TokenError::Permissions { path, mode: m } if path == &p && *m == mode),
                "{mode:o}: {e:?}"
            );
            let shown = e.to_string();
            assert!(shown.contains(&p.display().to_string()), "{shown}");
            assert!(shown.contains(&format!("{mode:04o}")), "{shown}");
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn empty_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), " \n", 0o600);
        assert!(matches!(read_token_file(&p), Err(TokenError::Empty { .. })));
        let e = read_token_file(&dir.path().join("nope")).unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
