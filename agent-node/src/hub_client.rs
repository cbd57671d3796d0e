//! Calls from the node to the hub: registration, inventory, job progress and completion.
//! All carry the shared bearer token.

use sendense_shared::api::{CompletionReport, NodeRegistration, ProgressReport, VmRequest};
use sendense_shared::ids::BackupId;
use serde::Serialize;
use std::time::Duration;
use thiserror::Error;

/// Why a call to the hub failed.
#[derive(Debug, Error)]
pub enum HubError {
    #[error("POST {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("POST {url}: hub answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// A client of one hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl HubClient {
    /// `base`: e.g. `http://127.0.0.1:8082` (no trailing slash).
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        HubClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn post<T: Serialize + ?Sized>(&self, path: &str, body: &T) -> Result<(), HubError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|source| HubError::Request {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(500)
            .collect();
        Err(HubError::Status {
            url,
            status: status.as_u16(),
            body,
        })
    }

    /// `POST /api/v1/nodes`.
    pub async fn register(&self, reg: &NodeRegistration) -> Result<(), HubError> {
        self.post("/api/v1/nodes", reg).await
    }

    /// `POST /api/v1/vms` (one VM of the inventory).
    pub async fn push_vm(&self, vm: &VmRequest) -> Result<(), HubError> {
        self.post("/api/v1/vms", vm).await
    }

    /// `POST /api/v1/backups/{id}/progress`.
    pub async fn progress(&self, id: &BackupId, report: &ProgressReport) -> Result<(), HubError> {
        self.post(&format!("/api/v1/backups/{id}/progress"), report)
            .await
    }

    /// `POST /api/v1/backups/{id}/complete`.
    pub async fn complete(&self, id: &BackupId, report: &CompletionReport) -> Result<(), HubError> {
        self.post(&format!("/api/v1/backups/{id}/complete"), report)
            .await
    }
}

/// Delay before retry number `attempt` (0-based): 0.25 s doubling up to 10 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6)).min(10_000))
}
