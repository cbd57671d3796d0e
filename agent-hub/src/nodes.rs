//! The nodes service: registration, inventory import (pulled from the node or pushed by it) and
//! tunnel probes. The HTTP handlers in `api::nodes` only translate; the hub's prober calls
//! [`Nodes::probe_tunnels`] on a timer.

use crate::db::{Db, DbError, VmSource};
use crate::events::EventBus;
use crate::node_client::{NodeAddr, NodeCallError, NodeClient};
use sendense_shared::api::{
    HubEvent, Inventory, Node, NodeRegistration, NodeTunnel, Vm, VmRequest,
};
use sendense_shared::backoff::Backoff;
use sendense_shared::errors::chain;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

/// Why a node operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no node named {name:?} is registered")]
    NotFound { name: String },
    #[error("{detail}")]
    Invalid { detail: String },
    #[error(transparent)]
    Call(#[from] NodeCallError),
    #[error("database")]
    Db(#[from] DbError),
}

/// The nodes service; cheap to clone.
#[derive(Clone)]
pub struct Nodes {
    db: Db,
    bus: EventBus,
    client: NodeClient,
    tasks: TaskTracker,
    /// Nodes whose last probe failed: how often in a row, when the timer may ask again, and
    /// why it failed (shown meanwhile).
    failing: Arc<Mutex<HashMap<String, Failing>>>,
}

#[derive(Debug, Clone)]
struct Failing {
    failures: u32,
    next: Instant,
    error: String,
}

/// Pacing of the timer's probes of a node that did not answer: 5 s doubling to 20 s. A node
/// whose tunnel is down is asked three times a minute instead of twelve (each attempt would go
/// to a port nobody serves, proven or not), and a tunnel that came back is seen within 20 s
/// (at once when the node registers again or someone asks `GET /api/v1/tunnel`).
pub const PROBE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(20));

impl Nodes {
    pub fn new(db: Db, bus: EventBus, client: NodeClient, tasks: TaskTracker) -> Self {
        Nodes {
            db,
            bus,
            client,
            tasks,
            failing: Arc::default(),
        }
    }

    pub async fn list(&self) -> Result<Vec<Node>, NodeError> {
        Ok(self.db.list_nodes().await?)
    }

