//! `points list VM`, `point protect|unprotect ID`, `prune VM [--dry-run] [--wait]`: a VM's
//! points with the rule that keeps each, protection from pruning, and pruning itself (the
//! dry run lists what a prune would keep by which rule and what it would remove, with the
//! bytes each removal frees; without it the hub starts a prune job).

use super::{exit, fail, follow, print_json};
use crate::app::policies::{action_word, retention_summary};
use crate::format;
use sendense_shared::api::{
    JobStatus, KeepReason, PruneAction, PruneJob, PrunePoint, PruneRequest,
};
use sendense_shared::client::HubClient;
use sendense_shared::ids::BackupId;

fn kept_word(k: Option<KeepReason>) -> &'static str {
    match k {
        None => "-",
        Some(KeepReason::Protected) => "protected",
        Some(KeepReason::Last) => "last",
        Some(KeepReason::Hourly) => "hourly",
        Some(KeepReason::Daily) => "daily",
        Some(KeepReason::Weekly) => "weekly",
        Some(KeepReason::Monthly) => "monthly",
        Some(KeepReason::Yearly) => "yearly",
    }
}

/// The points table of `points list` and `prune --dry-run`, newest first, in 80 columns.
pub fn points_table(points: &[PrunePoint]) -> String {
    use super::table::{Align::*, Table, short, short_len};
    let len = short_len(points.iter().map(|p| p.backup_id.0.as_str()));
    let mut t = Table::new(&[
        ("CREATED", Left),
        ("ID", Left),
        ("TYPE", Left),
        ("PROT", Left),
        ("KEPT BY", Left),
        ("AT PRUNE", Left),
        ("STORED", Right),
        ("FREES", Right),
    ]);
    for p in points {
        t.row(vec![
            format::stamp(p.created_at),
            short(&p.backup_id.0, len),
            super::backups::type_word(p.backup_type).into(),
            if p.protected { "yes" } else { "-" }.into(),
            kept_word(p.kept_by).into(),
            action_word(p.action).into(),
            format::bytes(p.bytes_used),
            if p.bytes_freed > 0 {
                format::bytes(p.bytes_freed)
            } else {
                "-".into()
            },
        ]);
    }
    t.render()
}

/// `points list VM [--json]`.
pub(super) async fn list(client: &HubClient, vm: &str, json: bool) -> u8 {
    match client.vm_points(vm).await {
        Ok(points) => {
            if json {
                print_json(&points);
            } else {
                print!("{}", points_table(&points));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `point protect|unprotect ID [--json]`.
pub(super) async fn protect(client: &HubClient, id: &BackupId, on: bool, json: bool) -> u8 {
    match client.set_protected(id, on).await {
        Ok(b) => {
            eprintln!(
                "point {} of {} is {}",
                b.backup_id,
                b.vm_name,
                if b.protected {
                    "protected: no prune removes it"
                } else {
                    "not protected"
                }
            );
            if json {
                print_json(&b);
            } else {
                println!("{}", b.backup_id);
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `prune VM [--dry-run] [--wait] [--json]`.
pub(super) async fn prune(
    client: &HubClient,
    vm: &str,
    dry_run: bool,
    wait: bool,
    json: bool,
) -> u8 {
    let req = PruneRequest {
        vm_name: vm.to_string(),
        retention: None,
        dry_run,
    };
    if dry_run {
        return match client.prune_plan(&req).await {
            Ok(plan) => {
                let removed = plan
                    .points
                    .iter()
                    .filter(|p| p.action != PruneAction::Keep)
                    .count();
                eprintln!(
                    "dry run of a prune of {} (keep {}): keeps {}, removes {removed}, frees {}",
                    plan.vm_name,
                    retention_summary(&plan.retention).unwrap_or_else(|| "nothing pruned".into()),
                    plan.points.len() - removed,
                    format::bytes(plan.bytes_freed)
                );
                if json {
                    print_json(&plan);
                } else {
                    print!("{}", points_table(&plan.points));
                }
                exit::OK
            }
            Err(e) => fail(&e),
        };
    }
    let job = match client.start_prune(&req).await {
        Ok(j) => j,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "started prune {} of {}: {}",
        job.prune_id,
        job.vm_name,
        summary(&job)
    );
    if !wait {
        if json {
            print_json(&job);
        } else {
            println!("{}", job.prune_id);
        }
        return exit::OK;
    }
    if !json {
        println!("{}", job.prune_id);
    }
    follow(
        &format!("prune {}", job.prune_id),
        || client.prune_job(&job.prune_id),
        |j: &PruneJob| j.status,
        progress_line,
        outcome,
        json,
    )
    .await
}

fn summary(j: &PruneJob) -> String {
    let removed = j
        .plan
        .points
        .iter()
        .filter(|p| p.action != PruneAction::Keep)
        .count();
    format!(
        "removes {removed} point(s), frees {}",
        format::bytes(j.plan.bytes_freed)
    )
}

/// `p-1 running 2/4 steps 50% 1.0 GiB/2.0 GiB merged`.
pub fn progress_line(j: &PruneJob) -> String {
    format!(
        "{} {} {}/{} steps {}% {}/{} merged",
        j.prune_id,
        j.status.as_str(),
        j.steps_done,
        j.steps_total,
        format::percent(j.bytes_done, j.bytes_total),
        format::bytes(j.bytes_done),
        format::bytes(j.bytes_total)
    )
}

fn outcome(j: &PruneJob) -> u8 {
    match j.status {
        JobStatus::Completed => {
            eprintln!("prune {} completed: {}", j.prune_id, summary(j));
            exit::OK
        }
        JobStatus::Cancelled => {
            eprintln!("prune {} was cancelled", j.prune_id);
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "prune {} failed: {}",
                j.prune_id,
                j.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            exit::FAILED
        }
    }
}
