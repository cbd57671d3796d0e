//! The one typed client of the hub's HTTP API (feature `client`), used by the console and the
//! node. Every error names its cause the way an operator needs it: which URL did not answer,
//! that the token was refused, or the hub's own `error` and `detail` for a 4xx.
//!
//! Console side: health, backups, restores, instant recoveries (`recoveries`), verify jobs, VMs, repositories, ports, processes, nodes, tunnel, start,
//! cancel, the event stream; policies, their runs, points, protection, prune jobs and
//! repository space (`policies`). Node side: registration, inventory push, and the progress and
//! completion reports of backups, restores and instant recoveries (`recovery_reports`).
//! Retries are the caller's, paced with [`crate::backoff`].

use crate::api::{
    Backup, BackupRequest, CompletionReport, ErrorBody, Health, JobEvent, Node, NodeRegistration,
    NodeTunnel, PortsView, ProcessInfo, ProgressReport, Repository, Restore, RestoreCompletion,
    RestoreProgress, RestoreRequest, TunnelState, TunnelStateKind, Vm, VmRequest,
};
use crate::ids::BackupId;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

mod files;
pub use files::FileQuery;
mod policies;
pub mod proof;
mod recoveries;
mod recovery_reports;
mod verify;

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
    /// Not sent: the tunnel the hub is reached through is not up ([`HubClient::gate_on`]).
    #[error("not sent to {url}: the tunnel to the hub is {state} (last error: {last_error})")]
    TunnelDown {
        url: String,
        state: String,
        last_error: String,
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
    #[error("unexpected answer from {url} (not the JSON this client expects)")]
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
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::TunnelDown { .. }
        )
    }

    /// The endpoint did not prove it is the hub (see [`HubClient::proven`]): nothing was sent.
    pub fn proof_failure(&self) -> Option<&proof::ProofError> {
        match self {
            ClientError::Unreachable { source, .. } => proof::proof_failure(source),
            _ => None,
        }
    }

    /// The HTTP status the hub answered with, if it answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Unauthorized { .. } => Some(401),
            ClientError::NotFound { .. } => Some(404),
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The hub refused the request itself (a 4xx): sending the same again will not help.
    pub fn is_refused(&self) -> bool {
        self.status().is_some_and(|s| (400..500).contains(&s))
    }
}

/// A client for one hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// The tunnel the hub is reached through, once [`gate_on`](Self::gate_on) set it: while
    /// its state is not `up`, nothing is sent (shared by every clone).
    gate: std::sync::Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<TunnelState>>>,
}

