//! What deserves a webhook: [`Watch`] turns bus events and periodic [`Facts`] into
//! [`Alert`]s, once per job end and once per condition (again only after it cleared). Pure:
//! the facts are gathered by [`facts`], the time is the caller's (the hub's clock).

use super::{Alert, AlertKind};
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    HubEvent, Integrity, JobStatus, RunStatus, TunnelState, TunnelStateKind,
};
use serde_json::json;
use std::collections::{BTreeMap, HashSet, VecDeque};

/// Limits of the periodic conditions.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A repository with less than this share free (percent) is nearly full.
    pub repository_full_percent: u8,
    /// A tunnel not up for this long is down.
    pub tunnel_down_after: chrono::Duration,
    /// Added to a policy's period and queue window before its VM counts as without a good
    /// point (a run takes time).
    pub stale_grace: chrono::Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            repository_full_percent: 10,
            tunnel_down_after: chrono::Duration::minutes(5),
            stale_grace: chrono::Duration::hours(1),
        }
    }
}

/// A policy's VM and its newest good point.
#[derive(Debug, Clone)]
pub struct PointFact {
    pub vm_name: String,
    pub policy: String,
    /// Completed and not corrupt.
    pub newest_good: Option<DateTime<Utc>>,
    /// Since when the policy covers the VM (its creation): a new VM is not late at once.
    pub covered_since: DateTime<Utc>,
    /// The policy's period plus its queue window and [`Settings::stale_grace`].
    pub allowed: chrono::Duration,
}

#[derive(Debug, Clone)]
pub struct RepoFact {
    pub id: String,
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// What the periodic check looks at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Nodes with a recorded tunnel state.
    pub tunnels: Vec<(String, TunnelState)>,
    pub points: Vec<PointFact>,
    pub repos: Vec<RepoFact>,
}

/// Ids already told, bounded (the oldest forgotten first).
struct Told {
    set: HashSet<String>,
    order: VecDeque<String>,
}

const TOLD_MAX: usize = 4096;

impl Told {
    fn first(&mut self, id: String) -> bool {
        if self.set.contains(&id) {
            return false;
        }
        if self.order.len() == TOLD_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
        true
    }
}

/// See the module documentation.
pub struct Watch {
    settings: Settings,
    told: Told,
    /// Conditions alerted and not cleared since, by kind and subject.
    active: HashSet<(AlertKind, String)>,
}

impl Watch {
    pub fn new(settings: Settings) -> Self {
        Watch {
            settings,
            told: Told {
                set: HashSet::new(),
                order: VecDeque::new(),
            },
            active: HashSet::new(),
        }
    }

