//! The Policies view's part of the state: which VMs a policy covers (its selector over the VMs
//! the hub knows, and the VMs its runs name), the open policy's runs and per-VM points, the keys
//! of the view (run now and enable/disable with a y/n; protect/unprotect a point; a prune's dry
//! run, then its confirmation), the hub's policy and prune events folded in, and
//! [`App::reload_on`]: what the terminal loop must re-read after an update.

use super::{Action, App, Mode, NoticeLevel, Update};
use crate::keys::Command;
use crate::strings;
use crate::view::View;
use sendense_shared::api::{
    BackupRule, ChainLimit, HubEvent, Policy, PolicyRequest, PolicyRun, PruneAction, PruneJob,
    PrunePlan, PrunePoint, RepositorySpace, Retention, VmSelector,
};
use std::collections::BTreeMap;

/// Runs kept per policy (newest planned first).
const MAX_RUNS: usize = 50;

/// The open policy's runs and its VMs' points, as re-read by the terminal loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDetail {
    pub policy_id: String,
    /// `None`: the runs could not be read (the cause is in `errors`).
    pub runs: Option<Vec<PolicyRun>>,
    /// Points of each VM that answered.
    pub points: BTreeMap<String, Vec<PrunePoint>>,
    pub errors: Vec<String>,
}

