//! The hub's HTTP client. Every error names its cause the way an operator needs it: which URL
//! did not answer, that the token was refused, or the hub's own `detail` for a 4xx.

use reqwest::StatusCode;
use sendense_shared::api::{
    Backup, BackupRequest, ErrorBody, Health, JobEvent, Node, NodeTunnel, PortsView, ProcessInfo,
    Repository, Vm,
};
use sendense_shared::ids::BackupId;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// How long one ordinary request may take (the event stream has no such limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("hub unreachable at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "401 Unauthorized: the hub at {url} refused the token; pass the hub's token with --token-file FILE or SENDENSE_TOKEN"
    )]
    Unauthorized { url: String },
    #[error("{what}: {error} (404 Not Found): {detail}")]
    NotFound {
        what: String,
        error: String,
        detail: String,
    },
    #[error("hub answered {status} to {method} {url}: {error}: {detail}")]
    Api {
        method: &'static str,
        url: String,
        status: u16,
        error: String,
        detail: String,
    },
    #[error("unexpected answer from {url} (not the JSON the console expects)")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the answer of {url} failed")]
    Body {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// True when the hub did not answer at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// The message of an error and of all its sources, joined by `: `, with repeats dropped
/// (reqwest and hyper tend to say the same thing twice).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// A client for one hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl HubClient {
    /// `base` is the hub's URL without a trailing slash, e.g. `http://127.0.0.1:8082`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("sendense-console/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        HubClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        what: impl FnOnce() -> String,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let mut req = match method {
            "POST" => self.http.post(&url),
            _ => self.http.get(&url),
        };
        req = self.authed(req).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Body {
            url: url.clone(),
            source,
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|source| ClientError::Decode { url, source });
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized { url });
        }
        let (error, detail) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error.to_string(), b.detail),
            Err(_) => (
                status.canonical_reason().unwrap_or("error").to_string(),
                String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(300)
                    .collect(),
            ),
        };
        if status == StatusCode::NOT_FOUND {
            return Err(ClientError::NotFound {
                what: what(),
                error,
                detail,
            });
        }
        Err(ClientError::Api {
            method,
            url,
            status: status.as_u16(),
            error,
            detail,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, || path.to_string(), None).await
    }

    /// `GET /health` (open, no token).
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/health").await
    }

    pub async fn backups(&self) -> Result<Vec<Backup>, ClientError> {
        self.get("/api/v1/backups").await
    }

    pub async fn backup(&self, id: &BackupId) -> Result<Backup, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/backups/{id}"),
            || format!("backup {id}"),
            None,
        )
        .await
    }

    pub async fn backup_events(&self, id: &BackupId) -> Result<Vec<JobEvent>, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/backups/{id}/events"),
            || format!("backup {id}"),
            None,
        )
        .await
    }

    pub async fn vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.get("/api/v1/vms").await
    }

    pub async fn repositories(&self) -> Result<Vec<Repository>, ClientError> {
        self.get("/api/v1/repositories").await
    }

    pub async fn ports(&self) -> Result<PortsView, ClientError> {
        self.get("/api/v1/ports").await
    }

    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        self.get("/api/v1/processes").await
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/api/v1/nodes").await
    }

    /// `GET /api/v1/tunnel`: per-node tunnel state, probed by the hub.
    pub async fn tunnel(&self) -> Result<Vec<NodeTunnel>, ClientError> {
        self.get("/api/v1/tunnel").await
    }

    /// `POST /api/v1/backups`: the hub answers 202 with the new job.
    pub async fn start_backup(&self, req: &BackupRequest) -> Result<Backup, ClientError> {
        self.send(
            "POST",
            "/api/v1/backups",
            || {
                format!(
                    "backup of VM {:?} into repository {:?}",
                    req.vm_name, req.repository_id
                )
            },
            Some(json_body(req)),
        )
        .await
    }

    /// `POST /api/v1/backups/{id}/cancel`.
    pub async fn cancel_backup(&self, id: &BackupId) -> Result<Backup, ClientError> {
        self.send(
            "POST",
            &format!("/api/v1/backups/{id}/cancel"),
            || format!("backup {id}"),
            None,
        )
        .await
    }

    /// Open `GET /api/v1/events`; the caller reads the body as a stream.
    pub async fn events(&self) -> Result<reqwest::Response, ClientError> {
        let url = self.url("/api/v1/events");
        let resp = self
            .authed(self.http.get(&url))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized { url });
        }
        if !status.is_success() {
            return Err(ClientError::Api {
                method: "GET",
                url,
                status: status.as_u16(),
                error: status.canonical_reason().unwrap_or("error").to_string(),
                detail: "the event stream is not available".to_string(),
            });
        }
        Ok(resp)
    }
}

/// Our request types are plain structs of strings and enums: serialising them cannot fail.
fn json_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}
