//! All state of the TUI, and the only place it changes: [`App::apply`] folds in what the hub
//! said, [`App::on_key`] folds in what the operator pressed and returns the [`Action`] (start,
//! cancel, quit) for the terminal loop to carry out. No I/O here, and the clock is passed in,
//! so every transition is tested without a terminal or a hub.
//!
//! - [`state`]: what each view remembers (selection, filter, the open job detail), one struct
//!   per view, and the throughput history of disks.
//! - `feed`: folding hub updates (snapshots, stream events) into the state.
//! - `queries`: the derived lists the UI draws (filtered rows, port cells, rates).
//! - `actions`: keys: commands of the key tables applied to the state, and the [`Action`]s
//!   they return.

mod actions;
mod feed;
mod queries;
pub mod state;

pub use crate::view::View;
pub use state::{DiskHistory, JobRef, JobRow, ListState, ViewStates};

use crate::keys::Keymap;
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    Backup, BackupRequest, BackupType, Health, HubEvent, JobEvent, JobStatus, Node, NodeTunnel,
    PortsView, ProcessInfo, Repository, Restore, TunnelState, VerifyJob, Vm,
};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::{BTreeMap, HashMap};

/// The NBD range the hub uses unless its `/api/v1/ports` says otherwise.
pub const DEFAULT_PORT_RANGE: [u16; 2] = [10100, 10200];

/// Everything the feed fetched in one round. `None` means that part could not be fetched this
/// time (the previous value stays); `errors` says why.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub health: Option<Health>,
    pub backups: Option<Vec<Backup>>,
    pub restores: Option<Vec<Restore>>,
    pub verifies: Option<Vec<VerifyJob>>,
    pub vms: Option<Vec<Vm>>,
    pub repositories: Option<Vec<Repository>>,
    pub ports: Option<PortsView>,
    pub processes: Option<Vec<ProcessInfo>>,
    pub nodes: Option<Vec<Node>>,
    pub tunnels: Option<Vec<NodeTunnel>>,
    pub events: Option<Vec<JobEvent>>,
    pub errors: Vec<String>,
}

/// What the feed and the action tasks tell the app.
// A few updates a second travel through a channel: the size of an event (a `Restore` is the
// largest) costs nothing worth a box around every one, in the feed and in every test.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Update {
    /// A poll succeeded (the hub's `/health` answered).
    Snapshot(Box<Snapshot>),
    /// One message of the event stream.
    Event(HubEvent),
    StreamUp,
    StreamDown {
        error: String,
    },
    /// `/health` did not answer.
    Unreachable {
        error: String,
    },
    /// A start or cancel came back.
    ActionDone {
        message: String,
    },
    ActionFailed {
        message: String,
    },
}

/// What the terminal loop must do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Quit,
    Start(BackupRequest),
    Cancel(BackupId),
    /// Cancel the restore with this id.
    CancelRestore(String),
}

/// Whether the hub answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Connecting,
    Reachable,
    Unreachable {
        retries: u32,
        last_error: String,
        since: DateTime<Utc>,
    },
}

/// Whether the event stream is open (otherwise the feed polls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    Up,
    Down { error: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeLevel {
    Info,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub level: NoticeLevel,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// The start dialog's choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartForm {
    pub vm_name: String,
    pub backup_type: BackupType,
    pub repository: usize,
    /// The VM has a completed backup to build an incremental on.
    pub has_previous: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Filter,
    Help,
    ConfirmCancel {
        backup_id: BackupId,
        vm_name: String,
        status: JobStatus,
    },
    ConfirmCancelRestore {
        restore_id: String,
        vm_name: String,
        status: JobStatus,
    },
    Start(StartForm),
    ConfirmStart(StartForm),
}

impl Mode {
    fn keymap(&self) -> Keymap {
        match self {
            Mode::Normal => Keymap::Main,
            Mode::Filter => Keymap::Filter,
            Mode::Help => Keymap::Help,
            Mode::ConfirmCancel { .. }
            | Mode::ConfirmCancelRestore { .. }
            | Mode::ConfirmStart(_) => Keymap::Confirm,
            Mode::Start(_) => Keymap::Start,
        }
    }
}

/// A port of the range, as the Ports grid shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortCell {
    Free,
    Held,
    /// Held by a job whose qemu-nbd on that port is dead.
    Stale,
    Squatted,
}

/// One row of the Tunnel view.
#[derive(Debug, Clone)]
pub struct TunnelRow<'a> {
    pub node: &'a str,
    pub info: Option<&'a Node>,
    pub tunnel: Option<&'a TunnelState>,
    /// The hub could not ask the node just now; `tunnel` is then the last state recorded.
    pub probe_error: Option<&'a str>,
}

/// All state of the console.
#[derive(Debug, Clone)]
pub struct App {
    pub hub_url: String,
    /// Wall clock at the last tick (drawn in the header; passed in for tests).
    pub now: DateTime<Utc>,
    pub health: Option<Health>,
    pub reach: Reach,
    pub stream: Stream,
    pub last_contact: Option<DateTime<Utc>>,
    pub snapshot_errors: Vec<String>,
    /// Newest first.
    pub backups: Vec<Backup>,
    /// Newest first.
    pub restores: Vec<Restore>,
    /// Verify jobs seen on the event stream, newest first.
    pub verifies: Vec<VerifyJob>,
    pub vms: Vec<Vm>,
    pub repositories: Vec<Repository>,
    pub ports: Option<PortsView>,
    pub processes: Vec<ProcessInfo>,
    pub nodes: Vec<Node>,
    /// Latest tunnel state per node (from `/api/v1/tunnel` and the event stream); a node not
    /// in it shows the state of its `nodes` record.
    pub tunnels: BTreeMap<String, TunnelState>,
    /// Why the hub could not ask a node for its tunnel just now (from `/api/v1/tunnel`).
    pub tunnel_errors: BTreeMap<String, String>,
    /// Oldest first, by `seq`.
    pub events: Vec<JobEvent>,
    pub history: HashMap<(BackupId, DiskKey), DiskHistory>,
    /// Bytes-done samples of each restore (one disk each), by restore id.
    pub restore_history: HashMap<String, DiskHistory>,
    pub view: View,
    pub mode: Mode,
    /// What each view remembers.
    pub views: ViewStates,
    pub notice: Option<Notice>,
}

impl App {
    pub fn new(hub_url: &str, now: DateTime<Utc>) -> Self {
        App {
            hub_url: hub_url.to_string(),
            now,
            health: None,
            reach: Reach::Connecting,
            stream: Stream::Down { error: None },
            last_contact: None,
            snapshot_errors: Vec::new(),
            backups: Vec::new(),
            restores: Vec::new(),
            verifies: Vec::new(),
            vms: Vec::new(),
            repositories: Vec::new(),
            ports: None,
            processes: Vec::new(),
            nodes: Vec::new(),
            tunnels: BTreeMap::new(),
            tunnel_errors: BTreeMap::new(),
            events: Vec::new(),
            history: HashMap::new(),
            restore_history: HashMap::new(),
            view: View::Jobs,
            mode: Mode::Normal,
            views: ViewStates::default(),
            notice: None,
        }
    }

    /// The job whose detail is open (Jobs view).
    pub fn detail(&self) -> Option<&JobRef> {
        self.views.jobs.detail.as_ref()
    }
}

#[cfg(test)]
mod tests;