    /// Job ends: a failed job of any kind, a point found corrupt, a scheduled run that gave up.
    pub fn on_event(&mut self, ev: &HubEvent) -> Vec<Alert> {
        let mut out = Vec::new();
        match ev {
            HubEvent::Backup { backup: b } => {
                if b.status == JobStatus::Failed && self.told.first(format!("f:{}", b.backup_id)) {
                    out.push(job_failed(
                        "backup",
                        &b.backup_id.0,
                        Some(&b.vm_name),
                        b.error_message.as_deref(),
                    ));
                }
                if b.integrity == Integrity::Corrupt
                    && self.told.first(format!("c:{}", b.backup_id))
                {
                    out.push(Alert {
                        kind: AlertKind::VerificationFailed,
                        subject: b.backup_id.0.clone(),
                        summary: format!(
                            "backup point {} of VM {} is corrupt: {}",
                            b.backup_id,
                            b.vm_name,
                            b.integrity_detail.as_deref().unwrap_or("no detail")
                        ),
                        data: json!({"backup_id": b.backup_id, "vm_name": b.vm_name,
                                     "detail": b.integrity_detail}),
                    });
                }
            }
            HubEvent::Restore { restore: r }
                if r.status == JobStatus::Failed
                    && self.told.first(format!("f:{}", r.restore_id)) =>
            {
                out.push(job_failed(
                    "restore",
                    &r.restore_id,
                    Some(&r.vm_name),
                    r.error_message.as_deref(),
                ));
            }
            HubEvent::Recovery { recovery: r }
                if r.status == JobStatus::Failed
                    && self.told.first(format!("f:{}", r.recovery_id)) =>
            {
                out.push(job_failed(
                    "recovery",
                    &r.recovery_id,
                    Some(&r.source_vm),
                    r.error_message.as_deref(),
                ));
            }
            HubEvent::Verify { verify: v } => {
                if v.status == JobStatus::Failed && self.told.first(format!("f:{}", v.verify_id)) {
                    out.push(job_failed(
                        "verify",
                        &v.verify_id,
                        None,
                        v.error_message.as_deref(),
                    ));
                }
                if v.status.is_terminal()
                    && !v.corrupt.is_empty()
                    && self.told.first(format!("c:{}", v.verify_id))
                {
                    out.push(Alert {
                        kind: AlertKind::VerificationFailed,
                        subject: v.verify_id.clone(),
                        summary: format!(
                            "verify job {} ({}) found {} corrupt point(s)",
                            v.verify_id,
                            v.scope,
                            v.corrupt.len()
                        ),
                        data: json!({"verify_id": v.verify_id, "scope": v.scope,
                                     "corrupt": v.corrupt}),
                    });
                }
            }
            HubEvent::Prune { prune: p }
                if p.status == JobStatus::Failed
                    && self.told.first(format!("f:{}", p.prune_id)) =>
            {
                out.push(job_failed(
                    "prune",
                    &p.prune_id,
                    Some(&p.vm_name),
                    p.error_message.as_deref(),
                ));
            }
            HubEvent::PolicyRun { run }
                if run.status == RunStatus::GaveUp
                    && self.told.first(format!("g:{}", run.run_id)) =>
            {
                out.push(job_failed(
                    "policy_run",
                    &run.run_id,
                    Some(&run.vm_name),
                    run.reason.as_deref(),
                ));
            }
            _ => {}
        }
        out
    }

