//! Nodes: `GET/POST /api/v1/nodes`, `GET /api/v1/nodes/{name}`, inventory import
//! (`POST /api/v1/nodes/{name}/discover` pulls the node's `/api/v1/inventory`;
//! `PUT /api/v1/nodes/{name}/inventory` lets a node push it), and `GET /api/v1/tunnel`.

use super::vms::{validate_driver, validate_vm};
use super::{ApiError, ApiJson};
use crate::db::VmSource;
use crate::server::{AppState, Hub};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{
    HubEvent, Inventory, Node, NodeRegistration, NodeTunnel, TunnelState, Vm, VmRequest,
};
use sendense_shared::names::validate_name;
use std::time::Duration;

/// A tunnel probe must not hold the console's refresh for long.
const TUNNEL_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Node>>, ApiError> {
    Ok(Json(hub.db.list_nodes().await?))
}

pub async fn get_one(
    State(hub): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Node>, ApiError> {
    validate_name("name", &name)?;
    find_node(&hub, &name).await.map(Json)
}

/// A node announces itself; the hub then pulls its inventory in the background (the node's API
/// may only become reachable once its tunnel is up, so a failure here is logged, not answered).
pub async fn register(
    State(hub): State<AppState>,
    ApiJson(reg): ApiJson<NodeRegistration>,
) -> Result<(StatusCode, Json<Node>), ApiError> {
    validate_name("name", &reg.name)?;
    if !(reg.api_url.starts_with("http://") || reg.api_url.starts_with("https://")) {
        return Err(ApiError::invalid(format!(
            "api_url: {:?} must start with http:// or https://",
            reg.api_url
        )));
    }
    hub.db.upsert_node(&reg).await?;
    tracing::info!(node = %reg.name, api_url = %reg.api_url, version = %reg.version, "node registered");
    let node = find_node(&hub, &reg.name).await?;
    let h = hub.clone();
    let name = reg.name.clone();
    hub.tasks.spawn(async move {
        match pull_inventory(&h, &name).await {
            Ok(vms) => tracing::info!(node = %name, vms = vms.len(), "inventory imported"),
            Err(e) => tracing::warn!(node = %name, error = %e, "inventory import failed"),
        }
    });
    Ok((StatusCode::CREATED, Json(node)))
}

/// Pulls the node's inventory now and answers the VMs imported.
pub async fn discover(
    State(hub): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    pull_inventory(&hub, &name).await.map(Json)
}

/// The node pushes its inventory.
pub async fn push_inventory(
    State(hub): State<AppState>,
    Path(name): Path<String>,
    ApiJson(inv): ApiJson<Inventory>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    validate_name("name", &name)?;
    find_node(&hub, &name).await?;
    import(&hub, &name, inv).await.map(Json)
}

async fn pull_inventory(hub: &Hub, name: &str) -> Result<Vec<Vm>, ApiError> {
    let node = find_node(hub, name).await?;
    let url = format!("{}/api/v1/inventory", node.api_url.trim_end_matches('/'));
    let resp = hub
        .http
        .get(&url)
        .bearer_auth(hub.token.as_str())
        .send()
        .await
        .map_err(|e| ApiError::Node(format!("GET {url}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(ApiError::Node(format!(
            "GET {url}: HTTP {status}: {}",
            body.chars().take(500).collect::<String>()
        )));
    }
    let inv: Inventory = resp
        .json()
        .await
        .map_err(|e| ApiError::Node(format!("GET {url}: not an inventory: {e}")))?;
    import(hub, name, inv).await
}

/// Upserts every VM of the inventory as belonging to `node`; a VM that fails validation is
/// skipped and logged (one odd VM must not block the others).
async fn import(hub: &Hub, node: &str, inv: Inventory) -> Result<Vec<Vm>, ApiError> {
    let mut out = Vec::new();
    for v in inv.vms {
        let req = VmRequest {
            vm_name: v.vm_name,
            node: Some(node.to_string()),
            disks: v.disks,
        };
        if let Err(e) = validate_vm(&req) {
            tracing::warn!(%node, vm = %req.vm_name, error = %e, "inventory VM skipped");
            continue;
        }
        // A driver name the hub cannot show is recorded as unknown: it must not keep the VM out.
        let driver = match validate_driver(v.driver.as_deref()) {
            Ok(()) => v.driver,
            Err(e) => {
                tracing::warn!(%node, vm = %req.vm_name, error = %e, "inventory driver ignored");
                None
            }
        };
        let source = VmSource {
            driver,
            change_tracking: v.change_tracking,
        };
        out.push(hub.db.upsert_inventory_vm(&req, &source).await?);
    }
    Ok(out)
}

pub async fn find_node(hub: &Hub, name: &str) -> Result<Node, ApiError> {
    match hub.db.get_node(name).await {
        Ok(n) => Ok(n),
        Err(crate::db::DbError::NotFound { .. }) => Err(ApiError::NotFound(format!(
            "no node named {name:?} is registered"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// `GET /api/v1/tunnel`: every node's tunnel, asked now.
pub async fn tunnel(State(hub): State<AppState>) -> Result<Json<Vec<NodeTunnel>>, ApiError> {
    Ok(Json(probe_tunnels(&hub).await?))
}

/// Asks every node for its tunnel state (through its API URL, i.e. the reverse forward when
/// there is a tunnel); records and publishes changes. Called by the handler above and every
/// few seconds by [`crate::server::serve`]'s prober, so the event stream carries tunnel changes
/// even when nobody polls.
pub async fn probe_tunnels(hub: &Hub) -> Result<Vec<NodeTunnel>, ApiError> {
    let nodes = hub.db.list_nodes().await?;
    let mut out = Vec::new();
    for n in nodes {
        let url = format!("{}/api/v1/tunnel", n.api_url.trim_end_matches('/'));
        let asked = async {
            let r = hub
                .http
                .get(&url)
                .bearer_auth(hub.token.as_str())
                .timeout(TUNNEL_PROBE_TIMEOUT)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", r.status()));
            }
            r.json::<TunnelState>()
                .await
                .map_err(|e| format!("GET {url}: {e}"))
        }
        .await;
        match asked {
            Ok(t) => {
                if n.tunnel.as_ref() != Some(&t) {
                    hub.db.set_node_tunnel(&n.name, &t).await?;
                    hub.bus.publish(HubEvent::Tunnel {
                        node: n.name.clone(),
                        tunnel: t.clone(),
                    });
                }
                out.push(NodeTunnel {
                    node: n.name,
                    live: true,
                    tunnel: Some(t),
                    error: None,
                });
            }
            Err(e) => out.push(NodeTunnel {
                node: n.name,
                live: false,
                tunnel: n.tunnel,
                error: Some(e),
            }),
        }
    }
    Ok(out)
}
