//! Policies, slots and runs (schema 0006) on both dialects: rows round-trip, a name and a slot
//! are taken once, runs queue in priority then planned order and move by compare-and-set, a
//! deleted policy takes its slots and runs along, a backup records its policy.

use crate::*;
use agent_hub::db::{QueuedRun, RunChange};
use chrono::{DateTime, TimeDelta, Utc};
use sendense_shared::api::{
    BackupRule, ChainLimit, Policy, PolicyRun, Retention, RunStatus, VmSelector,
};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn policy(id: &str, name: &str) -> Policy {
    Policy {
        id: id.into(),
        name: name.into(),
        vms: VmSelector {
            names: vec!["pg".into()],
            patterns: vec!["web-*".into()],
            nodes: vec![],
        },
        repository_id: "main".into(),
        schedule: "0 1 * * *".into(),
        timezone: "Europe/London".into(),
        backup_rule: BackupRule {
            full_every_days: Some(7),
            full_every_runs: None,
            weekly_full_on: Some("sun".into()),
        },
        retention: Retention {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            ..Default::default()
        },
        max_chain_length: Some(10),
        chain_limit: ChainLimit::Synthetic,
        enabled: true,
        priority: 3,
        queue_window_secs: 3600,
        boot_check: Some(sendense_shared::api::BootCheckSpec {
            timeout_secs: Some(90),
            ready_line: Some("login:".into()),
            ..Default::default()
        }),
        created_at: at("2026-06-01T00:00:00Z"),
        updated_at: at("2026-06-01T00:00:00Z"),
        next_run: None,
        last_run: None,
        queued: 0,
    }
}

fn run(id: &str, policy: &str, vm: &str, planned: &str, priority: i32) -> QueuedRun {
    let planned = at(planned);
    QueuedRun {
        run: PolicyRun {
            run_id: id.into(),
            policy_id: policy.into(),
            vm_name: vm.into(),
            planned_at: planned,
            late: false,
            manual: false,
            status: RunStatus::Queued,
            backup_type: None,
            backup_id: None,
            queued_at: planned,
            started_at: None,
            ended_at: None,
            reason: None,
        },
        priority,
        give_up_at: planned + TimeDelta::hours(6),
    }
}

