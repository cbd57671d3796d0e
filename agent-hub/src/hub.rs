//! The hub's state: the services a handler reaches, built by the wiring in `server.rs` from
//! explicit dependencies. This module sits low: it names the services, none of them names it.

use crate::auth::{Authenticator, Token};
use crate::config::HubConfig;
use crate::db::Db;
use crate::events::EventBus;
use crate::jobs::JobManager;
use crate::nodes::Nodes;
use crate::ports::PortAllocator;
use crate::restores::Restores;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a handler needs; shared behind an `Arc`.
pub struct Hub {
    pub config: HubConfig,
    pub db: Db,
    pub ports: Arc<PortAllocator>,
    /// Backup jobs.
    pub jobs: JobManager,
    /// Restore jobs.
    pub restores: Restores,
    /// Instant recoveries.
    pub recoveries: crate::recoveries::Recoveries,
    /// Verify jobs.
    pub verify: crate::verify::Verifier,
    /// Backup policies and their scheduler.
    pub policies: crate::policies::Policies,
    /// Prune and synthetic-full jobs, protected points, space.
    pub prune: crate::prune::Pruner,
    /// File browsing of backup points (libguestfs appliances, one per session).
    pub files: crate::files::FileBrowser,
    /// Registration, inventory, tunnel probes.
    pub nodes: Nodes,
    pub bus: EventBus,
    /// Read-only reads of image chains (verify jobs use it too).
    pub readback: crate::readback::ReadBack,
    /// Webhook receivers ([`crate::webhooks`]).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Prometheus metrics (`GET /api/v1/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The admin token (the hub's token file).
    pub token: Token,
    /// Who a request is: the admin token or a node's credential.
    pub auth: Authenticator,
    pub started_at: DateTime<Utc>,
    /// Fired once on SIGTERM/SIGINT (or by a test): long-lived responses (SSE) end on it.
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

pub type AppState = Arc<Hub>;