    /// One node, or [`NodeError::NotFound`].
    pub async fn find(&self, name: &str) -> Result<Node, NodeError> {
        match self.db.get_node(name).await {
            Ok(n) => Ok(n),
            Err(DbError::NotFound { .. }) => Err(NodeError::NotFound {
                name: name.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// A node announces itself; its inventory is then pulled in the background (the node's API
    /// may only become reachable once its tunnel is up, so a failure is logged, not answered).
    pub async fn register(&self, reg: &NodeRegistration) -> Result<Node, NodeError> {
        sendense_shared::names::validate_name("name", &reg.name).map_err(|e| {
            NodeError::Invalid {
                detail: e.to_string(),
            }
        })?;
        if !(reg.api_url.starts_with("http://") || reg.api_url.starts_with("https://")) {
            return Err(NodeError::Invalid {
                detail: format!(
                    "api_url: {:?} must start with http:// or https://",
                    reg.api_url
                ),
            });
        }
        self.db.upsert_node(reg).await?;
        // It reached the hub, so its tunnel (if any) is up: probe it again at once.
        self.lock_failing().remove(&reg.name);
        tracing::info!(node = %reg.name, api_url = %reg.api_url, version = %reg.version, "node registered");
        let node = self.find(&reg.name).await?;
        let me = self.clone();
        let name = reg.name.clone();
        self.tasks.spawn(async move {
            match me.pull_inventory(&name).await {
                Ok(vms) => tracing::info!(node = %name, vms = vms.len(), "inventory imported"),
                Err(e) => {
                    tracing::warn!(node = %name, error = %chain(&e), "inventory import failed")
                }
            }
        });
        Ok(node)
    }

    /// Pulls the node's inventory now and answers the VMs imported.
    pub async fn pull_inventory(&self, name: &str) -> Result<Vec<Vm>, NodeError> {
        let node = self.find(name).await?;
        let inv = self.client.inventory(&NodeAddr::from(&node)).await?;
        self.import(name, inv).await
    }

    /// The node pushes its inventory.
    pub async fn push_inventory(&self, name: &str, inv: Inventory) -> Result<Vec<Vm>, NodeError> {
        self.find(name).await?;
        self.import(name, inv).await
    }

    /// Upserts every VM of the inventory as belonging to `node`; a VM that fails validation, or
    /// whose name another node's VM holds, is skipped and logged (one odd VM must not block the
    /// others).
    async fn import(&self, node: &str, inv: Inventory) -> Result<Vec<Vm>, NodeError> {
        let mut out = Vec::new();
        for v in inv.vms {
            let req = VmRequest {
                vm_name: v.vm_name,
                node: Some(node.to_string()),
                disks: v.disks,
            };
            if let Err(e) = crate::vms::validate_vm(&req) {
                tracing::warn!(%node, vm = %req.vm_name, error = %e, "inventory VM skipped");
                continue;
            }
            // A driver name the hub cannot show is recorded as unknown: it must not keep the VM out.
            let driver = match crate::vms::validate_driver(v.driver.as_deref()) {
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
            match self.db.upsert_inventory_vm(&req, &source).await {
                Ok(vm) => out.push(vm),
                // Another node's VM holds the name (this node's is then `<name>.<node>`) and
                // another node's that one too: never a takeover; left out of the import, and said so.
                Err(e @ DbError::Owned { .. }) => {
                    tracing::warn!(%node, vm = %req.vm_name, error = %e, "inventory VM not imported");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn lock_failing(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failing>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every node for its tunnel state (through its API URL, i.e. the reverse forward when
    /// there is a tunnel); records and publishes changes, so the event stream carries tunnel
    /// changes even when nobody polls.
    pub async fn probe_tunnels(&self) -> Result<Vec<NodeTunnel>, NodeError> {
        self.probe(false).await
    }

    /// [`probe_tunnels`](Self::probe_tunnels) for the timer: a node that did not answer is
    /// asked again only after [`PROBE_BACKOFF`]; meanwhile its last failure is answered.
    pub async fn probe_tunnels_paced(&self) -> Result<Vec<NodeTunnel>, NodeError> {
        self.probe(true).await
    }

    async fn probe(&self, paced: bool) -> Result<Vec<NodeTunnel>, NodeError> {
        let nodes = self.db.list_nodes().await?;
        let mut out = Vec::new();
        for n in nodes {
            let waiting = self
                .lock_failing()
                .get(&n.name)
                .filter(|f| paced && Instant::now() < f.next)
                .cloned();
            if let Some(f) = waiting {
                out.push(NodeTunnel {
                    node: n.name,
                    live: false,
                    tunnel: n.tunnel,
                    error: Some(f.error),
                });
                continue;
            }
            let addr = NodeAddr::from(&n);
            match self.client.tunnel(&addr).await {
                Ok(mut t) => {
                    self.lock_failing().remove(&n.name);
                    name_remote_squatter(&mut t);
                    if n.tunnel.as_ref() != Some(&t) {
                        self.db.set_node_tunnel(&n.name, &t).await?;
                        self.bus.publish(HubEvent::Tunnel {
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
                Err(e) => {
                    let mut error = chain(&e);
                    if e.proof_failure().is_some() {
                        if let Some(h) = local_holder(&addr.api_url) {
                            error.push_str(&format!("; {h}"));
                        }
                        tracing::warn!(node = %n.name, %error, "tunnel probe: the node's URL did not prove it is the node; nothing was sent");
                    }
                    let mut failing = self.lock_failing();
                    let failures = failing.get(&n.name).map_or(0, |f| f.failures);
                    failing.insert(
                        n.name.clone(),
                        Failing {
                            failures: failures.saturating_add(1),
                            next: Instant::now() + PROBE_BACKOFF.delay(failures),
                            error: error.clone(),
                        },
                    );
                    out.push(NodeTunnel {
                        node: n.name,
                        live: false,
                        tunnel: n.tunnel,
                        error: Some(error),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The process listening on the loopback port of `api_url` on this host (the hub's end of a
/// node's reverse forward), when the URL is a loopback one.
fn local_holder(api_url: &str) -> Option<sendense_shared::portholder::Holder> {
    let endpoint = sendense_shared::client::proof::endpoint_of(api_url);
    let addr: std::net::SocketAddr = endpoint.parse().ok()?;
    if !addr.ip().is_loopback() {
        return None;
    }
    sendense_shared::portholder::holder_at(Some(addr.ip()), addr.port())
}

/// When the node says the hub's sshd refused its reverse forward, names who holds that port
/// on the hub (a squatter keeps the tunnel down for as long as it holds it).
fn name_remote_squatter(t: &mut sendense_shared::api::TunnelState) {
    const REFUSED: &str = "remote port forwarding failed for listen port ";
    if t.state == sendense_shared::api::TunnelStateKind::Up {
        return;
    }
    let Some(err) = t.last_error.as_mut() else {
        return;
    };
    let Some(port) = err
        .split_once(REFUSED)
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return;
    };
    if let Some(h) = sendense_shared::portholder::holder_of(port) {
        err.push_str(&format!("; on the hub: {h}"));
    }
}
