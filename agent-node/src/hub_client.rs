//! Calls from the node to the hub: registration, inventory, job progress and completion (of
//! backups and of restores), and [`deliver`], the one retry loop of a job's final reports.
//! All carry the shared bearer token.

use sendense_shared::api::{
    CompletionReport, NodeRegistration, ProgressReport, RestoreCompletion, RestoreProgress,
    VmRequest,
};
use sendense_shared::ids::BackupId;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Attempts at a final report once the node is shutting down: a job just cancelled by the
/// shutdown should still be heard by the hub, but the node must exit within its grace.
pub const SHUTDOWN_ATTEMPTS: u32 = 3;

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

    /// `POST /api/v1/restores/{id}/progress`.
    pub async fn restore_progress(
        &self,
        id: &str,
        report: &RestoreProgress,
    ) -> Result<(), HubError> {
        self.post(&format!("/api/v1/restores/{id}/progress"), report)
            .await
    }

    /// `POST /api/v1/restores/{id}/complete`.
    pub async fn restore_complete(
        &self,
        id: &str,
        report: &RestoreCompletion,
    ) -> Result<(), HubError> {
        self.post(&format!("/api/v1/restores/{id}/complete"), report)
            .await
    }
}

/// How [`deliver`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The hub took the report.
    Taken,
    /// The hub answered 4xx: it does not want this report; retrying will not change that.
    Refused { status: u16, body: String },
    /// The node shut down before the hub took it.
    GaveUp,
}

/// Sends one final report until the hub takes it or refuses it with a 4xx, retrying with
/// [`backoff`]; once `shutdown` fired, only until `attempt` reaches [`SHUTDOWN_ATTEMPTS`].
/// `attempt` is shared by the reports of one job (its progress, then its completion), so a
/// shutting-down node spends at most that many attempts per job.
pub async fn deliver<F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: &mut u32,
    mut send: F,
) -> Delivery
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), HubError>>,
{
    loop {
        match send().await {
            Ok(()) => return Delivery::Taken,
            Err(HubError::Status { status, body, .. }) if (400..500).contains(&status) => {
                tracing::warn!(what, status, body, "hub refused the report");
                return Delivery::Refused { status, body };
            }
            Err(e) => {
                tracing::warn!(what, error = %sendense_shared::errors::chain(&e), attempt = *attempt,
                    "report failed; retrying");
            }
        }
        if shutdown.is_cancelled() && *attempt >= SHUTDOWN_ATTEMPTS {
            tracing::error!(what, "shutting down before the hub took the report");
            return Delivery::GaveUp;
        }
        tokio::time::sleep(backoff(*attempt)).await;
        *attempt += 1;
    }
}

/// Delay before retry number `attempt` (0-based): 0.25 s doubling up to 10 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6)).min(10_000))
}
