//! Nodes: registration, the SSH tunnel's state (node and hub `/api/v1/tunnel`), and a node's
//! VM inventory.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::VmDisk;

/// `POST /api/v1/nodes` (node registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub name: String,
    pub api_url: String,
    pub version: String,
}

/// A node as the hub knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub api_url: String,
    pub version: String,
    pub last_seen_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
}

/// State of an SSH tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStateKind {
    Down,
    Connecting,
    Up,
}

/// `GET /api/v1/tunnel` of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    pub state: TunnelStateKind,
    pub since: DateTime<Utc>,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Forwards as ssh spells them, e.g. `"L 127.0.0.2:10100 -> 127.0.0.1:10100"`.
    pub forwards: Vec<String>,
}

/// One entry of the hub's `GET /api/v1/tunnel` (the wire shape the hub serves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: Vec<InventoryVm>,
}