#[tokio::test]
async fn policies_slots_and_runs_round_trip_and_move_once() {
    on_each_dialect("policies", |t: TestDb| async move {
        let (db, d) = (&t.db, t.dialect);
        db.insert_repository("main", "/srv/repo").await.unwrap();
        let p = policy("p1", "nightly");
        db.insert_policy(&p).await.unwrap();
        assert_eq!(db.get_policy("p1").await.unwrap(), p, "{d}");
        let e = db
            .insert_policy(&policy("p2", "nightly"))
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::Conflict { .. }), "{d}: {e:?}");
        let mut other = policy("p2", "weekly");
        other.repository_id = "nowhere".into();
        let e = db.insert_policy(&other).await.unwrap_err();
        assert!(
            matches!(&e, DbError::NotFound { what } if what.contains("nowhere")),
            "{d}: {e:?}"
        );
        let mut q = policy("p2", "weekly");
        q.created_at = at("2026-06-02T00:00:00Z");
        db.insert_policy(&q).await.unwrap();
        q.priority = -4;
        q.enabled = false;
        q.max_chain_length = None;
        q.chain_limit = ChainLimit::Full;
        q.boot_check = None;
        db.update_policy(&q).await.unwrap();
        assert_eq!(db.get_policy("p2").await.unwrap(), q, "{d}");
        let ids: Vec<String> = db
            .list_policies()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["p1", "p2"], "{d}: oldest first");

        // A slot is claimed once, also by a second pool ("another hub").
        let other_hub = t.another_pool().await;
        let slot = at("2026-06-02T00:00:00Z");
        assert!(
            db.claim_slot("p1", slot, false, false).await.unwrap(),
            "{d}"
        );
        assert!(
            !other_hub
                .claim_slot("p1", slot, false, false)
                .await
                .unwrap(),
            "{d}"
        );
        assert!(
            db.claim_slot("p1", at("2026-06-03T09:00:00Z"), false, true)
                .await
                .unwrap()
        );
        assert_eq!(
            db.last_scheduled_slot("p1").await.unwrap(),
            Some(slot),
            "{d}: manual slots do not count"
        );
        assert_eq!(db.last_scheduled_slot("p2").await.unwrap(), None, "{d}");

        // Queue order: priority, then planned time.
        db.insert_run(&run("r-low", "p2", "web-01", "2026-06-01T00:00:00Z", -4))
            .await
            .unwrap();
        db.insert_run(&run("r-late", "p1", "pg", "2026-06-02T00:00:00Z", 3))
            .await
            .unwrap();
        db.insert_run(&run("r-early", "p1", "web-01", "2026-06-01T00:00:00Z", 3))
            .await
            .unwrap();
        let e = db
            .insert_run(&run("r-dup", "p1", "pg", "2026-06-02T00:00:00Z", 3))
            .await
            .unwrap_err();
        assert!(
            matches!(e, DbError::Conflict { .. }),
            "{d}: one run per VM and slot: {e:?}"
        );
        let order: Vec<String> = db
            .runs_in(RunStatus::Queued)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.run.run_id)
            .collect();
        assert_eq!(order, ["r-early", "r-late", "r-low"], "{d}");

        // Compare-and-set: one of two hubs starts the run.
        let start = RunChange {
            status: Some(RunStatus::Running),
            started_at: Some(at("2026-06-02T00:00:05Z")),
            ..Default::default()
        };
        assert!(
            db.update_run("r-late", &[RunStatus::Queued], &start)
                .await
                .unwrap(),
            "{d}"
        );
        assert!(
            !other_hub
                .update_run("r-late", &[RunStatus::Queued], &start)
                .await
                .unwrap(),
            "{d}"
        );
        let b = job(db, "pg", "b-1", BackupType::Full).await;
        db.set_backup_policy(&b.backup_id, "p1").await.unwrap();
        assert_eq!(
            db.get_backup(&b.backup_id)
                .await
                .unwrap()
                .policy_id
                .as_deref(),
            Some("p1"),
            "{d}"
        );
        let attach = RunChange {
            backup_id: Some(b.backup_id.clone()),
            backup_type: Some(BackupType::Full),
            reason: Some(Some("waited".into())),
            ..Default::default()
        };
        assert!(
            db.update_run("r-late", &[RunStatus::Running], &attach)
                .await
                .unwrap(),
            "{d}"
        );
        let done = RunChange {
            status: Some(RunStatus::Completed),
            ended_at: Some(at("2026-06-02T00:10:00Z")),
            reason: Some(None),
            ..Default::default()
        };
        assert!(
            db.update_run("r-late", &[RunStatus::Running], &done)
                .await
                .unwrap(),
            "{d}"
        );
        let r = db.get_run("r-late").await.unwrap().run;
        assert_eq!(r.status, RunStatus::Completed, "{d}");
        assert_eq!(r.backup_id, Some(b.backup_id.clone()), "{d}");
        assert_eq!(r.backup_type, Some(BackupType::Full), "{d}");
        assert_eq!(r.started_at, Some(at("2026-06-02T00:00:05Z")), "{d}");
        assert_eq!(r.reason, None, "{d}: cleared");

        let newest: Vec<String> = db
            .list_runs("p1", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.run.run_id)
            .collect();
        assert_eq!(newest, ["r-late", "r-early"], "{d}: newest first");
        assert_eq!(db.list_runs("p1", 1).await.unwrap().len(), 1, "{d}");
        let (last, queued) = db.policy_run_summary("p1").await.unwrap();
        assert_eq!(
            (last.map(|r| r.run_id), queued),
            (Some("r-late".to_string()), 1),
            "{d}"
        );

        // The backup type rule's view of a VM: completed points only, newest first.
        assert!(
            db.completed_points("pg", 10).await.unwrap().is_empty(),
            "{d}"
        );
        db.transition_backup(
            &b.backup_id,
            &[JobStatus::Pending],
            JobStatus::Completed,
            None,
        )
        .await
        .unwrap();
        let pts = db.completed_points("pg", 10).await.unwrap();
        assert_eq!(pts.len(), 1, "{d}");
        assert_eq!(pts[0].backup_type, BackupType::Full, "{d}");

        db.delete_policy("p1").await.unwrap();
        assert!(
            matches!(db.get_run("r-early").await, Err(DbError::NotFound { .. })),
            "{d}"
        );
        assert!(
            db.claim_slot("p1", slot, false, false).await.is_err(),
            "{d}: the policy is gone"
        );
        assert!(
            matches!(db.delete_policy("p1").await, Err(DbError::NotFound { .. })),
            "{d}"
        );
        assert_eq!(db.runs_in(RunStatus::Queued).await.unwrap().len(), 1, "{d}");
        other_hub.close().await;
    })
    .await;
}
