//! Ninety simulated days of one policy on the real stack (hub with its test clock, node, QEMU,
//! qemu-nbd, qemu-img): a daily incremental with a weekly full, `keep-daily=7`,
//! `keep-weekly=4`, `keep-monthly=3`, guest writes between the runs.
//!
//! The test keeps its own books: for every completed point, its instant and the SHA-256 of each
//! disk as the VM read at that instant. At the end the surviving set must equal what the Proxmox
//! Backup Server rules give (computed here, independently of the hub's `retention`), a sample
//! of the survivors (the oldest, merged ones included) must read equal to their instants, and
//! the repository must hold no file that no point owns.

use super::sys::{MIB, Sys, SysOptions};
use chrono::{DateTime, Datelike, Duration as TimeDelta, TimeZone, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The first simulated day: a Monday (the weekly full's day).
fn day0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, 1, 4, 0, 0, 0).unwrap()
}

const DAYS: i64 = 90;

/// Moves the hub's test clock (atomically: the hub may read the file at any moment).
fn set_clock(file: &Path, at: DateTime<Utc>) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, at.to_rfc3339()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Proxmox Backup Server's prune selection over `points` (instant, id), newest first: each rule
/// in turn over the points no earlier rule kept, a period that already holds a kept point is not
/// counted again, the newest point of each new period is kept, until the rule's count.
type Period = fn(&DateTime<Utc>) -> String;

fn pbs_keep(points: &[(DateTime<Utc>, String)], rules: &[(usize, Period)]) -> BTreeSet<String> {
    let mut sorted: Vec<&(DateTime<Utc>, String)> = points.iter().collect();
    sorted.sort_by_key(|p| std::cmp::Reverse(p.0));
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for (count, period) in rules {
        let already: HashSet<String> = sorted
            .iter()
            .filter(|p| kept.contains(&p.1))
            .map(|p| period(&p.0))
            .collect();
        let mut periods: HashSet<String> = HashSet::new();
        for p in &sorted {
            if kept.contains(&p.1) {
                continue;
            }
            let id = period(&p.0);
            if already.contains(&id) || periods.contains(&id) {
                continue;
            }
            if periods.len() >= *count {
                break;
            }
            periods.insert(id);
            kept.insert(p.1.clone());
        }
    }
    kept
}

