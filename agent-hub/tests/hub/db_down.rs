//! The database goes away mid-job: a hub on its own MariaDB server (a private `mariadbd`,
//! stopped by PID in the middle of a backup and started again). The writer's report is refused
//! with `503 database` naming the database's own cause, nothing is deleted, the job's events
//! keep that cause once the database is back, and the job goes on to its end.

use super::env::{Env, JOB_LIMIT, MIB, disk};
use sendense_tests::mariadb::PrivateMariaDb;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_database_is_named_in_the_answer_and_the_jobs_events() {
    let dbdir = tempfile::tempdir().unwrap();
    let mut db = PrivateMariaDb::start(dbdir.path()).expect("private MariaDB");
    let url = db.url();
    let env = Env::start_with(|o| o.database_url = Some(url));
    let h = env.api.get_ok("/health").await;
    assert_eq!(h["database"]["kind"], "mysql", "{h}");
    env.vm_with_sources("dbvm", &[2000]).await;
    let (id, b) = env.backup("dbvm", "full").await;
    assert_eq!(b["status"], "running", "{b}");
    let image = PathBuf::from(disk(&b, 2000)["qcow2_path"].as_str().unwrap());
    let pid = disk(&b, 2000)["qemu_nbd_pid"].as_u64().unwrap() as u32;

    db.stop();
    let report = json!({"disks": [{"disk_key": 2000, "bytes_done": MIB, "bytes_total": b["total_bytes"], "status": "running"}]});
    let t = Instant::now();
    let (s, v) = env
        .api
        .post(&format!("/api/v1/backups/{id}/progress"), &report)
        .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"], "database", "{v}");
    let cause = v["detail"].as_str().unwrap().to_string();
    // Within the writer's own 10 s timeout: 5 s waiting for a connection, then one direct
    // attempt that names the cause; the event is queued, not waited for.
    eprintln!("refused after {:?}", t.elapsed());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "the refusal took {:?}",
        t.elapsed()
    );
    // The database's own words (the errno of the refused connection), not just "database".
    assert!(
        cause.contains("does not answer") && cause.contains("Connection refused"),
        "{cause}"
    );
    // Nothing is undone because the database failed: the export runs, the image is there.
    assert!(sendense_tests::pid_alive(pid), "qemu-nbd {pid} was stopped");
    assert!(image.exists(), "{} was deleted", image.display());

    db.resume().expect("MariaDB again");
    let t = Instant::now();
    let (s, v) = loop {
        let (s, v) = env
            .api
            .post(&format!("/api/v1/backups/{id}/progress"), &report)
            .await;
        if s != 503 || t.elapsed() > JOB_LIMIT {
            break (s, v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(s, 200, "the retried report is taken: {v}");
    // The event was kept while the database was gone and is written once it answers (the
    // hub's retry runs every 2 s).
    let t = Instant::now();
    let noted = loop {
        let events = env.api.event_lines(&id).await;
        if let Some(e) = events.iter().find(|e| e.starts_with("database_error:")) {
            break e.clone();
        }
        assert!(
            t.elapsed() < JOB_LIMIT,
            "no database_error event: {events:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    eprintln!("the job's event: {noted}");
    assert!(
        noted.contains("progress report not recorded") && noted.contains(&cause),
        "the event names the database's cause {cause:?}: {noted}"
    );
    let (s, v) = env
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let end = env.api.wait_status(&id, &["cancelled"], JOB_LIMIT).await;
    env.api.assert_nothing_held(&end).await;
}

/// MariaDB stopped while a job finalizes (just after its completion report was taken): the job
/// stays `finalizing`, nothing is deleted, and once MariaDB is back the job completes with its
/// image intact and verified.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_stopped_during_finalize_leaves_the_job_to_complete_when_it_returns() {
    let dbdir = tempfile::tempdir().unwrap();
    let mut db = PrivateMariaDb::start(dbdir.path()).expect("private MariaDB");
    let url = db.url();
    let env = Env::start_with(|o| o.database_url = Some(url));
    // 512 MiB of data: the read-back alone takes longer than stopping MariaDB.
    let src = super::env::big_vm(&env, "findb", 1 << 30, 512 * MIB).await;
    let (id, b) = env.backup("findb", "full").await;
    sendense_tests::disks::nbdcopy_into(&src, &super::env::targets(&b)[0].1);
    let image = PathBuf::from(disk(&b, 2000)["qcow2_path"].as_str().unwrap());
    let grid = super::env::grid_of(&src, 4 * MIB);
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed", "grid": grid}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "finalizing", "{v}");
    db.stop();
    // Well past the hub's 5 s wait for a connection, so that its writes fail meanwhile.
    std::thread::sleep(std::time::Duration::from_secs(15));
    assert!(
        image.exists(),
        "{} was deleted during the outage",
        image.display()
    );
    db.resume().expect("MariaDB again");
    let done = env
        .api
        .wait_status(&id, &["completed", "failed"], JOB_LIMIT)
        .await;
    let events = env.api.event_lines(&id).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{events:#?}");
    assert_eq!(done["integrity"], "verified", "{done:#}");
    assert!(image.exists());
    assert!(
        sendense_tests::disks::images_equal(&image, &src),
        "image differs from the source"
    );
    // The outage was met during finalization and waited out, not skipped.
    for step in ["database_wait", "database_back"] {
        assert!(
            events.iter().any(|e| e.starts_with(step)),
            "no {step} event: {events:#?}"
        );
    }
    env.api.assert_nothing_held(&done).await;
}
