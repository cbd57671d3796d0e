//! [`NodeClient`]: every call the hub makes to a node, typed. URL building, the node's credential,
//! timeouts, how much of a refusal's body is kept and the wording of failures live here once;
//! callers match on [`NodeCallError`] (and on the node's [`ErrorCode`]) as values.

use sendense_shared::api::{
    Inventory, NodeBackupStart, NodeBackupState, NodeRecoveryStart, NodeRecoveryState,
    NodeRestoreStart, NodeRestoreState, TunnelState,
};
use sendense_shared::errors::ErrorCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest part of a refusal's body kept in a message (a node answers short JSON; anything
/// longer is a proxy's error page).
const BODY_KEPT: usize = 500;

/// The error body of the API, read with the code typed (an unknown code is
/// [`ErrorCode::Other`]).
#[derive(serde::Deserialize)]
struct WireError {
    error: ErrorCode,
    detail: String,
}

/// Why a call to a node did not give the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum NodeCallError {
    /// No HTTP answer: connection refused, timeout, reset.
    #[error("node {node} unreachable: {method} {url}")]
    Unreachable {
        node: String,
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The node answered with an error status.
    #[error(
        "node {node} answered {method} {url} with HTTP {status}{}: {detail}",
        code.map(|c| format!(" {c}")).unwrap_or_default()
    )]
    Refused {
        node: String,
        method: &'static str,
        url: String,
        status: u16,
        /// The node's error code, when its body was the API's error shape.
        code: Option<ErrorCode>,
        detail: String,
    },
    /// The node's credential could not be read from the database, so no call was made.
    #[error("node {node}: cannot read its credential")]
    Credential {
        node: String,
        #[source]
        source: crate::db::DbError,
    },
    /// A success status with a body that is not what the contract says.
    #[error("node {node}: {method} {url} answered something that is not {what}")]
    Decode {
        node: String,
        method: &'static str,
        url: String,
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
}

impl NodeCallError {
    /// The endpoint did not prove it is the node: nothing was sent to it.
    pub fn proof_failure(&self) -> Option<&sendense_shared::client::proof::ProofError> {
        match self {
            NodeCallError::Unreachable { source, .. } => {
                sendense_shared::client::proof::proof_failure(source)
            }
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            NodeCallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The node's error code of a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            NodeCallError::Refused { code, .. } => *code,
            _ => None,
        }
    }

    /// The node does not know the job (`404`): it restarted, or never had it.
    pub fn is_unknown_job(&self) -> bool {
        self.status() == Some(404)
    }
}

/// Where a node is: its name and API URL (the reverse tunnel's forward when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub name: String,
    pub api_url: String,
}

impl From<&sendense_shared::api::Node> for NodeAddr {
    fn from(n: &sendense_shared::api::Node) -> Self {
        NodeAddr {
            name: n.name.clone(),
            api_url: n.api_url.clone(),
        }
    }
}

/// The hub's client for its nodes; cheap to clone.
///
/// A call that carries a node's credential goes through that node's own reqwest client,
/// whose every new connection must first prove it reaches the node holding one of the node's
/// valid credentials (`sendense_shared::client::proof`, role `node`): the hub's end of the
/// reverse forward is a port anyone on the hub may bind while the node's ssh is down. A call
/// without a credential (a node never enrolled) uses the shared client, whose connections
/// never carry one.
#[derive(Clone)]
pub struct NodeClient {
    http: reqwest::Client,
    /// Proven clients, per node name and API URL (a new URL gets a new pool).
    proven: Arc<Mutex<HashMap<(String, String), reqwest::Client>>>,
    /// The node's own credential is presented to it (never the hub's admin token).
    credentials: crate::auth::Credentials,
    /// Default timeout of a call (`node_timeout` of the config).
    timeout: Duration,
}

/// Timeouts of the calls that must answer fast whatever the configured default.
pub mod timeouts {
    use std::time::Duration;
    /// A tunnel probe must not hold the console's refresh for long.
    pub const TUNNEL_PROBE: Duration = Duration::from_secs(3);
    /// A cancel is best effort: the hub unwinds its side anyway.
    pub const CANCEL: Duration = Duration::from_secs(5);
    /// The proof challenge of a new connection: one small answer; a squatter that accepts and
    /// says nothing is given up on after this.
    pub const PROOF: Duration = Duration::from_secs(3);
}

