//! Folding in what the hub said: snapshots of the lists, events of the stream, the hub's
//! reachability, and the outcome of actions.

use super::{App, Notice, NoticeLevel, Reach, Snapshot, Stream, Update};
use chrono::{DateTime, Utc};
use sendense_shared::api::{Backup, DiskStatus, HubEvent, JobEvent, JobStatus, Recovery, Restore};

/// Job events kept in memory (oldest dropped first).
const MAX_EVENTS: usize = 2000;
/// Verify jobs kept in memory (newest first; the oldest dropped).
const MAX_VERIFIES: usize = 50;
/// How long an action notice stays in the footer.
const NOTICE_SECS: i64 = 15;

impl App {
    /// Fold one update in; `now` is when it arrived.
    pub fn apply(&mut self, update: Update, now: DateTime<Utc>) {
        match update {
            Update::Snapshot(snap) => self.apply_snapshot(*snap, now),
            Update::Event(event) => {
                self.last_contact = Some(now);
                self.apply_event(event, now);
            }
            Update::Recovery(r) => {
                self.last_contact = Some(now);
                self.apply_recovery(*r);
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
            Update::PolicyDetail(d) => self.apply_policy_detail(*d),
            Update::PrunePreview(plan) => self.apply_prune_preview(*plan),
            Update::FileListing { seq, result } => {
                self.apply_file_listing(seq, result.map(|l| *l));
            }
            Update::FilesProgress { bytes } => {
                if let Some(d) = self.download.as_mut() {
                    d.bytes = bytes;
                }
            }
            Update::FilesDone { message, ok } => {
                self.download = None;
                let level = if ok {
                    NoticeLevel::Info
                } else {
                    NoticeLevel::Error
                };
                self.notify(level, message, now);
            }
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
        if let Some(restores) = snap.restores {
            for r in &restores {
                self.record_restore(r, now);
            }
            self.restores = restores;
            self.sort_restores();
        }
        if let Some(r) = snap.recoveries {
            self.recoveries = r;
            self.sort_recoveries();
        }
        if let Some(v) = snap.verifies {
            self.verifies = v;
            self.sort_verifies();
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
        if let Some(p) = snap.policies {
            self.policies = p;
            self.sort_policies();
        }
        if let Some(p) = snap.prunes {
            self.prunes = p;
            self.sort_prunes();
        }
        if let Some(spaces) = snap.spaces {
            self.spaces = spaces
                .into_iter()
                .map(|s| (s.repository_id.clone(), s))
                .collect();
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
                self.sync_protected(&backup);
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
            HubEvent::Recovery { recovery } => self.apply_recovery(recovery),
            HubEvent::Restore { restore } => {
                self.record_restore(&restore, now);
                match self
                    .restores
                    .iter_mut()
                    .find(|r| r.restore_id == restore.restore_id)
                {
                    Some(slot) => *slot = restore,
                    None => self.restores.push(restore),
                }
                self.sort_restores();
            }
            HubEvent::Verify { verify } => {
                match self
                    .verifies
                    .iter_mut()
                    .find(|v| v.verify_id == verify.verify_id)
                {
                    Some(slot) => *slot = verify,
                    None => self.verifies.push(verify),
                }
                self.sort_verifies();
            }
            // Applied as they come; the feed and the terminal loop also re-read the lists and
            // the open policy (see `sse::pump` and `App::reload_on`).
            HubEvent::PolicyRun { run } => self.apply_policy_run(run),
            HubEvent::Prune { prune } => self.apply_prune(prune),
            // The feed re-reads the lists on it (see `sse::pump`); nothing to apply.
            HubEvent::Lagged { .. } => {}
        }
    }

    /// Newest first; a verify job that ended long ago is not kept for ever.
    fn sort_verifies(&mut self) {
        self.verifies.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.verify_id.cmp(&a.verify_id))
        });
        self.verifies.truncate(MAX_VERIFIES);
    }

    fn sort_backups(&mut self) {
        self.backups.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.backup_id.cmp(&a.backup_id))
        });
    }

    fn apply_recovery(&mut self, recovery: Recovery) {
        match self
            .recoveries
            .iter_mut()
            .find(|r| r.recovery_id == recovery.recovery_id)
        {
            Some(slot) => *slot = recovery,
            None => self.recoveries.push(recovery),
        }
        self.sort_recoveries();
    }

    fn sort_recoveries(&mut self) {
        self.recoveries.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.recovery_id.cmp(&a.recovery_id))
        });
    }

    fn sort_restores(&mut self) {
        self.restores.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.restore_id.cmp(&a.restore_id))
        });
    }

    fn record_restore(&mut self, r: &Restore, now: DateTime<Utc>) {
        if r.status == JobStatus::Running || self.restore_history.contains_key(&r.restore_id) {
            self.restore_history
                .entry(r.restore_id.clone())
                .or_default()
                .record(now, r.bytes_done);
        }
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

    pub(super) fn notify(&mut self, level: NoticeLevel, text: String, now: DateTime<Utc>) {
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
}