/// Shell-style glob over a VM name, as the hub's selector reads patterns: `*` any run, `?` one
/// character, `[abc]`, `[a-z]`, `[!a]` (or `[^a]`) one of / none of a set.
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob_at(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                // No closing bracket: a literal `[`.
                return n.first() == Some(&'[') && glob_at(&p[1..], &n[1..]);
            };
            let Some(&c) = n.first() else { return false };
            let mut set = &p[1..close];
            let negate = matches!(set.first(), Some('!' | '^'));
            if negate {
                set = &set[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == '-' {
                    hit |= (set[i]..=set[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob_at(&p[close + 1..], &n[1..])
        }
        Some(&c) => n.first() == Some(&c) && glob_at(&p[1..], &n[1..]),
    }
}

/// `pgtest1, web-*, node:node-b`: names, then patterns, then nodes.
pub fn selector_summary(sel: &VmSelector) -> String {
    let parts: Vec<String> = sel
        .names
        .iter()
        .chain(&sel.patterns)
        .cloned()
        .chain(
            sel.nodes
                .iter()
                .map(|n| format!("{}{n}", strings::NODE_PREFIX)),
        )
        .collect();
    if parts.is_empty() {
        strings::NONE.to_string()
    } else {
        parts.join(", ")
    }
}

/// `last 3 · daily 7 · weekly 4`, or `None` when no rule is used (nothing is pruned).
pub fn retention_summary(r: &Retention) -> Option<String> {
    let rules = [
        ("last", r.keep_last),
        ("hourly", r.keep_hourly),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
        ("yearly", r.keep_yearly),
    ];
    let used: Vec<String> = rules
        .iter()
        .filter_map(|(name, n)| n.filter(|n| *n > 0).map(|n| format!("{name} {n}")))
        .collect();
    (!used.is_empty()).then(|| used.join(" · "))
}

/// `incremental, full every 7 days, full on sun`.
pub fn rule_summary(r: &BackupRule) -> String {
    let mut parts = vec![strings::RULE_INCREMENTAL.to_string()];
    if let Some(d) = r.full_every_days {
        parts.push(format!("{} {d} {}", strings::FULL_EVERY, strings::DAYS));
    }
    if let Some(n) = r.full_every_runs {
        parts.push(format!("{} {n} {}", strings::FULL_EVERY, strings::RUNS));
    }
    if let Some(day) = &r.weekly_full_on {
        parts.push(format!("{} {day}", strings::FULL_ON));
    }
    parts.join(", ")
}

/// `chain ≤ 14 → synthetic full`, when the policy limits chains.
pub fn chain_summary(p: &Policy) -> Option<String> {
    let n = p.max_chain_length?;
    let then = match p.chain_limit {
        ChainLimit::Full => strings::CHAIN_FULL,
        ChainLimit::Synthetic => strings::CHAIN_SYNTHETIC,
    };
    Some(format!("{} ≤ {n} → {then}", strings::CHAIN))
}

/// The request that stores `p` again as it is (a `PUT` is a whole replacement).
pub fn request_of(p: &Policy) -> PolicyRequest {
    PolicyRequest {
        name: p.name.clone(),
        vms: p.vms.clone(),
        repository_id: p.repository_id.clone(),
        schedule: p.schedule.clone(),
        timezone: p.timezone.clone(),
        backup_rule: p.backup_rule.clone(),
        retention: p.retention.clone(),
        max_chain_length: p.max_chain_length,
        chain_limit: p.chain_limit,
        enabled: p.enabled,
        priority: p.priority,
        queue_window_secs: p.queue_window_secs,
        boot_check: p.boot_check.clone(),
    }
}

/// What a prune does to a point, in words.
pub fn action_word(a: PruneAction) -> &'static str {
    match a {
        PruneAction::Keep => strings::ACTION_KEEP,
        PruneAction::Delete => strings::ACTION_DELETE,
        PruneAction::MergeIntoChild => strings::ACTION_MERGE,
        PruneAction::RebaseChild => strings::ACTION_REBASE,
    }
}

impl App {
    /// Policies by name, filtered.
    pub fn visible_policies(&self) -> Vec<&Policy> {
        let f = self.filter(View::Policies).to_lowercase();
        self.policies
            .iter()
            .filter(|p| {
                f.is_empty()
                    || [
                        p.name.as_str(),
                        p.id.as_str(),
                        p.schedule.as_str(),
                        p.timezone.as_str(),
                        p.repository_id.as_str(),
                        &selector_summary(&p.vms),
                    ]
                    .iter()
                    .any(|s| s.to_lowercase().contains(&f))
            })
            .collect()
    }

    /// The open policy.
    pub fn detail_policy(&self) -> Option<&Policy> {
        let id = self.views.policies.detail.as_ref()?;
        self.policies.iter().find(|p| &p.id == id)
    }

    /// The open policy, else the selected row.
    fn current_policy(&self) -> Option<&Policy> {
        if self.views.policies.detail.is_some() {
            return self.detail_policy();
        }
        self.visible_policies()
            .get(self.selected(View::Policies))
            .copied()
    }

    /// The VMs `p` covers: its explicit names, the known VMs its patterns or nodes reach, and
    /// any VM its runs name (a VM the hub no longer lists still has points). Names first, in
    /// their order, then the others by name.
    pub fn policy_vms(&self, p: &Policy) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in &p.vms.names {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        let mut others: Vec<String> = self
            .vms
            .iter()
            .filter(|v| {
                p.vms.patterns.iter().any(|pat| glob(pat, &v.vm_name))
                    || v.node.as_ref().is_some_and(|n| p.vms.nodes.contains(n))
            })
            .map(|v| v.vm_name.clone())
            .chain(self.runs_of(&p.id).iter().map(|r| r.vm_name.clone()))
            .chain(p.last_run.iter().map(|r| r.vm_name.clone()))
            .filter(|n| !out.contains(n))
            .collect();
        others.sort();
        others.dedup();
        out.extend(others);
        out
    }

    /// Runs of a policy, newest planned first.
    pub fn runs_of(&self, policy_id: &str) -> &[PolicyRun] {
        self.policy_runs
            .get(policy_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The VM whose points the open policy's detail shows.
    pub fn detail_vm(&self) -> Option<String> {
        let vms = self.policy_vms(self.detail_policy()?);
        let i = self.views.policies.vm.min(vms.len().saturating_sub(1));
        vms.into_iter().nth(i)
    }

    /// Place of the shown VM and how many the policy covers.
    pub fn detail_vm_place(&self) -> (usize, usize) {
        let n = self.detail_policy().map_or(0, |p| self.policy_vms(p).len());
        (self.views.policies.vm.min(n.saturating_sub(1)), n)
    }

    /// Points of the shown VM, newest first.
    pub fn detail_points(&self) -> &[PrunePoint] {
        self.detail_vm()
            .and_then(|vm| self.points.get(&vm))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The selected point, kept inside the points there are now.
    pub fn selected_point(&self) -> usize {
        let n = self.detail_points().len();
        self.views.policies.point.min(n.saturating_sub(1))
    }

    pub fn space_of(&self, repository_id: &str) -> Option<&RepositorySpace> {
        self.spaces.get(repository_id)
    }

    /// The VM's prune job that is not over yet.
    pub fn running_prune(&self, vm: &str) -> Option<&PruneJob> {
        self.prunes
            .iter()
            .find(|j| j.vm_name == vm && !j.status.is_terminal())
    }

    /// Enter on a policy: open its detail and have its runs and points read.
    pub(super) fn open_policy(&mut self) -> Option<Action> {
        let p = self
            .visible_policies()
            .get(self.selected(View::Policies))
            .copied()?;
        let id = p.id.clone();
        let action = Action::LoadPolicy {
            id: id.clone(),
            vms: self.policy_vms(p),
        };
        let st = &mut self.views.policies;
        st.detail = Some(id);
        st.vm = 0;
        st.point = 0;
        Some(action)
    }

    /// The keys of the Policies view (from the main screen).
    pub(super) fn policy_command(&mut self, command: Command) -> Option<Action> {
        if self.view != View::Policies {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_ONLY_POLICIES.into(),
                self.now,
            );
            return None;
        }
        let in_detail = self.views.policies.detail.is_some();
        match command {
            Command::RunNow | Command::ToggleEnabled => {
                let Some(p) = self.current_policy() else {
                    self.nothing_selected();
                    return None;
                };
                let (question, action) = if command == Command::RunNow {
                    (
                        strings::confirm_run_now(&p.name, self.policy_vms(p).len()),
                        Action::RunPolicy {
                            id: p.id.clone(),
                            name: p.name.clone(),
                        },
                    )
                } else {
                    let mut request = request_of(p);
                    request.enabled = !p.enabled;
                    (
                        strings::confirm_toggle(&p.name, request.enabled),
                        Action::UpdatePolicy {
                            id: p.id.clone(),
                            request: Box::new(request),
                        },
                    )
                };
                self.mode = Mode::ConfirmPolicy { question, action };
                None
            }
            Command::PrevItem | Command::NextItem if in_detail => {
                let (cur, n) = self.detail_vm_place();
                let st = &mut self.views.policies;
                st.vm = if command == Command::PrevItem {
                    cur.saturating_sub(1)
                } else {
                    (cur + 1).min(n.saturating_sub(1))
                };
                st.point = 0;
                None
            }
            Command::Protect if in_detail => {
                let Some(point) = self.detail_points().get(self.selected_point()).cloned() else {
                    self.nothing_selected();
                    return None;
                };
                let protect = !point.protected;
                self.notify(
                    NoticeLevel::Info,
                    strings::notice_protect_sent(&point.backup_id.0, protect),
                    self.now,
                );
                Some(Action::Protect {
                    backup_id: point.backup_id,
                    protect,
                })
            }
            Command::PrunePreview if in_detail => {
                let Some(vm) = self.detail_vm() else {
                    self.nothing_selected();
                    return None;
                };
                self.notify(
                    NoticeLevel::Info,
                    strings::notice_preview_sent(&vm),
                    self.now,
                );
                Some(Action::PreviewPrune(vm))
            }
            Command::PrevItem | Command::NextItem => None,
            _ => {
                self.notify(
                    NoticeLevel::Info,
                    strings::NOTICE_ONLY_POLICY_DETAIL.into(),
                    self.now,
                );
                None
            }
        }
    }

    fn nothing_selected(&mut self) {
        self.notify(
            NoticeLevel::Info,
            strings::NOTICE_NOTHING_SELECTED.into(),
            self.now,
        );
    }

    /// y/n on a policy action.
    pub(super) fn confirm_policy(&mut self, action: Action, command: Command) -> Option<Action> {
        match command {
            Command::Yes => {
                self.mode = Mode::Normal;
                if let Action::RunPolicy { name, .. } = &action {
                    self.notify(NoticeLevel::Info, strings::notice_run_sent(name), self.now);
                }
                Some(action)
            }
            Command::No => {
                self.mode = Mode::Normal;
                self.notify(
                    NoticeLevel::Info,
                    strings::NOTICE_ACTION_ABORTED.into(),
                    self.now,
                );
                None
            }
            _ => None,
        }
    }

    /// y/n in the prune preview: y starts the prune the preview showed.
    pub(super) fn prune_dialog(&mut self, plan: &PrunePlan, command: Command) -> Option<Action> {
        match command {
            Command::Yes => {
                self.mode = Mode::Normal;
                if !plan.points.iter().any(|p| p.action != PruneAction::Keep) {
                    self.notify(
                        NoticeLevel::Info,
                        strings::NOTICE_PRUNE_NOTHING.into(),
                        self.now,
                    );
                    return None;
                }
                Some(Action::Prune(plan.vm_name.clone()))
            }
            Command::No => {
                self.mode = Mode::Normal;
                self.notify(
                    NoticeLevel::Info,
                    strings::NOTICE_PRUNE_ABORTED.into(),
                    self.now,
                );
                None
            }
            _ => None,
        }
    }

    /// What to re-read after `update` was applied: the open policy's runs and points when the
    /// hub says one of its runs changed, a prune of one of its VMs ended, or a point of one of
    /// them changed (completed, protected); and at every snapshot (the lists' cadence).
    pub fn reload_on(&self, update: &Update) -> Option<Action> {
        let p = self.detail_policy()?;
        let vms = self.policy_vms(p);
        let wanted = match update {
            Update::Snapshot(_) => true,
            Update::Event(HubEvent::PolicyRun { run }) => run.policy_id == p.id,
            Update::Event(HubEvent::Prune { prune }) => {
                prune.status.is_terminal() && vms.contains(&prune.vm_name)
            }
            Update::Event(HubEvent::Backup { backup }) => {
                backup.status.is_terminal() && vms.contains(&backup.vm_name)
            }
            _ => false,
        };
        wanted.then(|| Action::LoadPolicy {
            id: p.id.clone(),
            vms,
        })
    }

    pub(super) fn sort_policies(&mut self) {
        self.policies
            .sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    }

    pub(super) fn sort_prunes(&mut self) {
        self.prunes.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.prune_id.cmp(&a.prune_id))
        });
    }

    /// A run changed: into its policy's runs, and its policy's last run when it is that one
    /// or newer.
    pub(super) fn apply_policy_run(&mut self, run: PolicyRun) {
        if let Some(p) = self.policies.iter_mut().find(|p| p.id == run.policy_id) {
            let newer = p
                .last_run
                .as_ref()
                .is_none_or(|l| l.run_id == run.run_id || run.queued_at >= l.queued_at);
            if newer {
                p.last_run = Some(run.clone());
            }
        }
        let runs = self.policy_runs.entry(run.policy_id.clone()).or_default();
        match runs.iter_mut().find(|r| r.run_id == run.run_id) {
            Some(slot) => *slot = run,
            None => runs.push(run),
        }
        sort_runs(runs);
    }

    pub(super) fn apply_prune(&mut self, prune: PruneJob) {
        match self
            .prunes
            .iter_mut()
            .find(|j| j.prune_id == prune.prune_id)
        {
            Some(slot) => *slot = prune,
            None => self.prunes.push(prune),
        }
        self.sort_prunes();
    }

    pub(super) fn apply_policy_detail(&mut self, d: PolicyDetail) {
        if let Some(mut runs) = d.runs {
            sort_runs(&mut runs);
            self.policy_runs.insert(d.policy_id.clone(), runs);
        }
        self.points.extend(d.points);
        if !d.errors.is_empty() {
            self.snapshot_errors = d.errors;
        }
    }

    /// The dry run came back: the dialog opens over whatever the main screen shows (not over
    /// another dialog, which the operator is answering).
    pub(super) fn apply_prune_preview(&mut self, plan: PrunePlan) {
        if matches!(self.mode, Mode::Normal | Mode::Filter) {
            self.notice = None;
            self.mode = Mode::PrunePreview(Box::new(plan));
        }
    }

    /// A backup's protected flag is also its point's.
    pub(super) fn sync_protected(&mut self, backup: &sendense_shared::api::Backup) {
        if let Some(points) = self.points.get_mut(&backup.vm_name) {
            for p in points
                .iter_mut()
                .filter(|p| p.backup_id == backup.backup_id)
            {
                p.protected = backup.protected;
            }
        }
    }
}

fn sort_runs(runs: &mut Vec<PolicyRun>) {
    runs.sort_by(|a, b| {
        b.planned_at
            .cmp(&a.planned_at)
            .then(b.queued_at.cmp(&a.queued_at))
            .then(a.vm_name.cmp(&b.vm_name))
    });
    runs.truncate(MAX_RUNS);
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("web-*", "web-front"));
        assert!(glob("web-*", "web-"));
        assert!(!glob("web-*", "mail"));
        assert!(glob("pg?", "pg1"));
        assert!(!glob("pg?", "pg12"));
        assert!(glob("db[0-9]", "db7"));
        assert!(!glob("db[!0-9]", "db7"));
        assert!(glob("db[ab]x", "dbbx"));
        assert!(glob("*", ""));
        assert!(glob("a[", "a["));
    }
}
