//! `policy create|list|show|update|delete|run-now`. A policy is named on the command line by
//! its id or its name. `create` and `update` build the hub's [`PolicyRequest`] from flags or
//! `--file policy.json` (its JSON), flags overriding the file; `update` starts from the stored
//! policy (a `PUT` is a whole replacement), so it changes only what is given. The hub checks
//! the request: a refusal (422 naming the field) is printed with its detail, exit status 1.

use super::policy_args::{ChainLimitArg, PolicyFields};
use super::{exit, fail, print_json};
use crate::app::policies::{request_of, retention_summary, rule_summary, selector_summary};
use crate::format;
use sendense_shared::api::{ChainLimit, Policy, PolicyRequest, PolicyRun};
use sendense_shared::client::HubClient;
use std::path::{Path, PathBuf};

/// `0` turns an optional count off.
fn nonzero(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

impl PolicyFields {
    /// Every field given, written into `req`.
    pub fn apply(&self, req: &mut PolicyRequest) {
        if !(self.vms.is_empty() && self.patterns.is_empty() && self.nodes.is_empty()) {
            req.vms.names = self.vms.clone();
            req.vms.patterns = self.patterns.clone();
            req.vms.nodes = self.nodes.clone();
        }
        if let Some(r) = &self.repository {
            req.repository_id = r.clone();
        }
        if let Some(s) = &self.schedule {
            req.schedule = s.clone();
        }
        if let Some(t) = &self.timezone {
            req.timezone = t.clone();
        }
        let rule = &mut req.backup_rule;
        if let Some(n) = self.full_every_days {
            rule.full_every_days = nonzero(n);
        }
        if let Some(n) = self.full_every_runs {
            rule.full_every_runs = nonzero(n);
        }
        if let Some(d) = &self.weekly_full_on {
            rule.weekly_full_on = (d != "none" && !d.is_empty()).then(|| d.clone());
        }
        let keep = &mut req.retention;
        for (flag, field) in [
            (self.keep_last, &mut keep.keep_last),
            (self.keep_hourly, &mut keep.keep_hourly),
            (self.keep_daily, &mut keep.keep_daily),
            (self.keep_weekly, &mut keep.keep_weekly),
            (self.keep_monthly, &mut keep.keep_monthly),
            (self.keep_yearly, &mut keep.keep_yearly),
        ] {
            if let Some(n) = flag {
                *field = Some(n);
            }
        }
        if let Some(n) = self.max_chain_length {
            req.max_chain_length = nonzero(n);
        }
        if let Some(c) = self.chain_limit {
            req.chain_limit = match c {
                ChainLimitArg::Full => ChainLimit::Full,
                ChainLimitArg::Synthetic => ChainLimit::Synthetic,
            };
        }
        if let Some(p) = self.priority {
            req.priority = p;
        }
        if let Some(w) = self.queue_window {
            req.queue_window_secs = w;
        }
        if self.enabled {
            req.enabled = true;
        }
        if self.boot_check && req.boot_check.is_none() {
            req.boot_check = Some(Default::default());
        }
        if self.no_boot_check {
            req.boot_check = None;
        }
        if self.disabled {
            req.enabled = false;
        }
    }
}

/// A policy request as JSON in a file; a file that cannot be read or is not one is bad usage.
fn read_file(path: &Path) -> Result<PolicyRequest, u8> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read {}: {e}", path.display());
        exit::USAGE
    })?;
    serde_json::from_str(&text).map_err(|e| {
        eprintln!(
            "error: {} is not a policy (the JSON of POST /api/v1/policies): {e}",
            path.display()
        );
        exit::USAGE
    })
}

