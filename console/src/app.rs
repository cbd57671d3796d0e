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
//! - [`files`]: the file browser of a backup point (disks, filesystems, directories listed
//!   by the hub off the UI thread; `g` gets a file or directory as tar).
//! - [`policies`]: the Policies view: which VMs a policy covers, its runs and points, its keys
//!   (run now, enable/disable, protect, prune preview), and what to re-read when the hub says
//!   a run or a prune changed.

mod actions;
mod feed;
pub mod files;
pub mod policies;
mod queries;
pub mod state;

pub use crate::view::View;
pub use files::{FileBrowser, FileTarget};
pub use policies::PolicyDetail;
pub use state::{DiskHistory, JobRef, JobRow, ListState, PoliciesState, ViewStates};

use crate::keys::Keymap;
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    Backup, BackupRequest, BackupType, Health, HubEvent, JobEvent, JobStatus, Node, NodeTunnel,
    Policy, PolicyRequest, PolicyRun, PortsView, ProcessInfo, PruneJob, PrunePlan, PrunePoint,
    Recovery, Repository, RepositorySpace, Restore, TunnelState, VerifyJob, Vm,
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
    pub policies: Option<Vec<Policy>>,
    pub prunes: Option<Vec<PruneJob>>,
    /// Instant recoveries (`None` too from a hub that has none to serve).
    pub recoveries: Option<Vec<Recovery>>,
    /// Space of every repository that answered.
    pub spaces: Option<Vec<RepositorySpace>>,
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
    /// A recovery changed (the stream's `recovery` events, and the answer to a cancel).
    Recovery(Box<Recovery>),
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
    /// The runs and points of the open policy, re-read.
    PolicyDetail(Box<PolicyDetail>),
    /// The hub's dry run of a prune: opens the preview dialog.
    PrunePreview(Box<PrunePlan>),
    /// The answer to [`Action::ListFiles`] number `seq`: the listing, or why it failed.
    FileListing {
        seq: u64,
        result: Result<Box<sendense_shared::api::FileListing>, String>,
    },
    /// Bytes of tar written so far by the [`Action::GetFiles`] under way.
    FilesProgress {
        bytes: u64,
    },
    /// The [`Action::GetFiles`] ended: what to say, and whether it worked.
    FilesDone {
        message: String,
        ok: bool,
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
    /// Cancel the instant recovery with this id (its VM is stopped, the guest's writes lost).
    CancelRecovery(String),
    /// `run-now` of the policy with this id (named for the notices).
    RunPolicy {
        id: String,
        name: String,
    },
    /// `PUT` the policy back with `request` (enabled flipped).
    UpdatePolicy {
        id: String,
        request: Box<PolicyRequest>,
    },
    /// Protect (`true`) or unprotect a backup point.
    Protect {
        backup_id: BackupId,
        protect: bool,
    },
    /// Ask the hub for a dry run of a prune of this VM.
    PreviewPrune(String),
    /// Start the prune of this VM.
    Prune(String),
    /// Re-read the runs of this policy and the points of these VMs.
    LoadPolicy {
        id: String,
        vms: Vec<String>,
    },
    /// List a disk's filesystems or a directory of a point ([`Update::FileListing`] answers).
    ListFiles {
        seq: u64,
        backup_id: BackupId,
        target: FileTarget,
    },
    /// Write `target` of a point as tar to the file `dest` (relative to the console's working
    /// directory); `what` names it in the notices.
    GetFiles {
        backup_id: BackupId,
        target: FileTarget,
        what: String,
        dest: String,
    },
}

/// A tar being written by [`Action::GetFiles`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub dest: String,
    /// The path inside the point, for the screen.
    pub what: String,
    pub bytes: u64,
    /// A file's size (a directory's tar has no size known ahead).
    pub size: Option<u64>,
    pub started: DateTime<Utc>,
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
    ConfirmCancelRecovery {
        recovery_id: String,
        vm_name: String,
        node: String,
        status: JobStatus,
    },
    Start(StartForm),
    ConfirmStart(StartForm),
    /// A policy action waiting for y/n: the question and what `y` does.
    ConfirmPolicy {
        question: String,
        action: Action,
    },
    /// The prune preview dialog: the hub's dry run; `y` starts the real prune.
    PrunePreview(Box<PrunePlan>),
    /// The file browser ([`App::browser`]) has the keys.
    Files,
    /// Its "write the tar to" prompt, with what was typed.
    FilesPrompt {
        input: String,
    },
}

impl Mode {
    fn keymap(&self) -> Keymap {
        match self {
            Mode::Normal => Keymap::Main,
            Mode::Filter => Keymap::Filter,
            Mode::Help => Keymap::Help,
            Mode::ConfirmCancel { .. }
            | Mode::ConfirmCancelRestore { .. }
            | Mode::ConfirmCancelRecovery { .. }
            | Mode::ConfirmStart(_)
            | Mode::ConfirmPolicy { .. }
            | Mode::PrunePreview(_) => Keymap::Confirm,
            Mode::Start(_) => Keymap::Start,
            Mode::Files => Keymap::Files,
            Mode::FilesPrompt { .. } => Keymap::Prompt,
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
    /// Instant recoveries, newest first.
    pub recoveries: Vec<Recovery>,
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
    /// Sorted by name.
    pub policies: Vec<Policy>,
    /// Recent runs per policy id, newest planned first (read for the open policy, and from
    /// the event stream).
    pub policy_runs: HashMap<String, Vec<PolicyRun>>,
    /// Points per VM, newest first, as `GET /api/v1/vms/{name}/points` answered.
    pub points: BTreeMap<String, Vec<PrunePoint>>,
    /// Prune jobs, newest first.
    pub prunes: Vec<PruneJob>,
    /// Space of each repository, by id.
    pub spaces: BTreeMap<String, RepositorySpace>,
    pub history: HashMap<(BackupId, DiskKey), DiskHistory>,
    /// Bytes-done samples of each restore (one disk each), by restore id.
    pub restore_history: HashMap<String, DiskHistory>,
    pub view: View,
    pub mode: Mode,
    /// What each view remembers.
    pub views: ViewStates,
    pub notice: Option<Notice>,
    /// The open file browser.
    pub browser: Option<FileBrowser>,
    /// The tar being written, if one is.
    pub download: Option<Download>,
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
            recoveries: Vec::new(),
            verifies: Vec::new(),
            vms: Vec::new(),
            repositories: Vec::new(),
            ports: None,
            processes: Vec::new(),
            nodes: Vec::new(),
            tunnels: BTreeMap::new(),
            tunnel_errors: BTreeMap::new(),
            events: Vec::new(),
            policies: Vec::new(),
            policy_runs: HashMap::new(),
            points: BTreeMap::new(),
            prunes: Vec::new(),
            spaces: BTreeMap::new(),
            history: HashMap::new(),
            restore_history: HashMap::new(),
            view: View::Jobs,
            mode: Mode::Normal,
            views: ViewStates::default(),
            notice: None,
            browser: None,
            download: None,
        }
    }

    /// The job whose detail is open (Jobs view).
    pub fn detail(&self) -> Option<&JobRef> {
        self.views.jobs.detail.as_ref()
    }
}

#[cfg(test)]
mod tests;
