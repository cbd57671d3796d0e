//! `verify --backup ID | --vm NAME | --repository ID [--wait]`, `verify list`, `verify cancel`,
//! with the same outputs and exit statuses as the backup commands: the id (or `--json`) on
//! stdout, progress and outcome on stderr. A verify job that found corrupt points exits
//! [`exit::FAILED`] with `--wait`: a script must not take it for a clean read.

use super::{exit, fail, follow, print_json};
use crate::format;
use sendense_shared::api::{Backup, BootStatus, JobStatus, VerifyJob, VerifyRequest};
use sendense_shared::client::HubClient;

/// `verify list [--json]`.
pub(super) async fn list(client: &HubClient, json: bool) -> u8 {
    match client.verify_jobs().await {
        Ok(mut list) => {
            list.sort_by_key(|v| std::cmp::Reverse(v.created_at));
            if json {
                print_json(&list);
            } else {
                print!("{}", verify_table(&list));
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `verify --backup ID | --vm NAME | --repository ID [--wait] [--json]`.
pub(super) async fn start(client: &HubClient, req: &VerifyRequest, wait: bool, json: bool) -> u8 {
    let v = match client.start_verify(req).await {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "started verify job {} of {}: {} point(s)",
        v.verify_id, v.scope, v.points_total
    );
    if !wait {
        print_verify(&v, json);
        return exit::OK;
    }
    if !json {
        println!("{}", v.verify_id);
    }
    let code = follow(
        &format!("verify job {}", v.verify_id),
        || client.verify_job(&v.verify_id),
        |v: &VerifyJob| v.status,
        progress_line,
        outcome,
        json,
    )
    .await;
    if code != exit::OK || req.boot.is_none() {
        return code;
    }
    // The job's end says what it read; whether its points booted is on the points.
    match client.backups().await {
        Ok(list) => boot_outcome(&v.verify_id, &list),
        Err(e) => fail(&e),
    }
}

/// How the boot checks of verify job `id` went, on the points of `list`: 0 when every point it
/// booted came up, else 3 (`--wait`: failed), each point that did not named with its cause.
fn boot_outcome(id: &str, list: &[Backup]) -> u8 {
    let mut code = exit::OK;
    for b in list {
        let Some(c) = b.boot_check.as_deref().filter(|c| c.verify_id == id) else {
            continue;
        };
        if c.status == BootStatus::BootOk {
            eprintln!(
                "point {} booted: {}",
                b.backup_id,
                c.detail.as_deref().unwrap_or("up")
            );
        } else {
            eprintln!(
                "point {} did not boot ({}): {}",
                b.backup_id,
                c.status.as_str(),
                c.detail.as_deref().unwrap_or("no detail from the hub")
            );
            for line in c.console_tail.iter().rev().take(5).rev() {
                eprintln!("  console: {line}");
            }
            code = exit::FAILED;
        }
    }
    code
}

/// `verify cancel ID [--json]`.
pub(super) async fn cancel(client: &HubClient, id: &str, json: bool) -> u8 {
    match client.cancel_verify(id).await {
        Ok(v) => {
            eprintln!("verify job {} is {}", v.verify_id, v.status.as_str());
            print_verify(&v, json);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn print_verify(v: &VerifyJob, json: bool) {
    if json {
        print_json(v);
    } else {
        println!("{}", v.verify_id);
    }
}

/// One progress line: `v-1 running 2/5 points 40% 1.0 GiB/2.5 GiB`.
pub fn progress_line(v: &VerifyJob) -> String {
    format!(
        "{} {} {}/{} points {}% {}/{}",
        v.verify_id,
        v.status.as_str(),
        v.points_done,
        v.points_total,
        format::percent(v.bytes_read, v.bytes_total),
        format::bytes(v.bytes_read),
        format::bytes(v.bytes_total)
    )
}

/// Say how a finished verify job ended and pick the exit status.
fn outcome(v: &VerifyJob) -> u8 {
    match v.status {
        JobStatus::Completed if v.corrupt.is_empty() => {
            eprintln!(
                "verify job {} completed: {} point(s) equal to their stored checksums, {} read",
                v.verify_id,
                v.points_done,
                format::bytes(v.bytes_read)
            );
            exit::OK
        }
        JobStatus::Completed => {
            eprintln!(
                "verify job {} found {} corrupt point(s): {} (they and the points depending on \
                 them are marked corrupt; the VM's next backup is a full)",
                v.verify_id,
                v.corrupt.len(),
                corrupt_list(v)
            );
            exit::FAILED
        }
        JobStatus::Cancelled => {
            eprintln!("verify job {} was cancelled", v.verify_id);
            exit::CANCELLED
        }
        _ => {
            eprintln!(
                "verify job {} failed: {}",
                v.verify_id,
                v.error_message
                    .as_deref()
                    .unwrap_or("no error message from the hub")
            );
            exit::FAILED
        }
    }
}

fn corrupt_list(v: &VerifyJob) -> String {
    v.corrupt
        .iter()
        .map(|b| b.0.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The human table of `verify list`, in 80 columns: short ids, the scope's point by its short
/// id, the corrupt points cut to fit (all of them, and the trigger, in `--json`).
pub fn verify_table(list: &[VerifyJob]) -> String {
    use super::table::{Align::*, Cut, Table, short, short_len};
    let len = short_len(list.iter().map(|v| v.verify_id.as_str()));
    let scope = |v: &VerifyJob| match v.scope.strip_prefix("backup:") {
        Some(id) => format!("backup:{}", short(id, super::table::MIN_PREFIX)),
        None => v.scope.clone(),
    };
    let corrupt = |v: &VerifyJob| {
        if v.corrupt.is_empty() {
            "-".to_string()
        } else {
            let ids: Vec<String> = v
                .corrupt
                .iter()
                .map(|b| short(&b.0, super::table::MIN_PREFIX))
                .collect();
            ids.join(",")
        }
    };
    let mut t = Table::new(&[
        ("ID", Left),
        ("SCOPE", Left),
        ("STATUS", Left),
        ("POINTS", Right),
        ("READ", Right),
        ("CREATED", Left),
        ("CORRUPT", Left),
    ])
    .flex(6, Cut::End);
    for v in list {
        t.row(vec![
            short(&v.verify_id, len),
            format::truncate(&scope(v), 24),
            v.status.as_str().into(),
            format!("{}/{}", v.points_done, v.points_total),
            format::bytes(v.bytes_read),
            format::stamp(v.created_at),
            corrupt(v),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn job() -> VerifyJob {
        VerifyJob {
            verify_id: "v-1".into(),
            scope: "vm:pgtest1".into(),
            trigger: "manual".into(),
            status: JobStatus::Completed,
            points_total: 2,
            points_done: 2,
            bytes_total: 4 << 20,
            bytes_read: 1 << 20,
            corrupt: vec!["b-0a1b".into()],
            created_at: chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            started_at: None,
            completed_at: None,
            error_message: None,
        }
    }

    #[test]
    fn a_point_that_did_not_boot_fails_the_wait_and_other_jobs_checks_do_not_count() {
        use sendense_shared::api::BootCheck;
        use sendense_shared::ids::BackupId;
        let check = |verify_id: &str, status| {
            Some(Box::new(BootCheck {
                status,
                verify_id: verify_id.into(),
                started_at: chrono::Utc::now(),
                checked_at: None,
                detail: Some("QEMU exited".into()),
                console_tail: vec!["Failed to mount /dev/vda".into()],
                boot_ms: None,
                qemu_pid: None,
            }))
        };
        let point = |id: &str, c| Backup {
            backup_id: BackupId(id.into()),
            boot_check: c,
            ..crate::fixtures::vsphere_job()
        };
        let ok = point("b-ok", check("v-1", BootStatus::BootOk));
        let other = point("b-other", check("v-0", BootStatus::BootFailed));
        let none = point("b-none", None);
        assert_eq!(
            boot_outcome("v-1", &[ok.clone(), other.clone(), none]),
            exit::OK
        );
        let bad = point("b-bad", check("v-1", BootStatus::BootFailed));
        assert_eq!(boot_outcome("v-1", &[ok, bad, other]), exit::FAILED);
        let cut = point("b-cut", check("v-1", BootStatus::Interrupted));
        assert_eq!(boot_outcome("v-1", &[cut]), exit::FAILED);
    }

    #[test]
    fn a_job_with_corrupt_points_is_a_failure_and_the_table_names_them() {
        let v = job();
        assert_eq!(outcome(&v), exit::FAILED);
        assert_eq!(
            progress_line(&v),
            "v-1 completed 2/2 points 25% 1.0 MiB/4.0 MiB"
        );
        let table = verify_table(&[v]);
        let row = table.lines().nth(1).unwrap();
        assert!(
            row == "v-1  vm:pgtest1  completed     2/2  1.0 MiB  01-02 03:04  b-0a1b",
            "{table}"
        );
        let clean = VerifyJob {
            corrupt: vec![],
            ..job()
        };
        assert_eq!(outcome(&clean), exit::OK);
    }

    #[test]
    fn the_scope_is_exactly_one_of_backup_vm_repository_unless_a_subcommand() {
        use crate::cli::{Cli, Command, VerifyCommand};
        use clap::Parser;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("sendense-console").chain(args.iter().copied()))
        };
        match parse(&["verify", "--vm", "pg1", "--wait"]).unwrap().command {
            Some(Command::Verify {
                command: None,
                start,
            }) => {
                assert_eq!(start.vm.as_deref(), Some("pg1"));
                assert!(start.wait && start.backup.is_none() && start.repository.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["verify", "list"]).unwrap().command,
            Some(Command::Verify {
                command: Some(VerifyCommand::List { json: false }),
                ..
            })
        ));
        for bad in [
            &["verify"][..],
            &["verify", "--vm", "a", "--backup", "b"],
            &["verify", "--vm", "a", "list"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }
}
