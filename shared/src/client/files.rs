//! File-level browsing of a backup point, console side: a listing (which may wait for the
//! hub's appliance to boot) and a tar archive as a streaming response.

use super::{ClientError, HubClient, refusal};
use crate::api::FileListing;
use crate::ids::BackupId;
use base64::Engine;
use std::time::Duration;

/// The first request of a browsing session waits for the hub's appliance (15-30 s under TCG).
const LISTING_TIMEOUT: Duration = Duration::from_secs(300);

/// Which disk, filesystem and path of a backup point.
#[derive(Debug, Clone, Default)]
pub struct FileQuery {
    pub disk: Option<i64>,
    pub fs: Option<String>,
    /// The guest path's bytes (a name need not be UTF-8).
    pub path: Option<Vec<u8>>,
}

impl FileQuery {
    /// `disk=..&fs=..&path=..` (or `path_b64=` for bytes that are not UTF-8), percent-encoded.
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(d) = self.disk {
            parts.push(format!("disk={d}"));
        }
        if let Some(f) = &self.fs {
            parts.push(format!("fs={}", encode(f.as_bytes())));
        }
        if let Some(p) = &self.path {
            match std::str::from_utf8(p) {
                Ok(s) => parts.push(format!("path={}", encode(s.as_bytes()))),
                Err(_) => parts.push(format!(
                    "path_b64={}",
                    encode(
                        base64::engine::general_purpose::STANDARD
                            .encode(p)
                            .as_bytes()
                    )
                )),
            }
        }
        parts.join("&")
    }
}

fn encode(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

impl HubClient {
    /// `GET /api/v1/backups/{id}/files`.
    pub async fn files(&self, id: &BackupId, q: &FileQuery) -> Result<FileListing, ClientError> {
        let path = format!("/api/v1/backups/{id}/files?{}", q.to_query());
        let (url, bytes) = self
            .call_within(
                "GET",
                &path,
                || format!("backup {id} (or its disk, filesystem or path)"),
                None,
                LISTING_TIMEOUT,
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { url, source })
    }

    /// `GET /api/v1/backups/{id}/files/archive`: the response, its body the tar stream.
    pub async fn files_archive(
        &self,
        id: &BackupId,
        q: &FileQuery,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(&format!(
            "/api/v1/backups/{id}/files/archive?{}",
            q.to_query()
        ));
        self.gate_open(&url)?;
        let resp = self
            .authed(self.http.get(&url))
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|source| ClientError::Body {
            url: url.clone(),
            source,
        })?;
        Err(refusal("GET", url, status, &bytes, || {
            format!("backup {id} (or its disk, filesystem or path)")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::FileQuery;

    #[test]
    fn query_sends_bytes_that_are_not_utf8_as_base64() {
        let q = FileQuery {
            disk: Some(2001),
            fs: Some("/dev/sda".into()),
            path: Some(b"/a b".to_vec()),
        };
        assert_eq!(q.to_query(), "disk=2001&fs=/dev/sda&path=/a%20b");
        let q = FileQuery {
            path: Some(b"/\xff".to_vec()),
            ..Default::default()
        };
        assert_eq!(q.to_query(), "path_b64=L/8%3D");
    }
}
