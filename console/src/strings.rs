//! Every text the console shows, in one place (titles, labels, help, notices, symbols).
//! Symbols always come with a word or a column name, so nothing is said by colour alone.

pub const APP_NAME: &str = "sendense";

// Views (tab titles).
pub const VIEW_JOBS: &str = "Jobs";
pub const VIEW_VMS: &str = "VMs";
pub const VIEW_PORTS: &str = "Ports";
pub const VIEW_TUNNEL: &str = "Tunnel";
pub const VIEW_PROCESSES: &str = "Processes";
pub const VIEW_EVENTS: &str = "Events";
pub const VIEW_POLICIES: &str = "Policies";

// Header.
pub const HUB: &str = "hub";
pub const COMMIT: &str = "commit";
pub const PID: &str = "pid";
pub const EXE: &str = "exe";
pub const DB: &str = "db";
pub const DB_OK: &str = "ok";
pub const DB_FAILING: &str = "FAILING";
pub const LIVE: &str = "live";
pub const POLLING: &str = "polling every 2s";
pub const CONNECTING: &str = "connecting to";
pub const UNREACHABLE: &str = "HUB UNREACHABLE";
pub const RETRY: &str = "retry";
pub const DOWN_SINCE: &str = "since";
pub const LAST_CONTACT: &str = "last contact";
pub const NEVER: &str = "never";
pub const LAST_ERROR: &str = "last error";
pub const DATA_STALE: &str = "the data below is from then";
pub const UTC: &str = "UTC";

// Symbols (always paired with a word).
pub const SYM_OK: &str = "✔";
pub const SYM_BAD: &str = "✖";
pub const SYM_WARN: &str = "▲";
pub const SYM_BUSY: &str = "◐";
pub const SYM_IDLE: &str = "○";
pub const SYM_PORT_FREE: &str = "·";
pub const SYM_PORT_HELD: &str = "■";
pub const SYM_PORT_SQUATTED: &str = "✖";
pub const SYM_PORT_STALE: &str = "!";
pub const SYM_SELECTED: &str = "▶ ";

// Jobs.
pub const COL_ID: &str = "ID";
pub const COL_VM: &str = "VM";
pub const COL_TYPE: &str = "Type";
pub const COL_STATUS: &str = "Status";
pub const COL_PROGRESS: &str = "Done";
pub const COL_BYTES: &str = "Bytes";
pub const COL_RATE: &str = "Rate";
pub const COL_STARTED: &str = "Created";
pub const COL_ERROR: &str = "Error";
pub const NO_JOBS: &str = "No backup jobs yet. Start one from the VMs view (2, then s).";
pub const JOB: &str = "Job";
/// The kind of a restore job, in the Type column and the detail title.
pub const RESTORE: &str = "restore";
pub const REPOSITORY: &str = "repo";
pub const CREATED: &str = "created";
pub const STARTED: &str = "started";
pub const FINISHED: &str = "finished";
pub const TARGETS: &str = "targets";
pub const DISK: &str = "disk";
pub const PORT: &str = "port";
pub const EXPORT: &str = "export";
pub const QEMU_NBD: &str = "qemu-nbd";
pub const ETA: &str = "ETA";
pub const RATE: &str = "rate";
pub const QCOW2: &str = "qcow2";
pub const THROUGHPUT: &str = "throughput";
pub const ERROR: &str = "error";
pub const NONE: &str = "—";
pub const MORE_DISKS_BELOW: &str = "more disks: j/k to scroll";
pub const WRITTEN: &str = "written";
pub const CHANGE_ID: &str = "change id";
/// Restore detail: the backup point read, and where it is written.
pub const SOURCE: &str = "source";
pub const TARGET: &str = "target";