/// The policy named `arg` by id or by name.
async fn resolve(client: &HubClient, arg: &str) -> Result<Policy, u8> {
    let list = client.policies().await.map_err(|e| fail(&e))?;
    let mut found = list.iter().filter(|p| p.id == arg || p.name == arg);
    match (found.next(), found.next()) {
        (Some(p), None) => Ok(p.clone()),
        (Some(_), Some(_)) => {
            eprintln!("error: several policies are named {arg:?}: name one by its id");
            Err(exit::ERROR)
        }
        (None, _)
            if arg.len() >= super::table::MIN_PREFIX
                && list.iter().any(|p| p.id.starts_with(arg)) =>
        {
            // The short id a table shows.
            let id = super::table::pick("policy", arg, list.iter().map(|p| p.id.as_str()))
                .map_err(|why| {
                    eprintln!("error: {why}");
                    exit::ERROR
                })?;
            Ok(list
                .into_iter()
                .find(|p| p.id == id)
                .expect("picked from the list"))
        }
        (None, _) => {
            let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
            eprintln!(
                "error: no policy with id or name {arg:?} (policies: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
            Err(exit::ERROR)
        }
    }
}

fn print_policy(p: &Policy, json: bool) {
    if json {
        print_json(p);
    } else {
        println!("{}", p.id);
    }
}

/// `policy create [NAME] [--file F] [flags] [--json]`.
pub(super) async fn create(
    client: &HubClient,
    name: Option<String>,
    fields: &PolicyFields,
    file: Option<PathBuf>,
    json: bool,
) -> u8 {
    let mut req = match &file {
        Some(f) => match read_file(f) {
            Ok(r) => r,
            Err(code) => return code,
        },
        None => PolicyRequest {
            name: String::new(),
            vms: Default::default(),
            repository_id: String::new(),
            schedule: String::new(),
            timezone: "UTC".into(),
            backup_rule: Default::default(),
            retention: Default::default(),
            max_chain_length: None,
            chain_limit: ChainLimit::Full,
            enabled: true,
            priority: 0,
            queue_window_secs: sendense_shared::api::DEFAULT_QUEUE_WINDOW_SECS,
            boot_check: None,
        },
    };
    if let Some(n) = name {
        req.name = n;
    }
    fields.apply(&mut req);
    if req.name.is_empty() {
        eprintln!("error: a policy needs a name: `policy create NAME ...` (or \"name\" in --file)");
        return exit::USAGE;
    }
    if req.schedule.is_empty() {
        eprintln!("error: a policy needs a schedule: --schedule CRON (or \"schedule\" in --file)");
        return exit::USAGE;
    }
    if req.repository_id.is_empty() {
        match super::backups::pick_repository(client).await {
            Ok(r) => req.repository_id = r,
            Err(code) => return code,
        }
    }
    match client.create_policy(&req).await {
        Ok(p) => {
            eprintln!("created policy {} ({})", p.name, p.id);
            print_policy(&p, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `policy update ID|NAME [--name NAME] [--file F] [flags] [--json]`.
pub(super) async fn update(
    client: &HubClient,
    arg: &str,
    name: Option<String>,
    fields: &PolicyFields,
    file: Option<PathBuf>,
    json: bool,
) -> u8 {
    let stored = match resolve(client, arg).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut req = match &file {
        Some(f) => match read_file(f) {
            Ok(r) => r,
            Err(code) => return code,
        },
        None => request_of(&stored),
    };
    if let Some(n) = name {
        req.name = n;
    }
    fields.apply(&mut req);
    match client.update_policy(&stored.id, &req).await {
        Ok(p) => {
            eprintln!("updated policy {} ({})", p.name, p.id);
            print_policy(&p, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `policy list [--json]`.
pub(super) async fn list(client: &HubClient, json: bool) -> u8 {
    match client.policies().await {
        Ok(mut list) => {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                print_json(&list);
            } else {
                print!("{}", policies_table(&list));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `policy show ID|NAME [--json]`: the policy, and its recent runs.
pub(super) async fn show(client: &HubClient, arg: &str, json: bool) -> u8 {
    let p = match resolve(client, arg).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let p = match client.policy(&p.id).await {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if json {
        print_json(&p);
        return exit::OK;
    }
    print!("{}", policy_text(&p));
    match client.policy_runs(&p.id).await {
        Ok(runs) => print!("\n{}", runs_table(&runs)),
        Err(e) => return fail(&e),
    }
    exit::OK
}

/// `policy delete ID|NAME [--json]`.
pub(super) async fn delete(client: &HubClient, arg: &str, json: bool) -> u8 {
    let p = match resolve(client, arg).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    match client.delete_policy(&p.id).await {
        Ok(()) => {
            eprintln!("deleted policy {} ({})", p.name, p.id);
            if json {
                print_json(&serde_json::json!({ "deleted": p.id }));
            } else {
                println!("{}", p.id);
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `policy run-now ID|NAME [--json]`: prints the ids of the runs it queued.
pub(super) async fn run_now(client: &HubClient, arg: &str, json: bool) -> u8 {
    let p = match resolve(client, arg).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    match client.run_policy_now(&p.id).await {
        Ok(runs) => {
            eprintln!("policy {}: {} run(s) queued", p.name, runs.len());
            if json {
                print_json(&runs);
            } else {
                for r in &runs {
                    println!("{}\t{}", r.run_id, r.vm_name);
                }
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn stamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

fn last_run(p: &Policy) -> String {
    match &p.last_run {
        Some(r) => format!("{} {}", r.status.as_str(), r.vm_name),
        None => "-".into(),
    }
}

fn next_run(p: &Policy) -> String {
    match (p.enabled, p.next_run) {
        (false, _) => "disabled".into(),
        (true, Some(t)) => stamp(t),
        (true, None) => "-".into(),
    }
}

/// The human table of `policy list`, in 80 columns: short ids, the cron expression (its time
/// zone, the repository and the whole selector are in `policy show` and `--json`), the next run
/// in UTC, the last run's outcome.
pub fn policies_table(list: &[Policy]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let len = short_len(list.iter().map(|p| p.id.as_str()));
    let mut t = Table::new(&[
        ("ID", Left),
        ("NAME", Left),
        ("SCHEDULE", Left),
        ("VMS", Left),
        ("NEXT UTC", Left),
        ("LAST RUN", Left),
        ("QUEUED", Right),
    ])
    .flex(3, Cut::End);
    for p in list {
        t.row(vec![
            short(&p.id, len),
            format::truncate(&p.name, 14),
            format::truncate(&p.schedule, 13),
            selector_summary(&p.vms),
            match (p.enabled, p.next_run) {
                (false, _) => "disabled".into(),
                (true, Some(t)) => format::stamp(t),
                (true, None) => "-".into(),
            },
            p.last_run
                .as_ref()
                .map(|r| r.status.as_str().to_string())
                .unwrap_or_else(|| "-".into()),
            p.queued.to_string(),
        ]);
    }
    t.render()
}

/// `policy show`: one field a line.
pub fn policy_text(p: &Policy) -> String {
    let mut rule = rule_summary(&p.backup_rule);
    if let Some(c) = crate::app::policies::chain_summary(p) {
        rule.push_str(&format!(" · {c}"));
    }
    let rows = [
        ("id", p.id.clone()),
        ("name", p.name.clone()),
        ("enabled", p.enabled.to_string()),
        ("vms", selector_summary(&p.vms)),
        ("repository", p.repository_id.clone()),
        ("schedule", format!("{} ({})", p.schedule, p.timezone)),
        ("next run", next_run(p)),
        ("backup", rule),
        (
            "keep",
            retention_summary(&p.retention).unwrap_or_else(|| "no rule: nothing is pruned".into()),
        ),
        ("priority", p.priority.to_string()),
        (
            "queue window",
            format::duration_secs(p.queue_window_secs as i64),
        ),
        ("queued", p.queued.to_string()),
        (
            "boot check",
            if p.boot_check.is_some() {
                "each new point, before the prune".to_string()
            } else {
                "no".to_string()
            },
        ),
        ("last run", last_run(p)),
    ];
    rows.iter().map(|(k, v)| format!("{k:<13} {v}\n")).collect()
}

/// The runs of `policy show`, newest planned first, in 80 columns (the reason cut to fit).
pub fn runs_table(runs: &[PolicyRun]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let mut runs: Vec<&PolicyRun> = runs.iter().collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.planned_at));
    let len = short_len(
        runs.iter()
            .filter_map(|r| r.backup_id.as_ref().map(|b| b.0.as_str())),
    );
    let mut t = Table::new(&[
        ("PLANNED", Left),
        ("VM", Left),
        ("KIND", Left),
        ("STATUS", Left),
        ("JOB", Left),
        ("REASON", Left),
    ])
    .flex(5, Cut::End);
    for r in runs {
        let kind = if r.manual {
            "manual"
        } else if r.late {
            "late"
        } else {
            "sched"
        };
        t.row(vec![
            stamp(r.planned_at),
            format::truncate(&r.vm_name, 16),
            kind.into(),
            r.status.as_str().into(),
            r.backup_id
                .as_ref()
                .map(|b| short(&b.0, len))
                .unwrap_or_else(|| "-".into()),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_replace_only_what_they_name_and_zero_turns_off() {
        let p = &crate::fixtures::policies()[0];
        let mut req = request_of(p);
        let fields = PolicyFields {
            keep_daily: Some(14),
            max_chain_length: Some(0),
            weekly_full_on: Some("none".into()),
            disabled: true,
            ..Default::default()
        };
        fields.apply(&mut req);
        assert_eq!(req.retention.keep_daily, Some(14));
        assert_eq!(req.retention.keep_last, p.retention.keep_last, "untouched");
        assert_eq!(req.max_chain_length, None);
        assert_eq!(req.backup_rule.weekly_full_on, None);
        assert!(!req.enabled);
        assert_eq!(req.vms, p.vms, "no selector flag: the selector stays");
        PolicyFields {
            patterns: vec!["db-*".into()],
            ..Default::default()
        }
        .apply(&mut req);
        assert!(req.vms.names.is_empty() && req.vms.patterns == ["db-*"]);
    }
}
