//! Guest paths as the API takes them: absolute, no NUL, normalized (`.` and empty components
//! dropped), and `..` refused rather than resolved, so a request cannot name anything outside
//! the filesystem's root however the guest's links are laid out. Bytes, not UTF-8: a guest
//! name may be anything but `/` and NUL.

use base64::Engine;

/// A normalized absolute guest path: `/` or `/a/b` (no trailing slash, no `.`/`..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GuestPath(Vec<u8>);

/// Why a path was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
}

fn bad(field: &'static str, why: impl Into<String>) -> PathError {
    PathError::Invalid {
        field,
        why: why.into(),
    }
}

impl GuestPath {
    pub fn root() -> GuestPath {
        GuestPath(b"/".to_vec())
    }

    /// Checks and normalizes `raw`, the value of `field`.
    pub fn parse(field: &'static str, raw: &[u8]) -> Result<GuestPath, PathError> {
        if raw.is_empty() {
            return Err(bad(field, "is empty; give an absolute path such as /etc"));
        }
        if raw.contains(&0) {
            return Err(bad(field, "contains a NUL byte"));
        }
        if raw[0] != b'/' {
            return Err(bad(
                field,
                format!(
                    "{:?} is not absolute; give a path from the filesystem's root, such as /{}",
                    String::from_utf8_lossy(raw),
                    String::from_utf8_lossy(raw)
                ),
            ));
        }
        if raw.len() > 4096 {
            return Err(bad(field, "is longer than 4096 bytes"));
        }
        let mut out = Vec::with_capacity(raw.len());
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    return Err(bad(
                        field,
                        "contains `..`; give the normalized path (the browser never resolves `..`)",
                    ));
                }
                c => {
                    if c.len() > 255 {
                        return Err(bad(field, "has a component longer than 255 bytes"));
                    }
                    out.push(b'/');
                    out.extend_from_slice(c);
                }
            }
        }
        if out.is_empty() {
            out.push(b'/');
        }
        Ok(GuestPath(out))
    }

    /// From the query: `path` (UTF-8) or `path_b64` (the exact bytes, base64), not both.
    pub fn from_query(
        path: Option<&str>,
        path_b64: Option<&str>,
    ) -> Result<Option<GuestPath>, PathError> {
        match (path, path_b64) {
            (Some(_), Some(_)) => Err(bad("path_b64", "give either path or path_b64, not both")),
            (Some(p), None) => GuestPath::parse("path", p.as_bytes()).map(Some),
            (None, Some(b)) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| bad("path_b64", format!("is not standard base64: {e}")))?;
                GuestPath::parse("path_b64", &raw).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == b"/"
    }

    /// Every proper prefix below the root, shortest first: `/a`, `/a/b` for `/a/b/c`.
    pub fn ancestors(&self) -> Vec<GuestPath> {
        let mut v = Vec::new();
        for (i, &b) in self.0.iter().enumerate().skip(1) {
            if b == b'/' {
                v.push(GuestPath(self.0[..i].to_vec()));
            }
        }
        v
    }

    /// The last component (`""` for the root).
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// This path joined with one name of a directory listing.
    pub fn join(&self, name: &[u8]) -> GuestPath {
        let mut v = self.0.clone();
        if !self.is_root() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        GuestPath(v)
    }

    /// Lossy UTF-8 for display.
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// A guestfish double-quoted string of `bytes`: everything but plain ASCII letters, digits and
/// `/._-` as `\xHH`, so no byte of a guest name can end the argument or the command line.
pub fn quote(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-') {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s.push('"');
    s
}

/// `(lossy, Some(base64))` when `bytes` are not UTF-8, `(utf8, None)` otherwise.
pub fn encode_name(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses() {
        let p = |s: &str| GuestPath::parse("path", s.as_bytes());
        assert_eq!(p("/").unwrap().as_bytes(), b"/");
        assert_eq!(p("//a/./b//").unwrap().as_bytes(), b"/a/b");
        assert!(p("a/b").unwrap_err().to_string().starts_with("path: "));
        assert!(p("/a/../b").unwrap_err().to_string().contains(".."));
        assert!(p("").is_err());
        assert!(GuestPath::parse("path", b"/a\0b").is_err());
        let q = GuestPath::parse("path", b"/d/x\xff").unwrap();
        assert_eq!(q.file_name(), b"x\xff");
        assert_eq!(q.ancestors(), vec![GuestPath(b"/d".to_vec())]);
        assert_eq!(GuestPath::root().join(b"a").as_bytes(), b"/a");
    }

    #[test]
    fn from_query_takes_base64_bytes() {
        let b = base64::engine::general_purpose::STANDARD.encode(b"/bad\xfe");
        let p = GuestPath::from_query(None, Some(&b)).unwrap().unwrap();
        assert_eq!(p.as_bytes(), b"/bad\xfe");
        let e = GuestPath::from_query(Some("/a"), Some(&b)).unwrap_err();
        assert!(e.to_string().starts_with("path_b64"));
        assert_eq!(GuestPath::from_query(None, None).unwrap(), None);
    }

    #[test]
    fn quote_escapes_everything_but_plain_bytes() {
        assert_eq!(quote(b"/a b\"\n\xff"), r#""/a\x20b\x22\x0a\xff""#);
        assert_eq!(encode_name(b"ok").1, None);
        assert_eq!(encode_name(b"\xff").1.as_deref(), Some("/w=="));
    }
}