// File browser.
pub const FILES_TITLE: &str = "Files of";
pub const FILES_DISKS: &str = "the point's disks";
pub const FILES_FILESYSTEMS: &str = "filesystems";
pub const FILES_STARTING: &str = "starting the file browser appliance… (first listing: 15-30 s)";
pub const FILES_LISTING: &str = "listing";
pub const FILES_NOT_A_DIRECTORY: &str = "not a directory: g gets it as tar";
pub const FILES_AT_TOP: &str = "at the top: Esc closes the browser";
pub const FILES_GET_WHAT: &str = "choose a disk first: g gets a filesystem, a file or a directory";
pub const FILES_NO_PATH: &str = "no file given: nothing written";
pub const FILES_ONE_AT_A_TIME: &str = "a tar is being written already: one at a time";
pub const FILES_PROMPT: &str = "write as tar to (relative to the console's directory):";
pub const FILES_TRUNCATED: &str = "more entries than one listing answers: not all are shown";
pub const FILES_EMPTY: &str = "empty";
pub const FILES_NO_FILESYSTEM: &str = "no filesystem found on this disk";
pub const FILES_WRITING: &str = "writing";
pub const COL_MODE: &str = "Mode";
pub const COL_NAME_FILE: &str = "Name";
pub const HINT_MOVE: &str = "j/k:move";
pub const COL_OWNER: &str = "Owner";
pub const COL_MODIFIED: &str = "Modified";
pub const COL_DEVICE: &str = "Device";
pub const COL_FS_TYPE: &str = "Type";
pub const ENTRIES: &str = "entries";

// Instant recoveries.
/// The kind of an instant recovery, in the Type column and the detail title.
pub const RECOVERY: &str = "recover";
/// A recovery whose VM or stream waits on an export that does not answer.
pub const STALLED: &str = "STALLED";
/// QEMU's word for a stream that is done (the disk is home).
pub const STREAM_FINISHED: &str = "finished";
pub const STREAM_RUNNING: &str = "running";
pub const STREAM_PENDING: &str = "pending";
pub const STREAM_PAUSED: &str = "paused";
pub const POINT: &str = "point";
pub const OF: &str = "of";
pub const NODE: &str = "node";
pub const VM: &str = "VM";
pub const QEMU: &str = "QEMU";
pub const VM_UP_IN: &str = "VM up in";
pub const HOME: &str = "home";
pub const OVERLAY: &str = "overlay";
pub const SERIAL: &str = "serial";
pub const QMP: &str = "qmp";
pub const RECOVERY_HOME: &str =
    "every disk is home: the VM runs from local disks alone (it outlives the job)";
pub const RECOVERY_CANCELLED: &str =
    "the VM was stopped and its overlays removed: what the guest wrote is lost";

// Integrity and consistency of a backup point.
pub const COL_INTEGRITY: &str = "Integrity";
pub const COL_CONSISTENCY: &str = "Consistency";
pub const INTEGRITY: &str = "integrity";
pub const CONSISTENCY: &str = "consistency";
pub const BOOT: &str = "boot";
pub const BOOT_OK: &str = "boot ok";
pub const BOOT_FAILED: &str = "BOOT FAILED";
pub const BOOTING: &str = "booting";
pub const BOOT_INTERRUPTED: &str = "interrupted";
pub const VERIFIED: &str = "verified";
pub const HUB_COMPUTED: &str = "hub-computed";
pub const LEGACY: &str = "legacy";
pub const CORRUPT: &str = "CORRUPT";
pub const UNVERIFIED: &str = "unverified";
pub const APPLICATION: &str = "application";
pub const CRASH: &str = "crash";
pub const FREEZE: &str = "freeze";
/// Label of a point's recorded VM hardware in the job detail.
pub const HARDWARE: &str = "hardware";
pub const VERIFIED_AT: &str = "verified at";
/// What a corrupt last point means for the VM (the hub makes the next backup a full).
pub const NEXT_FULL: &str = "next backup: full";
pub const LAST_POINT: &str = "last point";
pub const LAST_POINT_COL: &str = "Last point";
/// Why an integrity says what it says, when the hub gave no detail.
pub const HUB_COMPUTED_WHY: &str =
    "checksums computed by the hub from the stored image (the writer sent none)";
pub const LEGACY_WHY: &str = "completed before whole-disk checksums: only written ranges checked";

// Verify jobs.
pub const VERIFY: &str = "verify";
pub const VERIFY_JOBS: &str = "Verify jobs";
pub const POINTS: &str = "points";
pub const READ: &str = "read";
pub const FOUND_CORRUPT: &str = "found corrupt";
pub const NONE_CORRUPT: &str = "none corrupt";

// VMs.
pub const COL_NODE: &str = "Node";
pub const COL_DISKS: &str = "Disks";
pub const COL_SIZE: &str = "Size";
pub const COL_LAST_BACKUP: &str = "Last backup";
pub const COL_KEY: &str = "Key";
pub const COL_UNIT: &str = "Unit";
pub const COL_LABEL: &str = "Label";
pub const NO_NODE: &str = "(none)";
pub const NO_VMS: &str =
    "No VMs known to the hub. Register one (POST /api/v1/vms) or connect a node.";
