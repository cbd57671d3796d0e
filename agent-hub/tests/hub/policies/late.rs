//! Downtime: a hub stopped across two scheduled times starts ONE late run at start-up, and the
//! next slot after that is on time again.

use super::*;

#[tokio::test]
async fn a_hub_down_across_two_scheduled_runs_starts_one_late_run_at_start_up() {
    let (mut env, clock) = clocked_env("2026-06-01T00:30:00Z", |_| {});
    let srcs = env.vm_with_sources("pg", &[2000]).await;
    let pid = create(&env, &request("nightly", &["pg"])).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.hub.stop();
    // Down across 1 June 01:00 and 2 June 01:00.
    set_clock(&clock, "2026-06-02T05:00:00Z");
    env.start_again();
    let run = wait_run(&env, &pid, "late and running", |r| {
        r["backup_id"].is_string()
    })
    .await;
    assert_eq!(run["late"], true, "{run}");
    assert_eq!(
        run["planned_at"], "2026-06-02T01:00:00Z",
        "the newest slot: {run}"
    );
    let why = run["reason"].as_str().unwrap_or_default();
    assert!(why.contains("1 earlier missed slot"), "{run}");
    assert!(
        env.hub.stderr().contains("one late run"),
        "the hub's log says so"
    );
    complete_run(&env, &pid, &run, &srcs[0]).await;
    // More ticks do not add a run for the skipped slot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        runs(&env, &pid).await.len(),
        1,
        "{:#?}",
        runs(&env, &pid).await
    );

    set_clock(&clock, "2026-06-03T01:00:01Z");
    let next = wait_run(&env, &pid, "the next on-time run", |r| {
        r["planned_at"] == "2026-06-03T01:00:00Z" && r["backup_id"].is_string()
    })
    .await;
    assert_eq!(next["late"], false, "{next}");
    assert_eq!(next["backup_type"], "incremental", "{next}");
    complete_run(&env, &pid, &next, &srcs[0]).await;
    assert_eq!(runs(&env, &pid).await.len(), 2);
}

#[tokio::test]
async fn a_run_whose_hub_was_killed_takes_its_jobs_real_end_at_start_up() {
    let (mut env, _clock) = clocked_env("2026-06-01T00:30:00Z", |_| {});
    env.vm_with_sources("pg", &[2000]).await;
    let pid = create(&env, &request("nightly", &["pg"])).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = env
        .api
        .post(&format!("/api/v1/policies/{pid}/run-now"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let run = wait_run(&env, &pid, "running", |r| r["backup_id"].is_string()).await;
    env.hub.kill9();
    env.start_again();
    let ended = wait_run(&env, &pid, "ended", |r| r["status"] != "running").await;
    assert_eq!(ended["run_id"], run["run_id"]);
    assert_eq!(ended["status"], "failed", "{ended}");
    let job = env
        .api
        .get_ok(&format!(
            "/api/v1/backups/{}",
            run["backup_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        ended["reason"]
            .as_str()
            .unwrap()
            .contains(job["error_message"].as_str().unwrap()),
        "the run says what its job's end was: {ended}\n{job}"
    );
}