impl HubClient {
    /// `base` is the hub's URL, e.g. `http://127.0.0.1:8082` (a trailing slash is dropped).
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_agent(base, token, concat!("sendense/", env!("CARGO_PKG_VERSION")))
    }

    /// Like [`new`](Self::new), naming the calling program in the `User-Agent` (the hub logs it).
    pub fn with_agent(base: &str, token: Option<String>, user_agent: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(user_agent)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self::of(base, token, http)
    }

    /// The node's client: every new connection must first prove it reaches the hub that
    /// issued `node`'s credential `token` ([`proof::ProofLayer`]); until it has, nothing (not
    /// the credential, not a report) is written to it. A failed proof is an
    /// [`ClientError::Unreachable`] whose cause is the [`proof::ProofError`]
    /// ([`ClientError::proof_failure`]).
    pub fn proven(base: &str, token: &str, user_agent: &str, node: &str) -> Self {
        let layer = proof::ProofLayer::new(
            crate::proof::Role::Hub,
            node,
            &proof::endpoint_of(base),
            proof::fixed_keys(crate::token::Token::new(token.to_string())),
            CONNECT_TIMEOUT,
        );
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(user_agent)
            // A proxy would be the peer of the connection and the challenge's request form
            // would be wrong for it: the node talks to the hub (or its forward) directly.
            .no_proxy()
            .connector_layer(layer)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self::of(base, Some(token.to_string()), http)
    }

    /// An operator's client (the console): with a token, every new connection must first
    /// prove it reaches the hub that holds this admin token ([`crate::proof::ADMIN`]), so the
    /// token never goes to whoever binds the hub's address while the hub is down. Without a
    /// token, a plain client (only `/health` answers).
    pub fn proven_admin(base: &str, token: Option<String>, user_agent: &str) -> Self {
        match token {
            Some(t) => Self::proven(base, &t, user_agent, crate::proof::ADMIN),
            None => Self::with_agent(base, None, user_agent),
        }
    }

    fn of(base: &str, token: Option<String>, http: reqwest::Client) -> Self {
        HubClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            gate: Default::default(),
        }
    }

    /// From now on (for this client and every clone), nothing is sent while `tunnel`'s state is
    /// not `up`: the hub's URL is then the local end of a forward that nobody serves and anyone
    /// may bind. Such a call fails at once with [`ClientError::TunnelDown`], which callers retry
    /// like an unreachable hub. A second call is ignored (one tunnel per node).
    pub fn gate_on(&self, tunnel: tokio::sync::watch::Receiver<TunnelState>) {
        let _ = self.gate.set(tunnel);
    }

    /// `Err` when the gate says the tunnel is not up.
    fn gate_open(&self, url: &str) -> Result<(), ClientError> {
        let Some(rx) = self.gate.get() else {
            return Ok(());
        };
        let s = rx.borrow();
        if s.state == TunnelStateKind::Up {
            return Ok(());
        }
        Err(ClientError::TunnelDown {
            url: url.to_string(),
            state: format!("{:?}", s.state).to_lowercase(),
            last_error: s.last_error.clone().unwrap_or_else(|| "none".into()),
        })
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

    /// One request; the answer's body on success, the hub's refusal as a [`ClientError`].
    async fn call(
        &self,
        method: &'static str,
        path: &str,
        what: impl FnOnce() -> String,
        body: Option<Vec<u8>>,
    ) -> Result<(String, bytes::Bytes), ClientError> {
        self.call_within(method, path, what, body, REQUEST_TIMEOUT)
            .await
    }

    /// [`HubClient::call`] with its own time limit (a file listing may wait for an appliance).
    async fn call_within(
        &self,
        method: &'static str,
        path: &str,
        what: impl FnOnce() -> String,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(String, bytes::Bytes), ClientError> {
        let url = self.url(path);
        self.gate_open(&url)?;
        let mut req = match method {
            "POST" => self.http.request(Method::POST, &url),
            "PUT" => self.http.request(Method::PUT, &url),
            "DELETE" => self.http.request(Method::DELETE, &url),
            _ => self.http.request(Method::GET, &url),
        };
        req = self.authed(req).timeout(timeout);
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
            return Ok((url, bytes));
        }
        Err(refusal(method, url, status, &bytes, what))
    }
}