pub const DISKS_OF: &str = "Disks of";
pub const COL_SOURCE: &str = "Source";
pub const CBT_ON: &str = "CBT on";
pub const CBT_OFF: &str = "CBT off";
pub const COL_CONTROLLER: &str = "Controller";
pub const COL_PROVISIONING: &str = "Alloc";
pub const THIN: &str = "thin";
pub const THICK: &str = "thick";
pub const COL_BACKING_FILE: &str = "Backing file";
pub const BACKUP: &str = "backup";

// Start dialog.
pub const START_TITLE: &str = "Start backup";
pub const START_TYPE: &str = "Type";
pub const START_REPOSITORY: &str = "Repository";
pub const START_FULL: &str = "full";
pub const START_INCREMENTAL: &str = "incremental";
pub const START_NO_PREVIOUS: &str = "no previous backup: the hub will refuse an incremental";
pub const START_HINT: &str = "f full · i incremental · j/k repository · Enter next · Esc close";
pub const FREE: &str = "free";

// Confirmations.
pub const CONFIRM_TITLE: &str = "Confirm";
pub const CONFIRM_HINT: &str = "y yes · n / Esc no";

// Ports.
pub const PORTS_RANGE: &str = "NBD ports";
pub const PORTS_LEGEND_FREE: &str = "free";
pub const PORTS_LEGEND_HELD: &str = "held by a job";
pub const PORTS_LEGEND_SQUATTED: &str = "squatted (not ours)";
pub const PORTS_LEGEND_STALE: &str = "held, qemu-nbd dead";
pub const COL_PORT: &str = "Port";
pub const COL_STATE: &str = "State";
pub const COL_HOLDER: &str = "Held by";
pub const COL_SINCE: &str = "Since";
pub const PORT_HELD: &str = "held";
pub const PORT_SQUATTED: &str = "squatted";
pub const PORT_STALE: &str = "stale";
pub const NO_PORTS_USED: &str = "Every port of the range is free.";
pub const PORTS_SUMMARY_FREE: &str = "free";
pub const PORTS_SUMMARY_HELD: &str = "held";
pub const PORTS_SUMMARY_SQUATTED: &str = "squatted";
pub const NOT_OURS: &str = "not ours";

// Tunnel.
pub const COL_RESTARTS: &str = "Restarts";
pub const COL_LAST_ERROR: &str = "Last error";
pub const COL_SEEN: &str = "Seen";
pub const TUNNEL_UP: &str = "up";
pub const TUNNEL_CONNECTING: &str = "connecting";
pub const TUNNEL_DOWN: &str = "down";
pub const TUNNEL_UNKNOWN: &str = "unknown";
pub const TUNNEL_DIRECT: &str = "direct";
pub const NO_TUNNEL: &str = "no tunnel configured: the node and the hub call each other directly";
pub const FORWARDS_OF: &str = "Forwards of";
pub const NO_FORWARDS: &str = "no forwards";
pub const PROBE_FAILED: &str = "the hub cannot ask this node now (last recorded state shown)";
pub const NO_NODES: &str = "No nodes registered with the hub.";
pub const API_URL: &str = "api";
pub const VERSION: &str = "version";

// Processes.
pub const COL_PID: &str = "PID";
pub const COL_EXPORT: &str = "Export";
pub const COL_QCOW2: &str = "QCOW2";
pub const COL_ALIVE: &str = "Alive";
pub const COL_UPTIME: &str = "Up";
pub const COL_JOB: &str = "Job";
pub const COL_DISK: &str = "Disk";
pub const ALIVE: &str = "alive";
pub const DEAD: &str = "DEAD";
/// A qemu-nbd process whose job has ended: stopped by the hub as planned.
pub const EXITED: &str = "exited";
pub const NO_PROCESSES: &str = "No qemu-nbd process is running for the hub.";

// Events.
pub const COL_TIME: &str = "Time";
pub const COL_LEVEL: &str = "Lvl";
pub const COL_STEP: &str = "Step";
pub const COL_MESSAGE: &str = "Message";
pub const NO_EVENTS: &str = "No job events yet.";
pub const FILTER: &str = "filter";
pub const FILTER_EDITING: &str = "filter (Enter keep, Esc clear)";
pub const NOTHING_MATCHES: &str = "Nothing matches the filter";

