//! `policy …`, `points list`, `point protect|unprotect`, `prune` as a script runs them against
//! the fake hub: what goes to the hub, what comes out on stdout (ids, JSON) and stderr, the
//! exit status; and the hub's refusals (422 naming the field) passed on with the field named.

use crate::cli::Shell;
use crate::fake_hub::policies::{point, request};
use crate::fake_hub::{FakeHub, TOKEN};
use sendense_shared::api::{
    BackupType, JobStatus, KeepReason, Policy, PolicyRun, PruneAction, PrunePlan, PrunePoint,
};

/// A fake hub with one repository, VM pgtest1's completed backups b-1 … b-4 as its points
/// (b-3 and b-4 are removed by the next prune) and the policy `nightly` over it.
async fn hub() -> FakeHub {
    let hub = FakeHub::start(&["repo-a"]).await;
    {
        let mut st = hub.state.lock().unwrap();
        for id in ["b-1", "b-2", "b-3", "b-4"] {
            let mut b = crate::fake_hub::backup(id, "pgtest1", "repo-a", BackupType::Full);
            b.status = JobStatus::Completed;
            st.backups.push(b);
        }
        st.points.insert(
            "pgtest1".into(),
            vec![
                point("b-1", 26, Some(KeepReason::Last), PruneAction::Keep),
                point("b-2", 25, Some(KeepReason::Daily), PruneAction::Keep),
                point("b-3", 24, None, PruneAction::RebaseChild),
                point("b-4", 1, None, PruneAction::MergeIntoChild),
            ],
        );
    }
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "policy",
            "create",
            "nightly",
            "--vm",
            "pgtest1",
            "--schedule",
            "0 1 * * *",
            "--keep-daily",
            "7",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    hub
}