    /// The periodic conditions at `now`.
    pub fn check(&mut self, f: &Facts, now: DateTime<Utc>) -> Vec<Alert> {
        let mut out = Vec::new();
        for (node, t) in &f.tunnels {
            let down_for = now - t.since;
            let down =
                t.state != TunnelStateKind::Up && down_for >= self.settings.tunnel_down_after;
            let clear = t.state == TunnelStateKind::Up;
            self.condition(&mut out, AlertKind::TunnelDown, node, down, clear, || {
                Alert {
                    kind: AlertKind::TunnelDown,
                    subject: node.clone(),
                    summary: format!(
                        "the tunnel of node {node} is {} since {} ({} s){}",
                        t.state.as_str(),
                        t.since.to_rfc3339(),
                        down_for.num_seconds(),
                        t.last_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                    data: json!({"node": node, "tunnel": t}),
                }
            });
        }
        // One alert per VM (the first policy that finds it late).
        let mut by_vm: BTreeMap<&str, &PointFact> = BTreeMap::new();
        for p in &f.points {
            let late = |p: &PointFact| now - p.newest_good.unwrap_or(p.covered_since) > p.allowed;
            let keep = by_vm
                .get(p.vm_name.as_str())
                .is_none_or(|q| !late(q) && late(p));
            if keep {
                by_vm.insert(&p.vm_name, p);
            }
        }
        for (vm, p) in by_vm {
            let since = p.newest_good.unwrap_or(p.covered_since);
            let age = now - since;
            let late = age > p.allowed;
            self.condition(
                &mut out,
                AlertKind::VmWithoutGoodPoint,
                vm,
                late,
                !late,
                || Alert {
                    kind: AlertKind::VmWithoutGoodPoint,
                    subject: vm.to_string(),
                    summary: match p.newest_good {
                        Some(at) => format!(
                            "VM {vm}'s newest good point is {} h old ({}); policy {} allows {} h",
                            age.num_hours(),
                            at.to_rfc3339(),
                            p.policy,
                            p.allowed.num_hours()
                        ),
                        None => format!(
                            "VM {vm} has no good point {} h after policy {} took it on (it \
                             allows {} h)",
                            age.num_hours(),
                            p.policy,
                            p.allowed.num_hours()
                        ),
                    },
                    data: json!({"vm_name": vm, "policy": p.policy,
                                 "newest_good_point_at": p.newest_good,
                                 "age_secs": age.num_seconds(),
                                 "allowed_secs": p.allowed.num_seconds()}),
                },
            );
        }
        let pct = u128::from(self.settings.repository_full_percent);
        for r in &f.repos {
            let total = u128::from(r.total_bytes.max(1));
            let free = u128::from(r.free_bytes);
            let full = free * 100 < total * pct;
            // Cleared one point above the limit, so a repository on the edge does not flap.
            let clear = free * 100 >= total * (pct + 1);
            self.condition(
                &mut out,
                AlertKind::RepositoryNearlyFull,
                &r.id,
                full,
                clear,
                || Alert {
                    kind: AlertKind::RepositoryNearlyFull,
                    subject: r.id.clone(),
                    summary: format!(
                        "repository {} ({}) has {} of {} bytes free ({:.1} %, under {pct} %)",
                        r.id,
                        r.path,
                        r.free_bytes,
                        r.total_bytes,
                        r.free_bytes as f64 * 100.0 / r.total_bytes.max(1) as f64
                    ),
                    data: json!({"repository_id": r.id, "path": r.path,
                                 "free_bytes": r.free_bytes, "total_bytes": r.total_bytes}),
                },
            );
        }
        out
    }

    fn condition(
        &mut self,
        out: &mut Vec<Alert>,
        kind: AlertKind,
        subject: &str,
        now_true: bool,
        cleared: bool,
        alert: impl FnOnce() -> Alert,
    ) {
        let key = (kind, subject.to_string());
        if now_true {
            if self.active.insert(key) {
                out.push(alert());
            }
        } else if cleared {
            self.active.remove(&key);
        }
    }
}

fn job_failed(kind: &str, id: &str, vm: Option<&str>, why: Option<&str>) -> Alert {
    Alert {
        kind: AlertKind::JobFailed,
        subject: id.to_string(),
        summary: format!(
            "{kind} {id}{} failed: {}",
            vm.map(|v| format!(" of VM {v}")).unwrap_or_default(),
            why.unwrap_or("no reason recorded")
        ),
        data: json!({"job_kind": kind, "id": id, "vm_name": vm, "error": why}),
    }
}

/// Gathers [`Facts`] from the hub's catalog and file systems.
pub async fn facts(
    hub: &crate::hub::Hub,
    grace: chrono::Duration,
) -> Result<Facts, crate::db::DbError> {
    let now = hub.db.clock().now();
    let tunnels = hub
        .db
        .list_nodes()
        .await?
        .into_iter()
        .filter_map(|n| n.tunnel.map(|t| (n.name, t)))
        .collect();
    let policies = hub.db.list_policies().await?;
    let vms = hub.db.list_vms().await?;
    let backups = hub.db.list_backups().await?;
    let newest = crate::vms::newest_good_points(&backups);
    let mut points = Vec::new();
    for p in policies.iter().filter(|p| p.enabled) {
        let Ok(s) = crate::policies::schedule::Schedule::parse(&p.schedule, &p.timezone) else {
            continue;
        };
        let Some(a) = s.next_after(now) else { continue };
        let Some(b) = s.next_after(a) else { continue };
        let allowed = (b - a) + chrono::Duration::seconds(p.queue_window_secs as i64) + grace;
        for t in crate::policies::select::targets(p, &policies, &vms) {
            if t.skip.is_some() || !vms.iter().any(|v| v.vm_name == t.vm_name) {
                continue;
            }
            points.push(PointFact {
                newest_good: newest.get(t.vm_name.as_str()).copied(),
                vm_name: t.vm_name,
                policy: p.name.clone(),
                covered_since: p.created_at,
                allowed,
            });
        }
    }
    let mut repos = Vec::new();
    for r in hub.db.list_repositories().await? {
        match crate::repository::space(std::path::Path::new(&r.path)) {
            Ok(s) => repos.push(RepoFact {
                id: r.id,
                path: r.path,
                free_bytes: s.free_bytes,
                total_bytes: s.total_bytes,
            }),
            Err(e) => tracing::warn!(repository = %r.id, error = %e, "repository space unknown"),
        }
    }
    Ok(Facts {
        tunnels,
        points,
        repos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn tunnel(state: TunnelStateKind, since: DateTime<Utc>) -> TunnelState {
        TunnelState {
            state,
            since,
            restarts: 0,
            last_error: Some("connection refused".into()),
            forwards: vec![],
            links: vec![],
        }
    }

    #[test]
    fn a_tunnel_down_past_the_limit_alerts_once_and_again_after_it_was_up() {
        let mut w = Watch::new(Settings::default());
        let mut f = Facts {
            tunnels: vec![("n1".into(), tunnel(TunnelStateKind::Down, t(0)))],
            ..Default::default()
        };
        assert!(w.check(&f, t(0) + chrono::Duration::minutes(4)).is_empty());
        let a = w.check(&f, t(0) + chrono::Duration::minutes(5));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, AlertKind::TunnelDown);
        assert!(a[0].summary.contains("n1") && a[0].summary.contains("connection refused"));
        assert!(w.check(&f, t(1)).is_empty(), "told once");
        f.tunnels[0].1 = tunnel(TunnelStateKind::Up, t(2));
        assert!(w.check(&f, t(2)).is_empty());
        f.tunnels[0].1 = tunnel(TunnelStateKind::Connecting, t(3));
        assert_eq!(w.check(&f, t(4)).len(), 1, "down again after it was up");
    }

    #[test]
    fn a_vm_past_its_policy_allowance_alerts_until_a_good_point_arrives() {
        let mut w = Watch::new(Settings::default());
        let mut f = Facts {
            points: vec![PointFact {
                vm_name: "web01".into(),
                policy: "nightly".into(),
                newest_good: Some(t(0)),
                covered_since: t(-100),
                allowed: chrono::Duration::hours(26),
            }],
            ..Default::default()
        };
        assert!(w.check(&f, t(26)).is_empty());
        let a = w.check(&f, t(27));
        assert_eq!(a.len(), 1);
        assert!(a[0].summary.contains("web01") && a[0].summary.contains("27 h old"));
        assert!(w.check(&f, t(28)).is_empty());
        f.points[0].newest_good = Some(t(28));
        assert!(w.check(&f, t(29)).is_empty());
        assert_eq!(w.check(&f, t(55)).len(), 1);
        // A new VM without any point counts from when the policy took it on.
        let mut w = Watch::new(Settings::default());
        f.points[0].newest_good = None;
        f.points[0].covered_since = t(0);
        assert!(w.check(&f, t(20)).is_empty());
        assert!(w.check(&f, t(27))[0].summary.contains("has no good point"));
    }

    #[test]
    fn a_repository_under_the_limit_alerts_once_and_clears_above_it() {
        let mut w = Watch::new(Settings::default());
        let mut f = Facts {
            repos: vec![RepoFact {
                id: "default".into(),
                path: "/srv/repo".into(),
                free_bytes: 95,
                total_bytes: 1000,
            }],
            ..Default::default()
        };
        assert_eq!(w.check(&f, t(0)).len(), 1);
        assert!(w.check(&f, t(1)).is_empty());
        f.repos[0].free_bytes = 105; // 10.5 %: not full, not yet cleared
        assert!(w.check(&f, t(2)).is_empty());
        f.repos[0].free_bytes = 95;
        assert!(
            w.check(&f, t(3)).is_empty(),
            "never cleared, not told again"
        );
        f.repos[0].free_bytes = 200;
        assert!(w.check(&f, t(4)).is_empty());
        f.repos[0].free_bytes = 10;
        assert_eq!(w.check(&f, t(5)).len(), 1);
    }
}
