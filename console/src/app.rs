//! All state of the TUI, and the only place it changes: [`App::apply`] folds in what the hub
//! said, [`App::on_key`] folds in what the operator pressed and returns the [`Action`] (start,
//! cancel, quit) for the terminal loop to carry out. No I/O here, and the clock is passed in,
//! so every transition is tested without a terminal or a hub.

use crate::keys::{self, Command, Keymap};
use crate::strings;
use chrono::{DateTime, Utc};
use crossterm::event::KeyEvent;
use sendense_shared::api::{
    Backup, BackupRequest, BackupType, DiskStatus, Health, HubEvent, JobEvent, JobStatus, Node,
    NodeTunnel, PortsView, ProcessInfo, Repository, TunnelState, Vm,
};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// The NBD range the hub uses unless its `/api/v1/ports` says otherwise.
pub const DEFAULT_PORT_RANGE: [u16; 2] = [10100, 10200];
/// Job events kept in memory (oldest dropped first).
const MAX_EVENTS: usize = 2000;
/// Throughput samples kept per disk (one per hub update, at most one per second).
const MAX_RATE_SAMPLES: usize = 120;
/// Window over which a disk's rate is averaged.
const RATE_WINDOW_SECS: i64 = 10;
/// How long an action notice stays in the footer.
const NOTICE_SECS: i64 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Jobs,
    Vms,
    Ports,
    Tunnel,
    Processes,
    Events,
}

impl View {
    pub const ALL: [View; 6] = [
        View::Jobs,
        View::Vms,
        View::Ports,
        View::Tunnel,
        View::Processes,
        View::Events,
    ];

    pub fn index(self) -> usize {
        View::ALL.iter().position(|v| *v == self).unwrap_or(0)
    }

    pub fn title(self) -> &'static str {
        match self {
            View::Jobs => strings::VIEW_JOBS,
            View::Vms => strings::VIEW_VMS,
            View::Ports => strings::VIEW_PORTS,
            View::Tunnel => strings::VIEW_TUNNEL,
            View::Processes => strings::VIEW_PROCESSES,
            View::Events => strings::VIEW_EVENTS,
        }
    }
}

/// Everything the feed fetched in one round. `None` means that part could not be fetched this
/// time (the previous value stays); `errors` says why.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub health: Option<Health>,
    pub backups: Option<Vec<Backup>>,
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
    Start(StartForm),
    ConfirmStart(StartForm),
}

impl Mode {
    fn keymap(&self) -> Keymap {
        match self {
            Mode::Normal => Keymap::Main,
            Mode::Filter => Keymap::Filter,
            Mode::Help => Keymap::Help,
            Mode::ConfirmCancel { .. } | Mode::ConfirmStart(_) => Keymap::Confirm,
            Mode::Start(_) => Keymap::Start,
        }
    }
}

/// Bytes-done samples of one disk, for its rate, ETA and sparkline.
#[derive(Debug, Clone, Default)]
pub struct DiskHistory {
    samples: VecDeque<(DateTime<Utc>, u64)>,
    /// One rate (bytes/s) per recorded sample, oldest first.
    pub rates: VecDeque<u64>,
}

impl DiskHistory {
    fn record(&mut self, now: DateTime<Utc>, bytes_done: u64) {
        if let Some(&(t, b)) = self.samples.back() {
            if bytes_done < b {
                // The copy restarted: old samples describe another run.
                self.samples.clear();
                self.rates.clear();
            } else if (now - t).num_milliseconds() < 1000 {
                return;
            }
        }
        self.samples.push_back((now, bytes_done));
        while self.samples.len() > 2 && (now - self.samples[0].0).num_seconds() > RATE_WINDOW_SECS {
            self.samples.pop_front();
        }
        if let Some(rate) = self.rate() {
            self.rates.push_back(rate);
            if self.rates.len() > MAX_RATE_SAMPLES {
                self.rates.pop_front();
            }
        }
    }

