//! `restores list`, `restore start`, `restore cancel`, with the same outputs and exit statuses
//! as the backup commands: the id (or `--json`) on stdout, progress and outcome on stderr.

use super::{exit, fail, follow, print_json};
use crate::format;
use sendense_shared::api::{JobStatus, Restore, RestoreRequest};
use sendense_shared::client::HubClient;

/// `restores list [--json]`.
pub(super) async fn list(client: &HubClient, json: bool) -> u8 {
    match client.restores().await {
        Ok(mut list) => {
            list.sort_by_key(|r| std::cmp::Reverse(r.created_at));
            if json {
                print_json(&list);
            } else {
                print!("{}", restores_table(&list));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `restore start BACKUP_ID --node NODE --path PATH [--disk KEY] [--wait] [--json]`.
pub(super) async fn start(client: &HubClient, req: &RestoreRequest, wait: bool, json: bool) -> u8 {
    let restore = match client.start_restore(req).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "started restore {} of backup {} ({} disk {}) to {}:{}",
        restore.restore_id,
        restore.backup_id,
        restore.vm_name,
        restore.disk_key,
        restore.target.node,
        restore.target.path
    );
    if !wait {
        print_restore(&restore, json);
        return exit::OK;
    }
    if !json {
        println!("{}", restore.restore_id);
    }
    wait_for(client, &restore.restore_id, json).await
}

/// `restore cancel ID [--json]`.
pub(super) async fn cancel(client: &HubClient, id: &str, json: bool) -> u8 {
    match client.cancel_restore(id).await {
        Ok(r) => {
            eprintln!(
                "restore {} of {} is {}",
                r.restore_id,
                r.vm_name,
                r.status.as_str()
            );
            print_restore(&r, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn print_restore(r: &Restore, json: bool) {
    if json {
        print_json(r);
    } else {
        println!("{}", r.restore_id);
    }
}

/// One progress line: `r-1 running 25% 256.0 MiB/1.0 GiB`.
pub fn progress_line(r: &Restore) -> String {
    format!(
        "{} {} {}% {}/{}",
        r.restore_id,
        r.status.as_str(),
        format::percent(r.bytes_done, r.bytes_total),
        format::bytes(r.bytes_done),
        format::bytes(r.bytes_total)
    )
}

async fn wait_for(client: &HubClient, id: &str, json: bool) -> u8 {
    follow(
        &format!("restore {id}"),
        || client.restore(id),
        |r: &Restore| r.status,
        progress_line,
        outcome,
        json,
    )
    .await
}

/// Say how a finished restore ended and pick the exit status.
fn outcome(r: &Restore) -> u8 {
    match r.status {
        JobStatus::Completed => {
            let took = r
                .completed_at
                .map(|c| {
                    format!(
                        " in {}",
                        format::duration_secs((c - r.created_at).num_seconds())
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "restore {} completed: {} written to {}:{}{took}",
                r.restore_id,
                format::bytes(r.bytes_done),
                r.target.node,
                r.target.path
            );
            exit::OK
        }
        JobStatus::Cancelled => {
            eprintln!("restore {} was cancelled", r.restore_id);
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "restore {} failed: {}",
                r.restore_id,
                r.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            exit::FAILED
        }
    }
}

/// The human table of `restores list`, in 80 columns: short ids, the target path cut at its
/// start (the file name stays); sizes and dates are in `--json`.
pub fn restores_table(list: &[Restore]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let len = short_len(list.iter().map(|r| r.restore_id.as_str()));
    let blen = short_len(list.iter().map(|r| r.backup_id.0.as_str()));
    let mut t = Table::new(&[
        ("ID", Left),
        ("BACKUP", Left),
        ("VM", Left),
        ("DISK", Left),
        ("STATUS", Left),
        ("DONE", Right),
        ("NODE", Left),
        ("PATH", Left),
    ])
    .flex(7, Cut::Start);
    for r in list {
        t.row(vec![
            short(&r.restore_id, len),
            short(&r.backup_id.0, blen),
            format::truncate(&r.vm_name, 16),
            r.disk_key.to_string(),
            r.status.as_str().into(),
            format!("{}%", format::percent(r.bytes_done, r.bytes_total)),
            format::truncate(&r.target.node, 16),
            r.target.path.clone(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, GIB};

    #[test]
    fn progress_and_table_show_bytes_of_the_one_disk() {
        let r = fixtures::running_restore(4 * GIB);
        assert_eq!(progress_line(&r), "r-5d1e8a40 running 25% 4.0 GiB/16.0 GiB");
        let table = restores_table(&[r]);
        let row = table.lines().nth(1).unwrap();
        assert_eq!(
            row, "r-5d1e8a  b-0a1b2c  pgtest1  2000  running   25%  node-a  …gtest1-restored.qcow2",
            "{table}"
        );
        assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");
    }
}