/// The hub's refusal (`status`, its JSON error body) as a [`ClientError`].
fn refusal(
    method: &'static str,
    url: String,
    status: StatusCode,
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> ClientError {
    {
        if status == StatusCode::UNAUTHORIZED {
            return ClientError::Unauthorized { url };
        }
        let (error, detail) = match serde_json::from_slice::<ErrorBody>(bytes) {
            // `error` is shown as text whatever its type (a short cause, or an error code).
            Ok(b) => (b.error.to_string(), b.detail),
            Err(_) => (
                status.canonical_reason().unwrap_or("error").to_string(),
                String::from_utf8_lossy(bytes)
                    .trim()
                    .chars()
                    .take(300)
                    .collect(),
            ),
        };
        if status == StatusCode::NOT_FOUND {
            return ClientError::NotFound {
                what: what(),
                error,
                detail,
            };
        }
        ClientError::Api {
            method,
            url,
            status: status.as_u16(),
            error,
            detail,
        }
    }
}

impl HubClient {
    async fn send<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        what: impl FnOnce() -> String,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (url, bytes) = self.call(method, path, what, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { url, source })
    }

    /// A report to the hub (node side). The answer's body is not read: a report the hub took
    /// is done, and a hub whose answer has more or other fields must not make the node send
    /// it again.
    async fn report<B: Serialize>(
        &self,
        path: &str,
        what: impl FnOnce() -> String,
        body: &B,
    ) -> Result<(), ClientError> {
        self.call("POST", path, what, Some(json_body(body)))
            .await
            .map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, || path.to_string(), None).await
    }

    // ----- console side: reading -----

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

    /// `GET /api/v1/restores`.
    pub async fn restores(&self) -> Result<Vec<Restore>, ClientError> {
        self.get("/api/v1/restores").await
    }

    pub async fn restore(&self, id: &str) -> Result<Restore, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/restores/{id}"),
            || format!("restore {id}"),
            None,
        )
        .await
    }

    pub async fn restore_events(&self, id: &str) -> Result<Vec<JobEvent>, ClientError> {
        self.send(
            "GET",
            &format!("/api/v1/restores/{id}/events"),
            || format!("restore {id}"),
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

    // ----- console side: acting -----

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

    /// `POST /api/v1/restores`: the hub answers 202 with the new restore.
    pub async fn start_restore(&self, req: &RestoreRequest) -> Result<Restore, ClientError> {
        self.send(
            "POST",
            "/api/v1/restores",
            || {
                format!(
                    "restore of backup {} to node {:?}",
                    req.backup_id, req.target.node
                )
            },
            Some(json_body(req)),
        )
        .await
    }

    /// `POST /api/v1/restores/{id}/cancel`: the restore, `cancelling` then `cancelled`.
    pub async fn cancel_restore(&self, id: &str) -> Result<Restore, ClientError> {
        self.send(
            "POST",
            &format!("/api/v1/restores/{id}/cancel"),
            || format!("restore {id}"),
            None,
        )
        .await
    }

    /// Open `GET /api/v1/events`; the caller reads the body as a stream.
    pub async fn events(&self) -> Result<reqwest::Response, ClientError> {
        let url = self.url("/api/v1/events");
        self.gate_open(&url)?;
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

    // ----- node side: reports -----

    /// `POST /api/v1/nodes`: the node announces itself.
    pub async fn register_node(&self, reg: &NodeRegistration) -> Result<(), ClientError> {
        self.report("/api/v1/nodes", || format!("node {:?}", reg.name), reg)
            .await
    }

    /// `POST /api/v1/vms`: one VM of the node's inventory.
    pub async fn push_vm(&self, vm: &VmRequest) -> Result<(), ClientError> {
        self.report("/api/v1/vms", || format!("VM {:?}", vm.vm_name), vm)
            .await
    }

    /// `POST /api/v1/backups/{id}/progress`.
    pub async fn backup_progress(
        &self,
        id: &BackupId,
        report: &ProgressReport,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/backups/{id}/progress"),
            || format!("backup {id}"),
            report,
        )
        .await
    }

    /// `POST /api/v1/backups/{id}/complete`.
    pub async fn backup_complete(
        &self,
        id: &BackupId,
        report: &CompletionReport,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/backups/{id}/complete"),
            || format!("backup {id}"),
            report,
        )
        .await
    }

    /// `POST /api/v1/restores/{id}/progress`.
    pub async fn restore_progress(
        &self,
        id: &str,
        report: &RestoreProgress,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/restores/{id}/progress"),
            || format!("restore {id}"),
            report,
        )
        .await
    }

    /// `POST /api/v1/restores/{id}/complete`.
    pub async fn restore_complete(
        &self,
        id: &str,
        report: &RestoreCompletion,
    ) -> Result<(), ClientError> {
        self.report(
            &format!("/api/v1/restores/{id}/complete"),
            || format!("restore {id}"),
            report,
        )
        .await
    }
}

/// Our request types are plain structs of strings, numbers and enums: serialising them cannot
/// fail.
fn json_body<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests;