    /// Average bytes/s over the window, once there are two samples.
    pub fn rate(&self) -> Option<u64> {
        let (t0, b0) = *self.samples.front()?;
        let (t1, b1) = *self.samples.back()?;
        let ms = (t1 - t0).num_milliseconds();
        if ms <= 0 {
            return None;
        }
        Some(((b1.saturating_sub(b0)) as f64 * 1000.0 / ms as f64) as u64)
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
    pub view: View,
    pub mode: Mode,
    selected: [usize; 6],
    filters: [String; 6],
    /// The job whose detail is open (Jobs view).
    pub detail: Option<BackupId>,
    /// First disk shown in the job detail.
    pub detail_scroll: usize,
    pub notice: Option<Notice>,
}

fn matches(filter: &str, fields: &[&str]) -> bool {
    if filter.is_empty() {
        return true;
    }
    let needle = filter.to_lowercase();
    fields.iter().any(|f| f.to_lowercase().contains(&needle))
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
            vms: Vec::new(),
            repositories: Vec::new(),
            ports: None,
            processes: Vec::new(),
            nodes: Vec::new(),
            tunnels: BTreeMap::new(),
            tunnel_errors: BTreeMap::new(),
            events: Vec::new(),
            history: HashMap::new(),
            view: View::Jobs,
            mode: Mode::Normal,
            selected: [0; 6],
            filters: Default::default(),
            detail: None,
            detail_scroll: 0,
            notice: None,
        }
    }

    // ----- what the hub said -----

    /// Fold one update in; `now` is when it arrived.
    pub fn apply(&mut self, update: Update, now: DateTime<Utc>) {
        match update {
            Update::Snapshot(snap) => self.apply_snapshot(*snap, now),
            Update::Event(event) => {
                self.last_contact = Some(now);
                self.apply_event(event, now);
            }
            Update::StreamUp => self.stream = Stream::Up,
            Update::StreamDown { error } => self.stream = Stream::Down { error: Some(error) },
            Update::Unreachable { error } => {
                self.stream = Stream::Down { error: None };
                self.reach = match &self.reach {
                    Reach::Unreachable { retries, since, .. } => Reach::Unreachable {
                        retries: retries + 1,
                        last_error: error,
                        since: *since,
                    },
                    _ => Reach::Unreachable {
                        retries: 1,
                        last_error: error,
                        since: now,
                    },
                };
            }
            Update::ActionDone { message } => self.notify(NoticeLevel::Info, message, now),
            Update::ActionFailed { message } => self.notify(NoticeLevel::Error, message, now),
        }
    }

    fn apply_snapshot(&mut self, snap: Snapshot, now: DateTime<Utc>) {
        if let Some(h) = snap.health {
            self.health = Some(h);
            self.reach = Reach::Reachable;
            self.last_contact = Some(now);
        }
        if let Some(backups) = snap.backups {
            for b in &backups {
                self.record_progress(b, now);
            }
            self.backups = backups;
            self.sort_backups();
        }
        if let Some(v) = snap.vms {
            self.vms = v;
        }
        if let Some(r) = snap.repositories {
            self.repositories = r;
        }
        if let Some(p) = snap.ports {
            self.ports = Some(p);
        }
        if let Some(p) = snap.processes {
            self.processes = p;
        }
        if let Some(n) = snap.nodes {
            self.nodes = n;
        }
        if let Some(t) = snap.tunnels {
            self.tunnel_errors.clear();
            for nt in t {
                if let Some(e) = nt.error {
                    self.tunnel_errors.insert(nt.node.clone(), e);
                }
                if let Some(tunnel) = nt.tunnel {
                    self.tunnels.insert(nt.node, tunnel);
                }
            }
        }
        if let Some(events) = snap.events {
            for e in events {
                self.add_event(e);
            }
        }
        self.snapshot_errors = snap.errors;
    }

    fn apply_event(&mut self, event: HubEvent, now: DateTime<Utc>) {
        match event {
            HubEvent::Backup { backup } => {
                self.record_progress(&backup, now);
                match self
                    .backups
                    .iter_mut()
                    .find(|b| b.backup_id == backup.backup_id)
                {
                    Some(slot) => *slot = backup,
                    None => self.backups.push(backup),
                }
                self.sort_backups();
            }
            HubEvent::JobEvent { event } => self.add_event(event),
            HubEvent::Ports { ports } => self.ports = Some(ports),
            HubEvent::Processes { processes } => self.processes = processes,
            HubEvent::Tunnel { node, tunnel } => {
                // The hub publishes this right after asking the node: an earlier probe
                // error of it is over.
                self.tunnel_errors.remove(&node);
                self.tunnels.insert(node, tunnel);
            }
            // Restores are not shown yet.
            HubEvent::Restore { .. } => {}
        }
    }

    fn sort_backups(&mut self) {
        self.backups.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.backup_id.cmp(&a.backup_id))
        });
    }

    fn record_progress(&mut self, backup: &Backup, now: DateTime<Utc>) {
        for d in &backup.disk_results {
            let key = (backup.backup_id.clone(), d.disk_key);
            if matches!(d.status, DiskStatus::Running) || self.history.contains_key(&key) {
                self.history
                    .entry(key)
                    .or_default()
                    .record(now, d.bytes_done);
            }
        }
    }

    fn add_event(&mut self, event: JobEvent) {
        match self.events.binary_search_by_key(&event.seq, |e| e.seq) {
            Ok(i) => self.events[i] = event,
            Err(i) => self.events.insert(i, event),
        }
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }

    fn notify(&mut self, level: NoticeLevel, text: String, now: DateTime<Utc>) {
        self.notice = Some(Notice {
            level,
            text,
            at: now,
        });
    }

    /// The notice to show now, if it is recent enough.
    pub fn current_notice(&self) -> Option<&Notice> {
        self.notice
            .as_ref()
            .filter(|n| (self.now - n.at).num_seconds() < NOTICE_SECS)
    }

    // ----- derived views of the state (the UI draws these) -----

    pub fn filter(&self, view: View) -> &str {
        &self.filters[view.index()]
    }

    /// Selected row of `view`, kept inside the rows it has now.
    pub fn selected(&self, view: View) -> usize {
        let len = self.row_count(view);
        self.selected[view.index()].min(len.saturating_sub(1))
    }

    pub fn row_count(&self, view: View) -> usize {
        match view {
            View::Jobs => self.visible_backups().len(),
            View::Vms => self.visible_vms().len(),
            View::Ports => self.port_rows().len(),
            View::Tunnel => self.tunnel_rows().len(),
            View::Processes => self.visible_processes().len(),
            View::Events => self.visible_events().len(),
        }
    }

    pub fn vm_of(&self, id: &BackupId) -> Option<&str> {
        self.backups
            .iter()
            .find(|b| &b.backup_id == id)
            .map(|b| b.vm_name.as_str())
    }

    /// A qemu-nbd process that is dead while it is still needed: its job is live, or its port
    /// is still held for it. The processes of ended jobs whose ports were released are dead as
    /// planned (the hub stopped them) and are not a problem.
    pub fn process_dead_while_needed(&self, p: &ProcessInfo) -> bool {
        if p.alive {
            return false;
        }
        let job_live = self
            .backups
            .iter()
            .any(|b| b.backup_id == p.backup_id && !b.status.is_terminal());
        job_live || self.port_process(p.port.0).is_some_and(|q| q.pid == p.pid)
    }

    pub fn visible_backups(&self) -> Vec<&Backup> {
        let f = self.filter(View::Jobs);
        self.backups
            .iter()
            .filter(|b| {
                matches(
                    f,
                    &[
                        &b.backup_id.0,
                        &b.vm_name,
                        b.status.as_str(),
                        b.backup_type.as_str(),
                        &b.repository_id,
                    ],
                )
            })
            .collect()
    }

    pub fn visible_vms(&self) -> Vec<&Vm> {
        let f = self.filter(View::Vms);
        self.vms
            .iter()
            .filter(|v| matches(f, &[&v.vm_name, v.node.as_deref().unwrap_or("")]))
            .collect()
    }

    pub fn visible_processes(&self) -> Vec<&ProcessInfo> {
        let f = self.filter(View::Processes);
        self.processes
            .iter()
            .filter(|p| {
                matches(
                    f,
                    &[
                        &p.pid.to_string(),
                        &p.port.to_string(),
                        &p.export_name,
                        &p.qcow2_path,
                        &p.backup_id.0,
                        self.vm_of(&p.backup_id).unwrap_or(""),
                        if p.alive {
                            strings::ALIVE
                        } else {
                            strings::DEAD
                        },
                    ],
                )
            })
            .collect()
    }

    /// Newest first.
    pub fn visible_events(&self) -> Vec<&JobEvent> {
        let f = self.filter(View::Events);
        self.events
            .iter()
            .rev()
            .filter(|e| {
                matches(
                    f,
                    &[
                        &e.backup_id.0,
                        self.vm_of(&e.backup_id).unwrap_or(""),
                        &e.level,
                        &e.step,
                        &e.message,
                        &e.disk_key.map(|k| k.to_string()).unwrap_or_default(),
                    ],
                )
            })
            .collect()
    }

    pub fn port_range(&self) -> [u16; 2] {
        self.ports
            .as_ref()
            .map(|p| p.range)
            .unwrap_or(DEFAULT_PORT_RANGE)
    }

    pub fn port_cell(&self, port: u16) -> PortCell {
        let Some(ports) = &self.ports else {
            return PortCell::Free;
        };
        if ports.squatted.iter().any(|s| s.port.0 == port) {
            return PortCell::Squatted;
        }
        if ports.allocations.iter().any(|a| a.port.0 == port) {
            let dead = self.port_process(port).is_some_and(|p| !p.alive);
            return if dead {
                PortCell::Stale
            } else {
                PortCell::Held
            };
        }
        PortCell::Free
    }

    /// The qemu-nbd process serving a held port: the one of the allocation's job and disk. The
    /// hub lists the processes of past jobs too, often on the same port (ports are reused), so
    /// the port alone would find an old, dead process and call a healthy export stale.
    pub fn port_process(&self, port: u16) -> Option<&ProcessInfo> {
        let alloc = self
            .ports
            .as_ref()?
            .allocations
            .iter()
            .find(|a| a.port.0 == port)?;
        self.processes.iter().find(|p| {
            p.port.0 == port && p.backup_id == alloc.backup_id && p.disk_key == alloc.disk_key
        })
    }

    /// Ports that are not free, in port order (the table under the grid).
    pub fn port_rows(&self) -> Vec<u16> {
        let Some(ports) = &self.ports else {
            return Vec::new();
        };
        let mut rows: Vec<u16> = ports
            .allocations
            .iter()
            .map(|a| a.port.0)
            .chain(ports.squatted.iter().map(|s| s.port.0))
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let f = self.filter(View::Ports);
        rows.into_iter()
            .filter(|port| {
                let holder = ports.allocations.iter().find(|a| a.port.0 == *port);
                let squat = ports.squatted.iter().find(|s| s.port.0 == *port);
                matches(
                    f,
                    &[
                        &port.to_string(),
                        holder.map(|a| a.backup_id.0.as_str()).unwrap_or(""),
                        holder.and_then(|a| self.vm_of(&a.backup_id)).unwrap_or(""),
                        squat.map(|s| s.detail.as_str()).unwrap_or(""),
                        match self.port_cell(*port) {
                            PortCell::Squatted => strings::PORT_SQUATTED,
                            PortCell::Stale => strings::PORT_STALE,
                            _ => strings::PORT_HELD,
                        },
                    ],
                )
            })
            .collect()
    }

    /// One row per node the hub knows, plus nodes only seen in tunnel reports.
    pub fn tunnel_rows(&self) -> Vec<TunnelRow<'_>> {
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        for name in self.tunnels.keys().chain(self.tunnel_errors.keys()) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names.sort_unstable();
        let f = self.filter(View::Tunnel);
        names
            .into_iter()
            .map(|name| TunnelRow {
                node: name,
                info: self.nodes.iter().find(|n| n.name == name),
                tunnel: self
                    .tunnels
                    .get(name)
                    .or_else(|| self.nodes.iter().find(|n| n.name == name)?.tunnel.as_ref()),
                probe_error: self.tunnel_errors.get(name).map(String::as_str),
            })
            .filter(|r| {
                matches(
                    f,
                    &[
                        r.node,
                        r.tunnel.and_then(|t| t.last_error.as_deref()).unwrap_or(""),
                    ],
                )
            })
            .collect()
    }

    pub fn detail_backup(&self) -> Option<&Backup> {
        let id = self.detail.as_ref()?;
        self.backups.iter().find(|b| &b.backup_id == id)
    }

    /// Rate of one disk (bytes/s) while it copies.
    pub fn disk_rate(&self, id: &BackupId, disk: DiskKey) -> Option<u64> {
        self.history.get(&(id.clone(), disk))?.rate()
    }

    /// Sum of the rates of a job's running disks.
    pub fn job_rate(&self, backup: &Backup) -> Option<u64> {
        let rates: Vec<u64> = backup
            .disk_results
            .iter()
            .filter(|d| d.status == DiskStatus::Running)
            .filter_map(|d| self.disk_rate(&backup.backup_id, d.disk_key))
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum())
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self.reach, Reach::Unreachable { .. })
    }

    fn selected_backup(&self) -> Option<&Backup> {
        if let Some(b) = self.detail_backup() {
            return Some(b);
        }
        let list = self.visible_backups();
        list.get(self.selected(View::Jobs)).copied()
    }

    // ----- what the operator pressed -----

    /// Handle one key press. Returns what the terminal loop must do, if anything.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        let command = keys::command(self.mode.keymap(), key)?;
        self.on_command(command)
    }

    pub fn on_command(&mut self, command: Command) -> Option<Action> {
        if command == Command::Quit {
            return Some(Action::Quit);
        }
        match self.mode.clone() {
            Mode::Normal => self.normal(command),
            Mode::Filter => {
                let f = &mut self.filters[self.view.index()];
                match command {
                    Command::Type(c) => f.push(c),
                    Command::Erase => {
                        f.pop();
                    }
                    Command::KeepFilter => self.mode = Mode::Normal,
                    Command::ClearFilter => {
                        f.clear();
                        self.mode = Mode::Normal;
                    }
                    _ => {}
                }
                self.selected[self.view.index()] = 0;
                None
            }
            Mode::Help => {
                if command == Command::Close {
                    self.mode = Mode::Normal;
                }
                None
            }
            Mode::ConfirmCancel { backup_id, .. } => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_cancel_sent(&backup_id.0),
                        self.now,
                    );
                    Some(Action::Cancel(backup_id))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_CANCEL_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
            Mode::Start(mut form) => {
                match command {
                    Command::Full => form.backup_type = BackupType::Full,
                    Command::Incremental => form.backup_type = BackupType::Incremental,
                    Command::ToggleType => {
                        form.backup_type = match form.backup_type {
                            BackupType::Full => BackupType::Incremental,
                            BackupType::Incremental => BackupType::Full,
                        }
                    }
                    Command::Up => form.repository = form.repository.saturating_sub(1),
                    Command::Down => {
                        form.repository =
                            (form.repository + 1).min(self.repositories.len().saturating_sub(1))
                    }
                    Command::Enter => {
                        self.mode = Mode::ConfirmStart(form);
                        return None;
                    }
                    Command::Close => {
                        self.mode = Mode::Normal;
                        return None;
                    }
                    _ => {}
                }
                self.mode = Mode::Start(form);
                None
            }
            Mode::ConfirmStart(form) => match command {
                Command::Yes => {
                    self.mode = Mode::Normal;
                    let repository_id = self.repositories.get(form.repository)?.id.clone();
                    self.notify(
                        NoticeLevel::Info,
                        strings::notice_start_sent(form.backup_type.as_str(), &form.vm_name),
                        self.now,
                    );
                    Some(Action::Start(BackupRequest {
                        vm_name: form.vm_name,
                        repository_id,
                        backup_type: form.backup_type,
                    }))
                }
                Command::No => {
                    self.mode = Mode::Normal;
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_START_ABORTED.into(),
                        self.now,
                    );
                    None
                }
                _ => None,
            },
        }
    }

    fn move_selection(&mut self, to: impl FnOnce(usize, usize) -> usize) {
        if self.view == View::Jobs && self.detail.is_some() {
            let disks = self
                .detail_backup()
                .map(|b| b.disk_results.len())
                .unwrap_or(0);
            self.detail_scroll = to(self.detail_scroll, disks).min(disks.saturating_sub(1));
            return;
        }
        let len = self.row_count(self.view);
        let cur = self.selected(self.view);
        self.selected[self.view.index()] = to(cur, len).min(len.saturating_sub(1));
    }

    fn switch(&mut self, view: View) {
        self.view = view;
        self.detail = None;
        self.detail_scroll = 0;
    }

    fn normal(&mut self, command: Command) -> Option<Action> {
        match command {
            Command::NextView => {
                self.switch(View::ALL[(self.view.index() + 1) % View::ALL.len()]);
            }
            Command::PrevView => {
                self.switch(View::ALL[(self.view.index() + View::ALL.len() - 1) % View::ALL.len()]);
            }
            Command::Go(v) => self.switch(v),
            Command::Up => self.move_selection(|cur, _| cur.saturating_sub(1)),
            Command::Down => self.move_selection(|cur, _| cur + 1),
            Command::Top => self.move_selection(|_, _| 0),
            Command::Bottom => self.move_selection(|_, len| len.saturating_sub(1)),
            Command::Enter => match self.view {
                View::Jobs if self.detail.is_none() => {
                    self.detail = self.selected_backup().map(|b| b.backup_id.clone());
                    self.detail_scroll = 0;
                }
                View::Events => {
                    let id = self
                        .visible_events()
                        .get(self.selected(View::Events))
                        .map(|e| e.backup_id.clone());
                    if let Some(id) = id {
                        self.view = View::Jobs;
                        self.detail = Some(id);
                        self.detail_scroll = 0;
                    }
                }
                _ => {}
            },
            Command::Back => {
                if self.detail.is_some() {
                    self.detail = None;
                } else {
                    self.filters[self.view.index()].clear();
                }
            }
            Command::Filter => self.mode = Mode::Filter,
            Command::Help => self.mode = Mode::Help,
            Command::Start => self.open_start(),
            Command::Cancel => self.open_cancel(),
            _ => {}
        }
        None
    }

    fn open_start(&mut self) {
        if self.view != View::Vms {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_START_ONLY_VMS.into(),
                self.now,
            );
            return;
        }
        if self.repositories.is_empty() {
            self.notify(
                NoticeLevel::Error,
                strings::NOTICE_NO_REPOSITORY.into(),
                self.now,
            );
            return;
        }
        let Some(vm) = self.visible_vms().get(self.selected(View::Vms)).copied() else {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_NOTHING_SELECTED.into(),
                self.now,
            );
            return;
        };
        let has_previous = vm.last_backup_id.is_some();
        self.mode = Mode::Start(StartForm {
            vm_name: vm.vm_name.clone(),
            backup_type: if has_previous {
                BackupType::Incremental
            } else {
                BackupType::Full
            },
            repository: 0,
            has_previous,
        });
    }

    fn open_cancel(&mut self) {
        if self.view != View::Jobs {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_CANCEL_ONLY_JOBS.into(),
                self.now,
            );
            return;
        }
        let Some(b) = self.selected_backup() else {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_NOTHING_SELECTED.into(),
                self.now,
            );
            return;
        };
        if b.status.is_terminal() {
            let text = strings::notice_already_terminal(&b.backup_id.0, b.status.as_str());
            self.notify(NoticeLevel::Info, text, self.now);
            return;
        }
        self.mode = Mode::ConfirmCancel {
            backup_id: b.backup_id.clone(),
            vm_name: b.vm_name.clone(),
            status: b.status,
        };
    }
}

#[cfg(test)]
mod tests;