// Policies.
pub const COL_NAME: &str = "Policy";
pub const COL_SCHEDULE: &str = "Schedule";
pub const COL_VMS: &str = "VMs";
pub const COL_NEXT: &str = "Next run";
pub const COL_LAST_RUN: &str = "Last run";
pub const COL_QUEUED: &str = "Q";
pub const COL_QUEUED_WIDE: &str = "Queued";
pub const COL_PRIORITY: &str = "Prio";
pub const COL_REPOSITORY: &str = "Repo";
pub const COL_PLANNED: &str = "Planned";
pub const COL_KIND: &str = "Kind";
pub const COL_REASON: &str = "Reason";
pub const COL_CREATED: &str = "Created";
pub const COL_PROTECTED: &str = "Prot";
pub const COL_KEPT_BY: &str = "Kept by";
pub const COL_PRUNE: &str = "At prune";
pub const COL_FREES: &str = "Frees";
pub const NO_POLICIES: &str =
    "No backup policies. Create one: sendense-console policy create NAME --vm VM --schedule CRON";
pub const POLICY: &str = "Policy";
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";
pub const SCHEDULE: &str = "schedule";
pub const NEXT: &str = "next";
pub const LAST: &str = "last";
pub const QUEUED: &str = "queued";
pub const PRIORITY: &str = "priority";
pub const QUEUE_WINDOW: &str = "queue window";
pub const RULE: &str = "backup";
pub const RULE_INCREMENTAL: &str = "incremental";
pub const FULL_EVERY: &str = "full every";
pub const DAYS: &str = "days";
pub const RUNS: &str = "runs";
pub const FULL_ON: &str = "full on";
pub const CHAIN: &str = "chain";
pub const CHAIN_FULL: &str = "full";
pub const CHAIN_SYNTHETIC: &str = "synthetic full";
pub const KEEP: &str = "keep";
pub const KEEP_NOTHING_PRUNED: &str = "no rule: nothing is pruned";
pub const VMS_LABEL: &str = "vms";
pub const NODE_PREFIX: &str = "node:";
pub const RUNS_TITLE: &str = "Recent runs";
pub const NO_RUNS: &str = "No runs yet.";
pub const POINTS_OF: &str = "Points of";
pub const NO_POINTS: &str = "No points of this VM.";
pub const NO_POLICY_VMS: &str = "The policy covers no VM the hub knows.";
pub const KIND_SCHEDULED: &str = "sched";
pub const KIND_LATE: &str = "late";
pub const KIND_MANUAL: &str = "manual";
pub const PROTECTED: &str = "protected";
pub const YES: &str = "yes";
pub const ACTION_KEEP: &str = "keep";
pub const ACTION_DELETE: &str = "delete";
pub const ACTION_MERGE: &str = "merge into child";
pub const ACTION_REBASE: &str = "rebase child";
pub const SPACE: &str = "space";
pub const FREE_OF: &str = "free of";
pub const PER_DAY: &str = "/day";
pub const NOT_GROWING: &str = "not growing";
pub const PRUNE_RUNNING: &str = "prune";
pub const PRUNE_TITLE: &str = "Prune preview";
pub const PRUNE_DRY_RUN: &str = "dry run: nothing changed yet";
pub const PRUNE_HINT: &str = "y start this prune · n / Esc close";
pub const PRUNE_NOTHING: &str = "Nothing to remove: every point is kept.";
pub const PRUNE_NOTHING_HINT: &str = "n / Esc close";
pub const PRUNE_MORE: &str = "more points: `sendense-console prune VM --dry-run` lists all";
pub const UNKNOWN_POLICY: &str = "unknown policy";

// Footer hints.
pub const HINT_COMMON: &str = "?:help Tab:view j/k:move /:filter q:quit";
pub const HINT_JOBS: &str = "Enter:detail c:cancel f:files";
pub const HINT_DETAIL: &str = "Esc:back j/k:scroll c:cancel";
pub const HINT_VMS: &str = "s:start backup";
pub const HINT_EVENTS: &str = "Enter:job";
pub const HINT_POLICIES: &str = "Enter:detail r:run e:on/off";
pub const HINT_POLICY_DETAIL: &str = "h/l:VM p:protect x:prune r:run";

