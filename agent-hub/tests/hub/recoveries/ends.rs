//! The hub's own ends: SIGKILL (the reconciler fails the recovery at the next start) and
//! SIGTERM (the drain); neither leaves an export or a port behind, and the node is told.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_mid_recovery_fails_it_at_restart_and_holds_nothing() {
    let mut env = Env::start();
    let (id, _) = two_disk_point(&env, "inst4").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst4-r"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    report(
        &env,
        &node,
        &node_state(&st, 4 * MIB, "running", Some(4713), None),
    )
    .await;
    let held = pids(&r);

    env.hub.kill9();
    // Its own process groups: the exports outlive the hub, until the reconciler.
    assert!(held.iter().all(|p| pid_alive(*p)), "{held:?}");
    env.start_again();
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    let msg = r["error_message"].as_str().unwrap();
    assert!(
        msg.contains("hub restarted during the recovery")
            && msg.contains(&format!("the recovered VM on node {NODE} is paused"))
            && msg.contains("must be cancelled or recovered again"),
        "{msg}"
    );
    assert_released(&env, &r, &held).await;
    // The node is told to stop the VM that lost its disks.
    node.wait_cancel(&rid).await;
    let ev = events(&env, &rid).await;
    assert!(
        ev.iter().any(|e| e.starts_with("reconciler_recovery:")),
        "{ev:#?}"
    );
    // Its end, reported late, is taken as the end of what the hub ended.
    let mut end = node_state(&st, 4 * MIB, "cancelled", Some(4713), None);
    end.status = JobStatus::Cancelled;
    let (s, v) = post_end(&env, &end, "cancelled").await;
    assert_eq!((s, &v["status"]), (200, &json!("failed")), "{v:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_hub_stops_the_exports_and_tells_the_node() {
    let mut env = Env::start();
    let (id, _) = two_disk_point(&env, "inst6").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;
    let (r, _) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst6-r"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    let held = pids(&r);
    let status = env.hub.stop().expect("the hub stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    node.wait_cancel(&rid).await;
    assert!(held.iter().all(|p| !pid_alive(*p)), "{held:?}");
    env.start_again();
    let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert!(
        r["error_message"]
            .as_str()
            .unwrap()
            .starts_with("hub stopped (SIGTERM) during the recovery"),
        "{r:#}"
    );
    assert_released(&env, &r, &held).await;
}
