//! Nodes: registration, the SSH tunnel's state (node and hub `/api/v1/tunnel`), and a node's
//! VM inventory.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::VmDisk;

/// `POST /api/v1/nodes` (node registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRegistration {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub name: String,
    /// Where the hub reaches the node's API: `http://` or `https://`.
    #[schema(pattern = r"^https?://[^\s]+$")]
    pub api_url: String,
    pub version: String,
}

/// A node as the hub knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    pub name: String,
    pub api_url: String,
    pub version: String,
    pub last_seen_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
}

/// State of an SSH tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStateKind {
    Down,
    Connecting,
    Up,
}

impl TunnelStateKind {
    /// As the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelStateKind::Down => "down",
            TunnelStateKind::Connecting => "connecting",
            TunnelStateKind::Up => "up",
        }
    }
}

/// `GET /api/v1/tunnel` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TunnelState {
    pub state: TunnelStateKind,
    pub since: DateTime<Utc>,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Forwards as ssh spells them, e.g. `"L 127.0.0.2:10100 -> 127.0.0.1:10100"`.
    pub forwards: Vec<String>,
    /// The node's tunnel: each of its ssh processes (`state` is `up` when all are, `down` when
    /// one is; `restarts` their sum; `last_error` the newest, naming its link). Empty from an
    /// older node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<TunnelLink>,
}

/// One ssh process ("link") of a node's tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TunnelLink {
    /// 0, 1, ...: link 0 also carries the hub's API forward and the reverse forward.
    pub link: u16,
    pub state: TunnelStateKind,
    pub since: DateTime<Utc>,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Its ssh's PID while one runs.
    pub pid: Option<u32>,
    /// The NBD slots (ports of the range) it forwards.
    pub slots: Vec<u16>,
    /// Whether it carries the API forwards.
    pub api: bool,
}

/// One entry of the hub's `GET /api/v1/tunnel` (the wire shape the hub serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeTunnel {
    /// Name of the node (as in [`Node::name`]).
    pub node: String,
    /// The node answered just now (`true`), or `tunnel` is the last state recorded (`false`).
    #[serde(default)]
    pub live: bool,
    /// `null` when the node never reported one.
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
    /// Why the node could not be asked.
    #[serde(default)]
    pub error: Option<String>,
}

/// One VM of the node's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InventoryVm {
    pub vm_name: String,
    pub vm_id: String,
    pub disks: Vec<VmDisk>,
    /// Source driver that serves the VM: `"qemu"` or `"vsphere"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Whether the hypervisor tracks changed blocks for the VM (vSphere CBT); `None` where the
    /// driver always can (QEMU's dirty bitmaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<bool>,
}

/// `GET /api/v1/inventory` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Inventory {
    pub vms: Vec<InventoryVm>,
}