// Help overlay.
pub const HELP_TITLE: &str = "Keys (any of ? Esc q closes)";
pub const HELP_SECTION_MAIN: &str = "Everywhere";
pub const HELP_SECTION_FILTER: &str = "Typing a filter";
pub const HELP_SECTION_START: &str = "Start dialog";
pub const HELP_SECTION_CONFIRM: &str = "Confirmation";
pub const HELP_SECTION_POLICIES: &str = "Policies view (7)";
pub const HELP_SECTION_HELP: &str = "This help";
pub const HELP_NEXT_VIEW: &str = "next view";
pub const HELP_PREV_VIEW: &str = "previous view";
pub const HELP_UP: &str = "move up / scroll";
pub const HELP_DOWN: &str = "move down / scroll";
pub const HELP_TOP: &str = "first row";
pub const HELP_BOTTOM: &str = "last row";
pub const HELP_ENTER: &str = "detail (Jobs/Events/Policies)";
pub const HELP_BACK: &str = "back / clear filter";
pub const HELP_START: &str = "start backup of VM (VMs)";
pub const HELP_CANCEL: &str = "cancel job (asks y/n)";
pub const HELP_BROWSE: &str = "browse the point's files";
pub const HELP_FILES_OPEN: &str = "open";
pub const HELP_FILES_UP: &str = "up";
pub const HELP_FILES_GET: &str = "get as tar";
pub const HELP_FILES_CLOSE: &str = "close";
pub const HELP_PROMPT_OK: &str = "write it";
pub const HELP_PROMPT_CANCEL: &str = "cancel";
pub const HELP_FILTER: &str = "filter this view";
pub const HELP_HELP: &str = "this help";
pub const HELP_QUIT: &str = "quit (also Ctrl-C)";
pub const HELP_FILTER_KEEP: &str = "keep filter";
pub const HELP_FILTER_CLEAR: &str = "clear filter";
pub const HELP_BACKSPACE: &str = "delete a character";
pub const HELP_FULL: &str = "full backup";
pub const HELP_INCREMENTAL: &str = "incremental backup";
pub const HELP_TOGGLE: &str = "switch type";
pub const HELP_REPO: &str = "pick repository";
pub const HELP_NEXT: &str = "go to confirmation";
pub const HELP_CLOSE: &str = "close";
pub const HELP_YES: &str = "yes, do it";
pub const HELP_NO: &str = "no, leave it";
pub const HELP_RUN_NOW: &str = "run the policy now (asks y/n)";
pub const HELP_TOGGLE_ENABLED: &str = "enable / disable it (asks y/n)";
pub const HELP_PREV_NEXT_VM: &str = "detail: previous / next VM";
pub const HELP_PROTECT: &str = "detail: (un)protect point";
pub const HELP_PRUNE: &str = "detail: prune preview, confirm";

// Notices.
pub const NOTICE_CANCEL_ABORTED: &str = "Cancel aborted: the job keeps running.";
pub const NOTICE_START_ABORTED: &str = "Start aborted.";
pub const NOTICE_START_ONLY_VMS: &str = "s starts a backup from the VMs view (press 2).";
pub const NOTICE_CANCEL_ONLY_JOBS: &str = "c cancels a job from the Jobs view (press 1).";
pub const NOTICE_BROWSE_ONLY_POINTS: &str =
    "f browses a backup point: select one in Jobs (1) or among a policy's points (7, Enter).";
pub const NOTICE_NO_REPOSITORY: &str =
    "The hub has no repository: add one (POST /api/v1/repositories) first.";
pub const NOTICE_NOTHING_SELECTED: &str = "Nothing selected.";
pub const NOTICE_ONLY_POLICIES: &str = "r, e, p, x act in the Policies view (press 7).";
pub const NOTICE_ONLY_POLICY_DETAIL: &str =
    "p and x act on a point of the open policy (Enter on a policy).";
pub const NOTICE_ACTION_ABORTED: &str = "Aborted: nothing sent.";
pub const NOTICE_PRUNE_ABORTED: &str = "Prune not started: nothing changed.";
pub const NOTICE_PRUNE_NOTHING: &str = "Nothing to prune: every point is kept.";

/// `Cancel backup b-7f3a of pgtest1 (running)? y/n`
pub fn confirm_cancel(backup_id: &str, vm_name: &str, status: &str) -> String {
    format!("Cancel backup {backup_id} of VM {vm_name} ({status})?")
}

/// `Cancel restore r-5d1e of VM pgtest1 (running)?`
pub fn confirm_cancel_restore(restore_id: &str, vm_name: &str, status: &str) -> String {
    format!("Cancel restore {restore_id} of VM {vm_name} ({status})?")
}

pub fn notice_not_browsable(id: &str, status: &str) -> String {
    format!("Backup {id} is {status}: only a completed point can be browsed.")
}

