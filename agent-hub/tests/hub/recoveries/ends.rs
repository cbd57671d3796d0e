//! The hub's own ends: SIGKILL (the next start takes the recovery back: its disks served again
//! on the same sockets) and SIGTERM (a running recovery is parked: its exports stop, its ports
//! and status stay, and the next start takes it back the same way).

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_mid_recovery_takes_it_back_at_restart_on_the_same_sockets() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst4").await;
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
    let ports: Vec<Value> = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["nbd_port"].clone())
        .collect();

    env.hub.kill9();
    // Its own process groups: the exports outlive the hub, until the reconciler.
    assert!(held.iter().all(|p| pid_alive(*p)), "{held:?}");
    env.start_again();
    // Taken back: the old qemu-nbd stopped, new ones on the same ports and sockets, serving
    // the same bytes to the node's certificate of the start request.
    let t = Instant::now();
    let r = loop {
        let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
        let now = pids(&r);
        if now.len() == 2 && now.iter().all(|p| !held.contains(p)) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not taken back: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["status"], "running", "{r:#}");
    assert!(
        held.iter().all(|p| !pid_alive(*p)),
        "old exports alive: {held:?}"
    );
    let again: Vec<Value> = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["nbd_port"].clone())
        .collect();
    assert_eq!(again, ports, "the same ports");
    for (d, img) in st.disks.iter().zip(&images) {
        assert!(
            read_export(&d.export).await == disks::read_raw(img),
            "disk {} served again differs from {}",
            d.disk_key,
            img.display()
        );
    }
    let ev = events(&env, &rid).await;
    assert!(
        ev.iter()
            .any(|e| e.starts_with("reconciler_recovery:") && e.contains("ports are kept"))
            && ev.iter().any(|e| e.starts_with("recovery_taken_back:")),
        "{ev:#?}"
    );
    assert!(
        !node.seen.lock().unwrap().cancels.contains(&rid),
        "the node was told to cancel"
    );
    // The node's reports reach the new process; its end releases everything.
    let home = node_state(&st, 64 * MIB, "finished", Some(4713), None);
    let (s, v) = post_end(&env, &home, "completed").await;
    assert_eq!((s, &v["status"]), (200, &json!("completed")), "{v:#}");
    let done = wait_status(&env, &rid, "completed").await;
    assert_released(&env, &done, &pids(&r)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_hub_parks_a_running_recovery_and_the_next_start_takes_it_back() {
    let mut env = Env::start();
    let (id, _) = two_disk_point(&env, "inst6").await;
    production(&mut env, "unix");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst6-r"}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    let held = pids(&r);
    let status = env.hub.stop().expect("the hub stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    // The exports stop (the VM only pauses); the node is not told to stop the VM.
    assert!(held.iter().all(|p| !pid_alive(*p)), "{held:?}");
    assert!(
        !node.seen.lock().unwrap().cancels.contains(&rid),
        "the node was told to cancel"
    );
    env.start_again();
    let t = Instant::now();
    let r = loop {
        let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
        // Parked: no PID recorded until the new process serves the disks again.
        let now: Vec<u32> = r["disks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["qemu_nbd_pid"].as_u64().map(|p| p as u32))
            .collect();
        if now.len() == 2 && now.iter().all(|p| !held.contains(p)) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not taken back: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["status"], "running", "{r:#}");
    let ev = events(&env, &rid).await;
    assert!(
        ev.iter().any(|e| e.starts_with("recovery_parked:"))
            && ev.iter().any(|e| e.starts_with("recovery_taken_back:")),
        "{ev:#?}"
    );
    let home = node_state(&st, 64 * MIB, "finished", Some(4714), None);
    let (s, v) = post_end(&env, &home, "completed").await;
    assert_eq!((s, &v["status"]), (200, &json!("completed")), "{v:#}");
    let done = wait_status(&env, &rid, "completed").await;
    assert_released(&env, &done, &pids(&r)).await;
}
