//! `backups list`, `backup start`, `backup cancel`.

use super::{exit, fail, follow, print_json};
use crate::format;
use sendense_shared::api::{Backup, BackupRequest, BackupType, JobStatus};
use sendense_shared::client::HubClient;
use sendense_shared::ids::BackupId;

/// `backups list [--json]`.
pub(super) async fn list(client: &HubClient, json: bool) -> u8 {
    match client.backups().await {
        Ok(mut list) => {
            list.sort_by_key(|b| std::cmp::Reverse(b.created_at));
            if json {
                print_json(&list);
            } else {
                print!("{}", backups_table(&list));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// What `backup start` asks for.
pub(super) struct Start {
    pub vm: String,
    pub backup_type: BackupType,
    pub repository: Option<String>,
    pub require_application_consistency: bool,
}

/// `backup start VM --type T [--repository ID] [--require-application-consistency] [--wait]
/// [--json]`.
pub(super) async fn start(client: &HubClient, start: Start, wait: bool, json: bool) -> u8 {
    let Start {
        vm,
        backup_type,
        repository,
        require_application_consistency,
    } = start;
    let repository_id = match repository {
        Some(r) => r,
        None => match pick_repository(client).await {
            Ok(r) => r,
            Err(code) => return code,
        },
    };
    let req = BackupRequest {
        vm_name: vm,
        repository_id,
        backup_type,
        require_application_consistency,
    };
    let backup = match client.start_backup(&req).await {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "started {} backup {} of {} into {}",
        backup.backup_type.as_str(),
        backup.backup_id,
        backup.vm_name,
        backup.repository_id
    );
    if !wait {
        print_backup(&backup, json);
        return exit::OK;
    }
    if !json {
        println!("{}", backup.backup_id);
    }
    wait_for(client, &backup.backup_id, json).await
}

/// `backup cancel ID [--json]`.
pub(super) async fn cancel(client: &HubClient, id: &BackupId, json: bool) -> u8 {
    match client.cancel_backup(id).await {
        Ok(b) => {
            eprintln!(
                "backup {} of {} is {}",
                b.backup_id,
                b.vm_name,
                b.status.as_str()
            );
            print_backup(&b, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn print_backup(b: &Backup, json: bool) {
    if json {
        print_json(b);
    } else {
        println!("{}", b.backup_id);
    }
}

pub(super) async fn pick_repository(client: &HubClient) -> Result<String, u8> {
    let repos = client.repositories().await.map_err(|e| fail(&e))?;
    match repos.as_slice() {
        [only] => Ok(only.id.clone()),
        [] => {
            eprintln!(
                "error: the hub has no repository; add one first (POST /api/v1/repositories)"
            );
            Err(exit::ERROR)
        }
        many => {
            let ids: Vec<&str> = many.iter().map(|r| r.id.as_str()).collect();
            eprintln!(
                "error: the hub has several repositories ({}): pick one with --repository ID",
                ids.join(", ")
            );
            Err(exit::ERROR)
        }
    }
}

/// One progress line: `b-1 running 37% 7.4 GiB/20.0 GiB · 2000 running 39% · 2001 running 27%`.
pub fn progress_line(b: &Backup) -> String {
    let mut line = format!(
        "{} {} {}% {}/{}",
        b.backup_id,
        b.status.as_str(),
        format::percent(format::done_bytes(b), b.total_bytes),
        format::bytes(b.bytes_transferred),
        format::bytes(b.total_bytes)
    );
    for d in &b.disk_results {
        line.push_str(&format!(
            " · {} {} {}%",
            d.disk_key,
            d.status.as_str(),
            format::percent(d.bytes_done, d.bytes_total)
        ));
    }
    line
}

async fn wait_for(client: &HubClient, id: &BackupId, json: bool) -> u8 {
    follow(
        &format!("backup {id}"),
        || client.backup(id),
        |b: &Backup| b.status,
        progress_line,
        outcome,
        json,
    )
    .await
}

/// Say how a finished job ended and pick the exit status.
fn outcome(b: &Backup) -> u8 {
    match b.status {
        JobStatus::Completed => {
            let took = match (b.started_at, b.completed_at) {
                (Some(s), Some(c)) => {
                    format!(" in {}", format::duration_secs((c - s).num_seconds()))
                }
                _ => String::new(),
            };
            eprintln!(
                "backup {} completed: {} written{took}",
                b.backup_id,
                format::bytes(b.bytes_transferred)
            );
            exit::OK
        }
        JobStatus::Cancelled => {
            eprintln!("backup {} was cancelled", b.backup_id);
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "backup {} failed: {}",
                b.backup_id,
                b.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            for d in &b.disk_results {
                if let Some(e) = &d.error_message {
                    eprintln!("  disk {}: {e}", d.disk_key);
                }
            }
            exit::FAILED
        }
    }
}

/// The human table of `backups list`, in 80 columns: short ids (a prefix every command taking
/// an id accepts), the VM name cut to fit, WRITTEN/SIZE the bytes the writer wrote of the disks'
/// virtual size (an incremental writes a little of a large disk); every field is in `--json`.
pub fn backups_table(list: &[Backup]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let len = short_len(list.iter().map(|b| b.backup_id.0.as_str()));
    let mut t = Table::new(&[
        ("ID", Left),
        ("VM", Left),
        ("TYPE", Left),
        ("STATUS", Left),
        ("DONE", Right),
        ("WRITTEN/SIZE", Right),
        ("CREATED", Left),
    ])
    .flex(1, Cut::End);
    for b in list {
        t.row(vec![
            short(&b.backup_id.0, len),
            b.vm_name.clone(),
            type_word(b.backup_type).into(),
            b.status.as_str().into(),
            format!("{}%", format::percent(format::done_bytes(b), b.total_bytes)),
            format!(
                "{}/{}",
                format::bytes(b.bytes_transferred),
                format::bytes(b.total_bytes)
            ),
            format::stamp(b.created_at),
        ]);
    }
    t.render()
}

/// `full` or `incr`: the backup type in a table column.
pub fn type_word(t: sendense_shared::api::BackupType) -> &'static str {
    match t {
        sendense_shared::api::BackupType::Full => "full",
        sendense_shared::api::BackupType::Incremental => "incr",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    /// A CBT incremental that wrote 212 MiB of a 40 GiB disk is done, not 0 % done.
    #[test]
    fn progress_counts_disks_done_and_bytes_written() {
        let b = fixtures::vsphere_job();
        assert_eq!(
            progress_line(&b),
            "b-4e11c0a7 completed 100% 212.0 MiB/40.0 GiB · 2000 completed 100%"
        );
        let table = backups_table(&[b]);
        let row = table.lines().nth(1).unwrap();
        assert!(row.contains(" 100%  212.0 MiB/40.0 GiB "), "{table}");
        let running = fixtures::running_job([8 * fixtures::GIB, 2 * fixtures::GIB]);
        assert!(progress_line(&running).contains(" running 50% 10.0 GiB/20.0 GiB"));
    }
}