pub fn files_symlink_not_followed(name: &str, target: &str) -> String {
    format!("{name} -> {target} (a symlink: not followed)")
}

/// `listing /dev/sda1:/etc failed: …`
pub fn files_listing_failed(what: &str, cause: &str) -> String {
    format!("listing {what} failed: {cause}")
}

pub fn files_written(dest: &str, what: &str, bytes: &str) -> String {
    format!("Wrote {what} as tar to {dest} ({bytes}).")
}

pub fn confirm_cancel_recovery(id: &str, vm_name: &str, node: &str, status: &str) -> String {
    format!(
        "Cancel recovery {id} of VM {vm_name} on {node} ({status})? The VM is stopped and its overlays removed: what the guest wrote is lost."
    )
}

/// `Start a full backup of pgtest1 into repo-a?`, `Start an incremental backup of …`
pub fn confirm_start(backup_type: &str, vm_name: &str, repository: &str) -> String {
    let a = article(backup_type);
    format!("Start {a} {backup_type} backup of VM {vm_name} into repository {repository}?")
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

pub fn notice_already_terminal(backup_id: &str, status: &str) -> String {
    format!("Job {backup_id} is already {status}: nothing to cancel.")
}

pub fn notice_cancel_sent(backup_id: &str) -> String {
    format!("Cancel requested for job {backup_id}…")
}

pub fn notice_start_sent(backup_type: &str, vm_name: &str) -> String {
    let a = article(backup_type);
    format!("Starting {a} {backup_type} backup of {vm_name}…")
}

pub fn notice_started(backup_id: &str, vm_name: &str) -> String {
    format!("Backup {backup_id} of {vm_name} accepted by the hub.")
}

pub fn notice_cancelled(backup_id: &str, status: &str) -> String {
    format!("Job {backup_id} is now {status}.")
}

pub fn notice_recovery_cancelled(id: &str, vm_name: &str, status: &str) -> String {
    format!("Recovery {id} is now {status}: VM {vm_name} is stopped, the guest's writes lost.")
}

pub fn notice_action_failed(what: &str, cause: &str) -> String {
    format!("{what} failed: {cause}")
}

/// `Run policy nightly now (its 3 VMs)?`
pub fn confirm_run_now(name: &str, vms: usize) -> String {
    let s = if vms == 1 { "" } else { "s" };
    format!("Run policy {name} now (its {vms} VM{s})?")
}

/// `Disable policy nightly (no scheduled runs until enabled)?`, `Enable policy nightly?`
pub fn confirm_toggle(name: &str, enable: bool) -> String {
    if enable {
        format!("Enable policy {name} (scheduled runs start again)?")
    } else {
        format!("Disable policy {name} (no scheduled runs until enabled)?")
    }
}

pub fn notice_run_sent(name: &str) -> String {
    format!("Asking the hub to run policy {name} now…")
}

pub fn notice_run_started(name: &str, runs: usize) -> String {
    match runs {
        0 => format!("Policy {name}: run requested."),
        1 => format!("Policy {name}: 1 run queued."),
        n => format!("Policy {name}: {n} runs queued."),
    }
}

pub fn notice_policy_updated(name: &str, enabled: bool) -> String {
    let state = if enabled { ENABLED } else { DISABLED };
    format!("Policy {name} is now {state}.")
}

pub fn notice_protect_sent(backup_id: &str, protect: bool) -> String {
    let verb = if protect {
        "Protecting"
    } else {
        "Unprotecting"
    };
    format!("{verb} point {backup_id}…")
}

pub fn notice_protected(backup_id: &str, protected: bool) -> String {
    if protected {
        format!("Point {backup_id} is protected: no prune removes it.")
    } else {
        format!("Point {backup_id} is no longer protected.")
    }
}

pub fn notice_preview_sent(vm: &str) -> String {
    format!("Asking the hub what a prune of {vm} would do (dry run)…")
}

pub fn notice_prune_started(prune_id: &str, vm: &str) -> String {
    format!("Prune {prune_id} of {vm} started.")
}

/// `Keeps 9 points, removes 3, frees 4.2 GiB.`
pub fn prune_summary(kept: usize, removed: usize, freed: &str) -> String {
    format!("Keeps {kept} point(s), removes {removed}, frees {freed}.")
}

/// `full in 156 days`
pub fn full_in_days(days: f64) -> String {
    format!("full in {days:.0} days")
}
