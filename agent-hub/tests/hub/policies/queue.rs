//! The admission queue: a scheduled run that meets a full port range waits, says why, and
//! completes once the port is free; a manual backup meanwhile keeps its immediate 503.

use super::*;

#[tokio::test]
async fn a_scheduled_run_that_meets_a_full_port_range_waits_and_completes_once_ports_free_up() {
    let port = sendense_tests::net::free_port_range(1);
    let (env, clock) = clocked_env("2026-06-01T00:59:00Z", |o| o.nbd_ports = Some(port));
    let srcs = env.vm_with_sources("sched", &[2000]).await;
    env.vm_with_sources("holder", &[2000]).await;
    env.vm_with_sources("manual", &[2000]).await;
    let p = create(&env, &request("nightly", &["sched"])).await;
    let pid = p["id"].as_str().unwrap().to_string();
    assert_eq!(p["next_run"], "2026-06-01T01:00:00Z", "{p}");

    // The only NBD port goes to a manual job of another VM.
    let (holder, _) = env.backup("holder", "full").await;
    set_clock(&clock, "2026-06-01T01:00:02Z");
    let waiting = wait_run(&env, &pid, "waiting for ports", |r| {
        r["status"] == "queued"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("NBD ports"))
    })
    .await;
    assert_eq!(waiting["planned_at"], "2026-06-01T01:00:00Z", "{waiting}");
    assert_eq!(waiting["late"], false, "{waiting}");
    assert!(waiting.get("backup_id").is_none(), "{waiting}");
    let p = env.api.get_ok(&format!("/api/v1/policies/{pid}")).await;
    assert_eq!(p["queued"], 1, "{p}");
    // A manual start does not queue: it is refused at once, as before.
    let (s, v) = env.start_backup("manual", "full").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("ports_exhausted")),
        "{v}"
    );
    // Only the run that waits: no failed backup of `sched` was left by the waiting.
    let backups = env.api.get_ok("/api/v1/backups?vm_name=sched").await;
    assert_eq!(backups, json!([]), "{backups}");

    // Freeing the port: the queued run takes it at once (so no "nothing held" check here).
    env.api
        .post(&format!("/api/v1/backups/{holder}/cancel"), &json!({}))
        .await;
    env.api
        .wait_status(&holder, &["cancelled"], JOB_LIMIT)
        .await;
    let running = wait_run(&env, &pid, "running", |r| {
        r["status"] == "running" && r["backup_id"].is_string()
    })
    .await;
    assert_eq!(running["run_id"], waiting["run_id"]);
    assert_eq!(running["backup_type"], "full", "{running}");
    let done = complete_run(&env, &pid, &running, &srcs[0]).await;
    assert!(done["ended_at"].is_string(), "{done}");
    let b = env
        .api
        .get_ok(&format!(
            "/api/v1/backups/{}",
            done["backup_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(b["policy_id"], pid.as_str(), "{b}");
    assert_eq!(runs(&env, &pid).await.len(), 1, "one slot, one run");
}

#[tokio::test]
async fn a_run_that_cannot_start_within_its_window_gives_up_saying_why() {
    let port = sendense_tests::net::free_port_range(1);
    let (env, clock) = clocked_env("2026-06-01T00:59:00Z", |o| o.nbd_ports = Some(port));
    env.vm_with_sources("sched", &[2000]).await;
    let mut req = request("short", &["sched"]);
    req["queue_window_secs"] = json!(600);
    let pid = create(&env, &req).await["id"].as_str().unwrap().to_string();
    // The VM itself is busy with a manual job.
    let (holder, _) = env.backup("sched", "full").await;
    set_clock(&clock, "2026-06-01T01:00:02Z");
    wait_run(&env, &pid, "waiting for the VM", |r| {
        r["status"] == "queued" && r["reason"].as_str().is_some_and(|s| s.contains("busy"))
    })
    .await;
    set_clock(&clock, "2026-06-01T01:10:30Z");
    let gave_up = wait_run(&env, &pid, "gave_up", |r| r["status"] == "gave_up").await;
    let why = gave_up["reason"].as_str().unwrap();
    assert!(
        why.contains("queue_window_secs") && why.contains(&holder),
        "{gave_up}"
    );
    env.cancel_and_check(&holder).await;
}

#[tokio::test]
async fn the_hubs_concurrency_limit_holds_a_run_back_until_a_backup_ends() {
    let env = Env::start_with(|o| {
        o.extra_args
            .extend(["--max-concurrent-backups".to_string(), "1".to_string()])
    });
    let a = env.vm_with_sources("vm-a", &[2000]).await;
    let b = env.vm_with_sources("vm-b", &[2000]).await;
    let pid = create(&env, &request("both", &["vm-a", "vm-b"])).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = env
        .api
        .post(&format!("/api/v1/policies/{pid}/run-now"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let first = wait_run(&env, &pid, "vm-a running", |r| {
        r["vm_name"] == "vm-a" && r["backup_id"].is_string()
    })
    .await;
    let held = wait_run(&env, &pid, "vm-b held back", |r| {
        r["vm_name"] == "vm-b"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("max_concurrent_backups = 1"))
    })
    .await;
    assert_eq!(held["status"], "queued", "{held}");
    // Done: its place goes to the next run (which then holds a port: no "nothing held" check
    // until both are done).
    let id = first["backup_id"].as_str().unwrap();
    let job = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    disks::nbdcopy_into(&a[0], &targets(&job)[0].1);
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let second = wait_run(&env, &pid, "vm-b running", |r| {
        r["vm_name"] == "vm-b" && r["backup_id"].is_string()
    })
    .await;
    complete_run(&env, &pid, &second, &b[0]).await;
    let all = runs(&env, &pid).await;
    assert!(all.iter().all(|r| r["status"] == "completed"), "{all:#?}");
}