#[tokio::test]
async fn create_from_flags_sends_them_and_prints_the_id() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "policy",
            "create",
            "nightly",
            "--vm",
            "pgtest1",
            "--vm",
            "mail",
            "--pattern",
            "web-*",
            "--node",
            "node-b",
            "--schedule",
            "0 1 * * *",
            "--timezone",
            "Europe/London",
            "--weekly-full-on",
            "sun",
            "--full-every-runs",
            "6",
            "--keep-last",
            "2",
            "--keep-daily",
            "7",
            "--keep-weekly",
            "4",
            "--keep-monthly",
            "3",
            "--max-chain-length",
            "14",
            "--chain-limit",
            "synthetic",
            "--priority",
            "-5",
            "--queue-window",
            "90m",
            "--disabled",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "pol-fake0001", "stdout is the id");
    assert!(
        r.stderr.contains("created policy nightly (pol-fake0001)"),
        "{}",
        r.stderr
    );
    let req = hub.state.lock().unwrap().policy_requests[0].clone();
    assert_eq!(req.name, "nightly");
    assert_eq!(req.vms.names, ["pgtest1", "mail"]);
    assert_eq!(req.vms.patterns, ["web-*"]);
    assert_eq!(req.vms.nodes, ["node-b"]);
    assert_eq!(req.repository_id, "repo-a", "the only repository");
    assert_eq!(req.schedule, "0 1 * * *");
    assert_eq!(req.timezone, "Europe/London");
    assert_eq!(req.backup_rule.weekly_full_on.as_deref(), Some("sun"));
    assert_eq!(req.backup_rule.full_every_runs, Some(6));
    assert_eq!(req.retention.keep_last, Some(2));
    assert_eq!(req.retention.keep_daily, Some(7));
    assert_eq!(req.retention.keep_weekly, Some(4));
    assert_eq!(req.retention.keep_monthly, Some(3));
    assert_eq!(req.max_chain_length, Some(14));
    assert_eq!(req.chain_limit, sendense_shared::api::ChainLimit::Synthetic);
    assert_eq!(req.priority, -5);
    assert_eq!(req.queue_window_secs, 5400);
    assert!(!req.enabled);

    let r = sh.run(&["policy", "list", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list: Vec<Policy> = serde_json::from_str(&r.stdout).expect("stdout is the JSON list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "nightly");
    let r = sh.run(&["policy", "list"]).await;
    assert!(r.stdout.starts_with("ID "), "{}", r.stdout);
    assert!(
        r.stdout.contains("  0 1 * * *  ") && r.stdout.contains("disabled"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.lines().all(|l| l.chars().count() <= 80),
        "{}",
        r.stdout
    );
    // The time zone is in `policy show`.
    let r = sh.run(&["policy", "show", "nightly"]).await;
    assert!(
        r.stdout.contains("0 1 * * * (Europe/London)"),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn the_hubs_422_is_printed_naming_the_field_with_exit_1() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let cases: [(&[&str], &str); 3] = [
        (
            &["--vm", "pgtest1", "--schedule", "61 1 * *"],
            "schedule: \"61 1 * *\" is not a cron expression",
        ),
        (
            &[
                "--vm",
                "pgtest1",
                "--schedule",
                "0 1 * * *",
                "--timezone",
                "Mars/Olympus",
            ],
            "timezone: unknown time zone \"Mars/Olympus\"",
        ),
        (&["--schedule", "0 1 * * *"], "vms: the policy names no VM"),
    ];
    for (flags, detail) in cases {
        let mut args = vec!["policy", "create", "bad"];
        args.extend_from_slice(flags);
        let r = sh.run(&args).await;
        assert_eq!(
            r.code, 1,
            "the documented status of a refusal: {}",
            r.stderr
        );
        assert!(r.stderr.contains("422"), "{}", r.stderr);
        assert!(r.stderr.contains("invalid_field"), "{}", r.stderr);
        assert!(r.stderr.contains(detail), "{detail}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
    }
    assert!(hub.state.lock().unwrap().policies.is_empty());
    // Checked before anything is sent: bad usage, exit 2.
    let r = sh
        .run(&["policy", "create", "x", "--keep-daily", "-1"])
        .await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = sh.run(&["policy", "create", "x", "--vm", "a"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--schedule"), "{}", r.stderr);
}

#[tokio::test]
async fn create_from_a_file_with_flags_over_it_and_a_bad_file_is_usage() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let file = sh.home.path().join("policy.json");
    std::fs::write(
        &file,
        serde_json::to_string(&request("from-file", "pgtest1")).unwrap(),
    )
    .unwrap();
    let r = sh
        .run(&[
            "policy",
            "create",
            "--file",
            file.to_str().unwrap(),
            "--keep-daily",
            "14",
            "--json",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p: Policy = serde_json::from_str(&r.stdout).expect("stdout is the stored policy");
    assert_eq!(p.name, "from-file");
    assert_eq!(p.timezone, "Europe/London", "from the file");
    assert_eq!(p.retention.keep_daily, Some(14), "the flag wins");

    std::fs::write(&file, "{\"name\": 3}").unwrap();
    let r = sh
        .run(&["policy", "create", "--file", file.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(file.to_str().unwrap()), "{}", r.stderr);
    assert_eq!(hub.state.lock().unwrap().policy_requests.len(), 1);
}

#[tokio::test]
async fn update_changes_only_the_given_fields_and_delete_and_run_now_take_the_name() {
    let hub = hub().await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "policy",
            "update",
            "nightly",
            "--disabled",
            "--keep-weekly",
            "4",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    {
        let st = hub.state.lock().unwrap();
        let put = st.policy_requests.last().unwrap();
        assert!(!put.enabled);
        assert_eq!(put.retention.keep_weekly, Some(4));
        assert_eq!(
            put.retention.keep_daily,
            Some(7),
            "kept from the stored policy"
        );
        assert_eq!(put.vms.names, ["pgtest1"]);
        assert_eq!(put.schedule, "0 1 * * *");
    }
    let r = sh
        .run(&["policy", "update", "nightly", "--timezone", "Nowhere/City"])
        .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("timezone:"), "{}", r.stderr);

    let r = sh.run(&["policy", "show", "nightly"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("keep          daily 7 · weekly 4"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("enabled       false"), "{}", r.stdout);

    let r = sh.run(&["policy", "run-now", "nightly", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let runs: Vec<PolicyRun> = serde_json::from_str(&r.stdout).expect("the queued runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].vm_name, "pgtest1");
    assert!(runs[0].manual);
    let r = sh.run(&["policy", "show", "pol-fake0001"]).await;
    assert!(
        r.stdout.contains("manual"),
        "the run is listed: {}",
        r.stdout
    );

    let r = sh.run(&["policy", "delete", "ghost"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("no policy with id or name \"ghost\" (policies: nightly)"),
        "{}",
        r.stderr
    );
    let r = sh.run(&["policy", "delete", "nightly", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["deleted"], "pol-fake0001");
    assert_eq!(
        hub.state.lock().unwrap().deleted_policies,
        vec!["pol-fake0001".to_string()]
    );
}

#[tokio::test]
async fn points_protect_and_a_dry_run_then_the_prune_it_showed() {
    let hub = hub().await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh.run(&["points", "list", "pgtest1", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let points: Vec<PrunePoint> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(points.len(), 4);
    let r = sh.run(&["points", "list", "pgtest1"]).await;
    assert!(r.stdout.contains("KEPT BY"), "{}", r.stdout);
    assert!(r.stdout.contains("rebase child"), "{}", r.stdout);

    // Protect the point the prune would rebase away: it is kept.
    let r = sh.run(&["point", "protect", "b-3"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "b-3");
    assert!(r.stderr.contains("is protected"), "{}", r.stderr);

    let r = sh.run(&["prune", "pgtest1", "--dry-run", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan: PrunePlan = serde_json::from_str(&r.stdout).expect("stdout is the plan");
    let removed: Vec<&str> = plan
        .points
        .iter()
        .filter(|p| p.action != PruneAction::Keep)
        .map(|p| p.backup_id.0.as_str())
        .collect();
    assert_eq!(removed, ["b-4"], "the protected point stays");
    assert!(
        r.stderr.contains("keeps 3, removes 1, frees 101.0 MiB"),
        "{}",
        r.stderr
    );
    {
        let st = hub.state.lock().unwrap();
        assert_eq!(st.protect_requests, vec![("b-3".to_string(), true)]);
        let (req, query) = st.prune_requests.last().unwrap();
        assert!(req.dry_run && *query, "dry run in the body and the query");
        assert!(st.prunes.is_empty(), "a dry run starts nothing");
    }

    let r = sh.run(&["prune", "pgtest1", "--wait"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "p-fake0002");
    assert!(
        r.stderr
            .contains("prune p-fake0002 completed: removes 1 point(s)"),
        "{}",
        r.stderr
    );
    let r = sh.run(&["points", "list", "pgtest1", "--json"]).await;
    let points: Vec<PrunePoint> = serde_json::from_str(&r.stdout).unwrap();
    let ids: Vec<&str> = points.iter().map(|p| p.backup_id.0.as_str()).collect();
    assert_eq!(ids, ["b-1", "b-2", "b-3"]);

    let r = sh.run(&["point", "unprotect", "b-3", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b: sendense_shared::api::Backup = serde_json::from_str(&r.stdout).unwrap();
    assert!(!b.protected);

    let r = sh.run(&["prune", "ghost", "--dry-run"]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no VM named \"ghost\""), "{}", r.stderr);
}
