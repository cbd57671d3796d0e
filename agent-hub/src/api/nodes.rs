//! Nodes: `GET/POST /api/v1/nodes`, `GET /api/v1/nodes/{name}`, inventory import
//! (`POST /api/v1/nodes/{name}/discover` pulls the node's `/api/v1/inventory`;
//! `PUT /api/v1/nodes/{name}/inventory` lets a node push it), and `GET /api/v1/tunnel`.
//! The logic lives in [`crate::nodes`].

use super::scope::own_node;
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::hub::AppState;
use crate::nodes::NodeError;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{Inventory, Node, NodeRegistration, NodeTunnel, Vm};
use sendense_shared::names::validate_name;

/// `GET /api/v1/proof?nonce=&node=` (open): the hub proves, as `hub`, that it holds `node`'s
/// credential(s), so the node sends its credential only to the real hub and not to whoever
/// holds the node's local forward while the tunnel is down. `404` for a node without a valid
/// credential (the answer says nothing a node list would not).
pub async fn proof(
    State(hub): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<sendense_shared::proof::ProofQuery>,
) -> Result<Json<sendense_shared::proof::ProofAnswer>, ApiError> {
    if let Err(e) = sendense_shared::http::proof::check_query(&q) {
        return Err(ApiError::invalid(e.detail));
    }
    let Some(node) = q.node else {
        return Err(ApiError::invalid(
            "node: the node whose credential is to be proven",
        ));
    };
    validate_name("node", &node)?;
    let secrets = hub.auth.credentials.valid_secrets(&node).await?;
    if secrets.is_empty() {
        return Err(ApiError::NotFound(format!(
            "node {node:?} holds no valid credential"
        )));
    }
    let proofs = secrets
        .iter()
        .map(|c| {
            sendense_shared::proof::prove(c, sendense_shared::proof::Role::Hub, &node, &q.nonce)
        })
        .collect();
    Ok(Json(sendense_shared::proof::ProofAnswer { proofs }))
}

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Node>>, ApiError> {
    Ok(Json(hub.nodes.list().await?))
}

pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Node>, ApiError> {
    validate_name("name", &name)?;
    own_node(&who, Some(&name), "reading a node")?;
    Ok(Json(hub.nodes.find(&name).await?))
}

/// A node announces itself; the hub then pulls its inventory in the background.
pub async fn register(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(reg): ApiJson<NodeRegistration>,
) -> Result<(StatusCode, Json<Node>), ApiError> {
    validate_name("name", &reg.name)?;
    own_node(&who, Some(&reg.name), "the registration")?;
    Ok((StatusCode::CREATED, Json(hub.nodes.register(&reg).await?)))
}

/// Pulls the node's inventory now and answers the VMs imported.
pub async fn discover(
    State(hub): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    Ok(Json(hub.nodes.pull_inventory(&name).await?))
}

/// The node pushes its inventory.
pub async fn push_inventory(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(inv): ApiJson<Inventory>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    own_node(&who, Some(&name), "the inventory")?;
    Ok(Json(hub.nodes.push_inventory(&name, inv).await?))
}

/// `GET /api/v1/tunnel`: every node's tunnel, asked now.
pub async fn tunnel(State(hub): State<AppState>) -> Result<Json<Vec<NodeTunnel>>, ApiError> {
    Ok(Json(hub.nodes.probe_tunnels().await?))
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            NodeError::Invalid { detail } => ApiError::Invalid { detail },
            NodeError::Call(c) => ApiError::Node(sendense_shared::errors::chain(&c)),
            NodeError::Db(d) => d.into(),
        }
    }
}
