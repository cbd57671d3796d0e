//! The scheduler in-process, on its own database, with a clock the test moves.

use agent_hub::db::Db;
use agent_hub::events::{EventBus, JobLog};
use agent_hub::verify::schedule::Scheduler;
use agent_hub::verify::{Clock, Verifier, VerifyDeps};
use chrono::{DateTime, TimeDelta, Utc};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct TestClock(Mutex<DateTime<Utc>>);

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

impl TestClock {
    fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t;
    }
}

async fn until_over(db: &Db, id: &str) {
    let t = Instant::now();
    while !db.get_verify(id).await.unwrap().status.is_terminal() {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_due_repository_gets_a_scheduled_job_and_not_before() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/hub.db?mode=rwc", tmp.path().display());
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.insert_repository("nightly", "/srv/nightly")
        .await
        .unwrap();
    db.insert_repository("manual", "/srv/manual").await.unwrap();
    db.set_verify_interval("nightly", Some(3600)).await.unwrap();
    let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let clock = Arc::new(TestClock(Mutex::new(t0)));
    let verifier = Verifier::new(VerifyDeps {
        db: db.clone(),
        readback: agent_hub::readback::ReadBack::new(
            Default::default(),
            tmp.path().join("readback"),
        ),
        log: JobLog::new(db.clone(), EventBus::new()),
        tasks: tokio_util::task::TaskTracker::new(),
        clock: clock.clone(),
        boot_root: tmp.path().join("boot-checks"),
    });
    let s = Scheduler::new(verifier);

    // Never verified: due at once; only the repository with an interval.
    let started = s.tick().await.unwrap();
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0].scope, "repository:nightly");
    assert_eq!(started[0].trigger, "schedule");
    until_over(&db, &started[0].verify_id).await;
    let r = db.get_repository("nightly").await.unwrap();
    assert_eq!(r.last_verified_at, Some(t0), "set when the job ended");

    clock.set(t0 + TimeDelta::seconds(3599));
    assert!(
        s.tick().await.unwrap().is_empty(),
        "not due before the interval"
    );
    clock.set(t0 + TimeDelta::seconds(3600));
    let started = s.tick().await.unwrap();
    assert_eq!(started.len(), 1, "due once the interval passed");
    until_over(&db, &started[0].verify_id).await;
    let r = db.get_repository("nightly").await.unwrap();
    assert_eq!(r.last_verified_at, Some(t0 + TimeDelta::seconds(3600)));

    // Cleared: never again.
    db.set_verify_interval("nightly", None).await.unwrap();
    clock.set(t0 + TimeDelta::days(30));
    assert!(s.tick().await.unwrap().is_empty());
    assert_eq!(db.list_verifies().await.unwrap().len(), 2);
}
