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
#[utoipa::path(
    get,
    path = "/api/v1/proof",
    operation_id = "hub_proof",
    tag = "nodes",
    summary = "The hub proves it holds a node's credential (open)",
    params(sendense_shared::proof::HubProofQuery),
    security(),
    responses(
        (status = 200, description = "Proofs, one per valid credential", body = sendense_shared::proof::ProofAnswer)
    )
)]
pub async fn proof(
    State(hub): State<AppState>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<
        sendense_shared::proof::HubProofQuery,
    >,
) -> Result<Json<sendense_shared::proof::ProofAnswer>, ApiError> {
    if let Err(e) = sendense_shared::http::proof::check_nonce(&q.nonce) {
        return Err(ApiError::invalid(e.detail));
    }
    let node = q.node;
    // An operator's tool asks the hub to prove it holds the admin token.
    if node == sendense_shared::proof::ADMIN {
        return Ok(Json(sendense_shared::proof::ProofAnswer {
            proofs: vec![sendense_shared::proof::prove(
                &hub.token,
                sendense_shared::proof::Role::Hub,
                &node,
                &q.nonce,
            )],
        }));
    }
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

#[utoipa::path(
    get,
    path = "/nodes",
    operation_id = "list_nodes",
    tag = "nodes",
    summary = "Every registered node",
    responses(
        (status = 200, description = "The nodes", body = Vec<sendense_shared::api::Node>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Node>>, ApiError> {
    Ok(Json(hub.nodes.list().await?))
}

#[utoipa::path(
    get,
    path = "/nodes/{name}",
    operation_id = "get_node",
    tag = "nodes",
    summary = "One node",
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The node", body = sendense_shared::api::Node)
    )
)]
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
#[utoipa::path(
    post,
    path = "/nodes",
    operation_id = "register_node",
    tag = "nodes",
    summary = "A node announces itself",
    request_body = sendense_shared::api::NodeRegistration,
    responses(
        (status = 201, description = "Registered", body = sendense_shared::api::Node)
    )
)]
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
#[utoipa::path(
    post,
    path = "/nodes/{name}/discover",
    operation_id = "discover_node",
    tag = "nodes",
    summary = "Pulls the node's inventory now",
    params(("name" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "The VMs imported", body = Vec<sendense_shared::api::Vm>),
        (status = 502, description = "The node could not be reached (`node_unreachable`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn discover(
    State(hub): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    Ok(Json(hub.nodes.pull_inventory(&name).await?))
}

/// The node pushes its inventory.
#[utoipa::path(
    put,
    path = "/nodes/{name}/inventory",
    operation_id = "push_node_inventory",
    tag = "nodes",
    summary = "The node pushes its inventory",
    params(("name" = String, Path, description = "Node name")),
    request_body = sendense_shared::api::Inventory,
    responses(
        (status = 200, description = "The VMs imported", body = Vec<sendense_shared::api::Vm>)
    )
)]
pub async fn push_inventory(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(inv): ApiJson<Inventory>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    own_node(&who, Some(&name), "the inventory")?;
    // The database keeps sizes as signed 64-bit integers (the documented int64): a larger
    // one is refused naming the disk, never stored wrapped.
    for (i, vm) in inv.vms.iter().enumerate() {
        for (j, d) in vm.disks.iter().enumerate() {
            if i64::try_from(d.size_bytes).is_err() {
                return Err(ApiError::invalid(format!(
                    "vms[{i}].disks[{j}].size_bytes: {} is larger than {}",
                    d.size_bytes,
                    i64::MAX
                )));
            }
        }
    }
    Ok(Json(hub.nodes.push_inventory(&name, inv).await?))
}

/// `GET /api/v1/tunnel`: every node's tunnel, asked now.
#[utoipa::path(
    get,
    path = "/tunnel",
    operation_id = "list_tunnels",
    tag = "nodes",
    summary = "Every node's tunnel, asked now",
    responses(
        (status = 200, description = "Per node", body = Vec<sendense_shared::api::NodeTunnel>)
    )
)]
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