impl NodeClient {
    pub fn new(credentials: crate::auth::Credentials, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("reqwest client without TLS or proxies builds");
        NodeClient {
            http,
            proven: Arc::default(),
            credentials,
            timeout,
        }
    }

    /// The proven client of `node` (built once per node and URL).
    fn proven_client(&self, node: &NodeAddr) -> reqwest::Client {
        let key = (node.name.clone(), node.api_url.clone());
        let mut map = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return c.clone();
        }
        use sendense_shared::client::proof::{ProofLayer, endpoint_of};
        let creds = self.credentials.clone();
        let name = node.name.clone();
        // Asked at every new connection: a rotation or revocation holds from the next one.
        let keys: sendense_shared::client::proof::Keys = Arc::new(move || {
            let creds = creds.clone();
            let name = name.clone();
            Box::pin(async move {
                creds
                    .valid_secrets(&name)
                    .await
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
        });
        let layer = ProofLayer::new(
            sendense_shared::proof::Role::Node,
            &node.name,
            &endpoint_of(&node.api_url),
            keys,
            timeouts::PROOF,
        );
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .no_proxy()
            .connector_layer(layer)
            .build()
            .expect("reqwest client without TLS or proxies builds");
        map.insert(key, client.clone());
        client
    }

    fn url(node: &NodeAddr, path: &str) -> String {
        format!("{}/api/v1/{path}", node.api_url.trim_end_matches('/'))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        node: &NodeAddr,
        method: &'static str,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
        what: &'static str,
    ) -> Result<T, NodeCallError> {
        let url = Self::url(node, path);
        // Asked every call: a rotation switches what the node expects once it used the new
        // credential. A node without one gets no Authorization at all (and answers 401).
        let credential = self
            .credentials
            .for_node(&node.name)
            .await
            .map_err(|source| NodeCallError::Credential {
                node: node.name.clone(),
                source,
            })?;
        let http = match &credential {
            Some(_) => self.proven_client(node),
            None => self.http.clone(),
        };
        let mut req = match method {
            "GET" => http.get(&url),
            _ => http.post(&url),
        }
        .timeout(timeout.unwrap_or(self.timeout));
        if let Some(c) = &credential {
            req = req.bearer_auth(c.as_str());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| NodeCallError::Unreachable {
                node: node.name.clone(),
                method,
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let (code, detail) = match serde_json::from_str::<WireError>(&text) {
                Ok(b) => (Some(b.error), b.detail),
                Err(_) => (None, text.chars().take(BODY_KEPT).collect()),
            };
            return Err(NodeCallError::Refused {
                node: node.name.clone(),
                method,
                url,
                status: status.as_u16(),
                code,
                detail,
            });
        }
        resp.json::<T>()
            .await
            .map_err(|source| NodeCallError::Decode {
                node: node.name.clone(),
                method,
                url,
                what,
                source,
            })
    }

    /// The URL a call goes to, for events that say what was asked.
    pub fn url_of(node: &NodeAddr, path: &str) -> String {
        Self::url(node, path)
    }

    /// `POST /api/v1/backup/start`.
    pub async fn start_backup(
        &self,
        node: &NodeAddr,
        body: &NodeBackupStart,
    ) -> Result<(), NodeCallError> {
        self.call::<_, serde_json::Value>(node, "POST", "backup/start", Some(body), None, "JSON")
            .await
            .map(drop)
    }

    /// `POST /api/v1/backup/check`: would the node take this incremental? Side-effect free on
    /// the node (no snapshot, no export); `Ok` when it would, a `409 bitmap_missing` refusal
    /// when its change tracking does not start at the hub's chain.
    pub async fn check_backup(
        &self,
        node: &NodeAddr,
        body: &NodeBackupStart,
    ) -> Result<(), NodeCallError> {
        self.call::<_, serde_json::Value>(node, "POST", "backup/check", Some(body), None, "JSON")
            .await
            .map(drop)
    }

    /// `POST /api/v1/backup/{id}/cancel`.
    pub async fn cancel_backup(&self, node: &NodeAddr, id: &str) -> Result<(), NodeCallError> {
        self.call::<(), serde_json::Value>(
            node,
            "POST",
            &format!("backup/{id}/cancel"),
            None,
            Some(timeouts::CANCEL),
            "JSON",
        )
        .await
        .map(drop)
    }

    /// `GET /api/v1/backup/{id}`.
    pub async fn backup_state(
        &self,
        node: &NodeAddr,
        id: &str,
        timeout: Duration,
    ) -> Result<NodeBackupState, NodeCallError> {
        self.call::<(), _>(
            node,
            "GET",
            &format!("backup/{id}"),
            None,
            Some(timeout),
            "a backup state",
        )
        .await
    }

    /// `POST /api/v1/restore/start`.
    pub async fn start_restore(
        &self,
        node: &NodeAddr,
        body: &NodeRestoreStart,
    ) -> Result<(), NodeCallError> {
        self.call::<_, serde_json::Value>(node, "POST", "restore/start", Some(body), None, "JSON")
            .await
            .map(drop)
    }

    /// `POST /api/v1/restore/{id}/cancel`.
    pub async fn cancel_restore(&self, node: &NodeAddr, id: &str) -> Result<(), NodeCallError> {
        self.call::<(), serde_json::Value>(
            node,
            "POST",
            &format!("restore/{id}/cancel"),
            None,
            Some(timeouts::CANCEL),
            "JSON",
        )
        .await
        .map(drop)
    }

    /// `GET /api/v1/restore/{id}`.
    pub async fn restore_state(
        &self,
        node: &NodeAddr,
        id: &str,
        timeout: Duration,
    ) -> Result<NodeRestoreState, NodeCallError> {
        self.call::<(), _>(
            node,
            "GET",
            &format!("restore/{id}"),
            None,
            Some(timeout),
            "a restore state",
        )
        .await
    }

    /// `POST /api/v1/recovery/start`: the node starts the VM on overlays of the exports and
    /// answers its first state (`202`).
    pub async fn start_recovery(
        &self,
        node: &NodeAddr,
        body: &NodeRecoveryStart,
    ) -> Result<NodeRecoveryState, NodeCallError> {
        self.call(
            node,
            "POST",
            "recovery/start",
            Some(body),
            None,
            "a recovery state",
        )
        .await
    }

    /// `POST /api/v1/recovery/{id}/cancel`: the node stops the VM and removes its overlays,
    /// then reports the end.
    pub async fn cancel_recovery(&self, node: &NodeAddr, id: &str) -> Result<(), NodeCallError> {
        self.call::<(), serde_json::Value>(
            node,
            "POST",
            &format!("recovery/{id}/cancel"),
            None,
            Some(timeouts::CANCEL),
            "JSON",
        )
        .await
        .map(drop)
    }

    /// `POST /api/v1/recovery/{id}/speed`: a new bound of the recovery's streams.
    pub async fn recovery_speed(
        &self,
        node: &NodeAddr,
        id: &str,
        speed: &sendense_shared::api::RecoverySpeed,
    ) -> Result<(), NodeCallError> {
        self.call::<_, serde_json::Value>(
            node,
            "POST",
            &format!("recovery/{id}/speed"),
            Some(speed),
            Some(timeouts::CANCEL),
            "JSON",
        )
        .await
        .map(drop)
    }

    /// `GET /api/v1/recovery/{id}`.
    pub async fn recovery_state(
        &self,
        node: &NodeAddr,
        id: &str,
        timeout: Duration,
    ) -> Result<NodeRecoveryState, NodeCallError> {
        self.call::<(), _>(
            node,
            "GET",
            &format!("recovery/{id}"),
            None,
            Some(timeout),
            "a recovery state",
        )
        .await
    }

    /// `GET /api/v1/inventory`.
    pub async fn inventory(&self, node: &NodeAddr) -> Result<Inventory, NodeCallError> {
        self.call::<(), _>(node, "GET", "inventory", None, None, "an inventory")
            .await
    }

    /// `GET /api/v1/tunnel`.
    pub async fn tunnel(&self, node: &NodeAddr) -> Result<TunnelState, NodeCallError> {
        self.call::<(), _>(
            node,
            "GET",
            "tunnel",
            None,
            Some(timeouts::TUNNEL_PROBE),
            "a tunnel state",
        )
        .await
    }
}