fn daily(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

fn weekly(t: &DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("{}-W{:02}", w.year(), w.week())
}

fn monthly(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m").to_string()
}

/// The independent rules above on a hand-made case: two weeks of daily points.
#[test]
fn the_test_s_own_pbs_rules_keep_what_the_pbs_documentation_says() {
    let pts: Vec<(DateTime<Utc>, String)> = (0..14)
        .map(|d| {
            (
                day0() + TimeDelta::days(d) + TimeDelta::hours(1),
                format!("d{d}"),
            )
        })
        .collect();
    // keep-daily 3: days 13, 12, 11; keep-weekly 2: week 2 already has day 13 kept (not
    // counted), so the newest of week 1 (day 6) and nothing older (only two weeks exist).
    let k = pbs_keep(&pts, &[(3, daily), (2, weekly)]);
    let want: BTreeSet<String> = ["d13", "d12", "d11", "d6"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(k, want);
}

struct Point {
    at: DateTime<Utc>,
    hashes: Vec<String>,
}

async fn wait_run(sys: &Sys, policy: &str, planned: DateTime<Utc>) -> Value {
    let t = Instant::now();
    loop {
        let runs = sys
            .api
            .get_ok(&format!("/api/v1/policies/{policy}/runs?limit=20"))
            .await;
        let run = runs.as_array().into_iter().flatten().find(|r| {
            r["planned_at"]
                .as_str()
                .and_then(|s| s.parse::<DateTime<Utc>>().ok())
                == Some(planned)
        });
        if let Some(r) = run {
            let s = r["status"].as_str().unwrap_or_default();
            if !matches!(s, "queued" | "running") {
                return r.clone();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no finished run planned at {planned} within 180 s: {runs:#}\nhub log:\n{}",
            sys.hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the prune job the policy started after the run that ended at `after` exists and
/// no prune job is active.
async fn wait_prunes_idle(sys: &Sys, after: DateTime<Utc>) {
    let t = Instant::now();
    loop {
        let jobs = sys.api.get_ok("/api/v1/prune").await;
        let started = jobs.as_array().into_iter().flatten().any(|j| {
            j["created_at"]
                .as_str()
                .and_then(|s| s.parse::<DateTime<Utc>>().ok())
                .is_some_and(|c| c >= after)
        });
        let active: Vec<&Value> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| {
                !matches!(
                    j["status"].as_str().unwrap_or_default(),
                    "completed" | "failed" | "cancelled"
                )
            })
            .collect();
        let failed: Vec<&Value> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["status"] == "failed")
            .collect();
        assert!(failed.is_empty(), "a prune job failed: {failed:#?}");
        if started && active.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "prune still active: {active:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every disk of a point as it reads through its chain, hashed.
fn point_hashes(b: &Value, dir: &Path) -> Vec<String> {
    let mut disks: Vec<&Value> = b["disk_results"].as_array().unwrap().iter().collect();
    disks.sort_by_key(|d| d["disk_key"].as_i64());
    disks
        .iter()
        .map(|d| {
            let raw = dir.join(format!("check-{}.raw", d["disk_key"]));
            sendense_tests::run(
                std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(d["qcow2_path"].as_str().unwrap())
                    .arg(&raw),
            );
            let h = sha256_file(&raw);
            std::fs::remove_file(&raw).unwrap();
            h
        })
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ninety_days_of_a_daily_policy_keep_exactly_the_pbs_set_and_every_survivor_reads_true() {
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = clock_dir.path().join("now");
    set_clock(&clock, day0());
    let clock_arg = clock.clone();
    let sys = Sys::start(
        "e2epolicy",
        SysOptions {
            hub: Some(Box::new(move |o, _| {
                o.extra_args.push("--test-clock-file".into());
                o.extra_args.push(clock_arg.display().to_string());
                // One scheduler look per second of real time (the simulated day passes in one
                // clock write).
                o.env
                    .push(("SENDENSE_HUB_POLICY_CHECK_INTERVAL_SECS".into(), "1".into()));
            })),
            ..Default::default()
        },
    )
    .await;
    let (s, policy) = sys
        .api
        .post(
            "/api/v1/policies",
            &json!({
                "name": "daily",
                "vms": {"names": [sys.vm_name]},
                "repository_id": sys.repository,
                "schedule": "0 1 * * *",
                "timezone": "UTC",
                "backup_rule": {"weekly_full_on": "mon"},
                "retention": {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 3},
            }),
        )
        .await;
    assert_eq!(s, 201, "POST /api/v1/policies: {policy}");
    let pid = policy["id"].as_str().unwrap().to_string();

    // The days whose points the rules keep, computed before the run from the planned times
    // (a point's instant is its run's planned time plus seconds): only their disks are read
    // and hashed at their instant (a read of both disks per day would double the test's time).
    let planned_of = |day: i64| day0() + TimeDelta::days(day) + TimeDelta::hours(1);
    let by_day: Vec<(DateTime<Utc>, String)> =
        (0..DAYS).map(|d| (planned_of(d), d.to_string())).collect();
    let kept_days = pbs_keep(&by_day, &[(7, daily), (4, weekly), (3, monthly)]);

    let mut books: BTreeMap<String, Point> = BTreeMap::new();
    for day in 0..DAYS {
        // Guest writes since the last run: a different MiB of each disk every day, and one
        // area rewritten every day.
        let pattern = (day % 250) as u8 + 1;
        sys.vm
            .guest_write(0, pattern, (day as u64 % 100) * MIB, MIB)
            .await;
        sys.vm.guest_write(1, pattern, 120 * MIB, 64 * 1024).await;
        let planned = planned_of(day);
        set_clock(&clock, planned + TimeDelta::seconds(5));
        let run = wait_run(&sys, &pid, planned).await;
        assert_eq!(run["status"], "completed", "day {day}: {run:#}");
        let want_type = if day % 7 == 0 { "full" } else { "incremental" };
        assert_eq!(run["backup_type"], want_type, "day {day}: {run:#}");
        let id = run["backup_id"].as_str().unwrap().to_string();
        let b = sys.api.get_ok(&format!("/api/v1/backups/{id}")).await;
        assert_eq!(b["integrity"], "verified", "day {day}: {b:#}");
        let at: DateTime<Utc> = b["created_at"].as_str().unwrap().parse().unwrap();
        // Nothing is written between the snapshot and now: the disks now are the instant.
        let hashes = if kept_days.contains(&day.to_string()) {
            sys.disks_now(&format!("day{day}"))
                .await
                .iter()
                .map(|p| {
                    let h = sha256_file(p);
                    std::fs::remove_file(p).unwrap();
                    h
                })
                .collect()
        } else {
            Vec::new()
        };
        books.insert(id, Point { at, hashes });
        let ended: DateTime<Utc> = b["completed_at"].as_str().unwrap().parse().unwrap();
        wait_prunes_idle(&sys, ended).await;
    }

    // The surviving set equals the PBS rules over every completed point.
    let all: Vec<(DateTime<Utc>, String)> =
        books.iter().map(|(id, p)| (p.at, id.clone())).collect();
    let want = pbs_keep(&all, &[(7, daily), (4, weekly), (3, monthly)]);
    let backups = sys.api.get_ok("/api/v1/backups").await;
    let survivors: Vec<&Value> = backups
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["vm_name"] == sys.vm_name.as_str() && b["status"] == "completed")
        .collect();
    let got: BTreeSet<String> = survivors
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "surviving points differ from the PBS rules");

    // Every survivor whose chain was reshaped (the oldest ones: merged into or rebased) and
    // the newest, at least five, read equal to the VM at their instant.
    let mut by_age: Vec<&Value> = survivors.clone();
    by_age.sort_by_key(|b| b["created_at"].as_str().unwrap().to_string());
    let mut sample: Vec<&Value> = by_age.iter().take(6).copied().collect();
    sample.push(by_age.last().unwrap());
    assert!(sample.len() >= 5, "{sample:#?}");
    let work = sys.path("check");
    std::fs::create_dir_all(&work).unwrap();
    for b in sample {
        let id = b["backup_id"].as_str().unwrap();
        let full = sys.api.get_ok(&format!("/api/v1/backups/{id}")).await;
        assert_eq!(
            point_hashes(&full, &work),
            books[id].hashes,
            "point {id} ({}) does not read equal to its instant",
            books[id].at
        );
    }

    // The repository holds no file that no surviving point owns.
    let mut owned: HashSet<PathBuf> = HashSet::new();
    for b in &survivors {
        let id = b["backup_id"].as_str().unwrap();
        let full = sys.api.get_ok(&format!("/api/v1/backups/{id}")).await;
        for d in full["disk_results"].as_array().unwrap() {
            let p = PathBuf::from(d["qcow2_path"].as_str().unwrap());
            owned.insert(p.with_extension("qcow2.sums"));
            owned.insert(p);
        }
    }
    let repo = sys.path("hub").join("repo");
    let mut files = Vec::new();
    files_under(&repo, &mut files);
    let stray: Vec<&PathBuf> = files.iter().filter(|f| !owned.contains(*f)).collect();
    assert!(stray.is_empty(), "files no point owns: {stray:#?}");
}
