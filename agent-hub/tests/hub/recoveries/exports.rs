//! A recovery's exports under supervision: one SIGKILLed comes back where it was, serving the
//! same bytes to the same certificate; one that cannot come back fails the recovery.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_export_comes_back_on_the_same_port_with_the_same_bytes() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst2").await;
    production(&mut env, "tcp");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst2-r", "disks": [2001, 2000]}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    let keys: Vec<i64> = st.disks.iter().map(|d| d.disk_key.0).collect();
    assert_eq!(keys, [2001, 2000], "the request's (guest) order");
    let before = pids(&r);
    let victim = &st.disks[0];
    let port = victim.export.port;
    assert!(victim.export.socket.is_none(), "TCP: {}", victim.export);
    let want = disks::read_raw(&images[1]);
    assert!(read_export(&victim.export).await == want);

    eprintln!("+ kill -KILL {}", before[0]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let r = loop {
        let r = env.api.get_ok(&format!("/api/v1/recoveries/{rid}")).await;
        match r["disks"][0]["qemu_nbd_pid"].as_u64() {
            Some(p) if p as u32 != before[0] => break r,
            _ => {}
        }
        assert!(
            t.elapsed() < JOB_LIMIT,
            "no new qemu-nbd: {r:#}\n{:#?}",
            events(&env, &rid).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = pids(&r);
    assert!(
        !pid_alive(before[0]) && pid_alive(now[0]),
        "{before:?} -> {now:?}"
    );
    assert_eq!(now[1], before[1], "the other disk's export was left alone");
    assert_eq!(r["status"], "running", "{r:#}");
    assert_eq!(r["disks"][0]["nbd_port"], port, "the same port");
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert!(
        ports["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["port"] == port && a["backup_id"] == id.as_str()),
        "{ports:#}"
    );
    // The node's certificate of the start request opens it, and it serves the same bytes.
    assert!(
        read_export(&victim.export).await == want,
        "the restarted export differs"
    );
    let procs = env.api.get_ok("/api/v1/processes").await;
    let rec = |pid: u32| {
        procs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
    };
    assert_eq!(rec(before[0]).unwrap()["alive"], false, "{procs:#}");
    let new = rec(now[0]).unwrap();
    assert_eq!(
        (new["alive"].as_bool(), new["port"].as_u64()),
        (Some(true), Some(port.into()))
    );
    let ev = events(&env, &rid).await;
    let restarted: Vec<&String> = ev
        .iter()
        .filter(|e| e.starts_with("export_restarted"))
        .collect();
    assert_eq!(restarted.len(), 1, "{ev:#?}");
    let (old, new) = (format!("pid {}", before[0]), format!("pid {}", now[0]));
    assert!(
        restarted[0].contains("disk 2001")
            && restarted[0].contains(&old)
            && restarted[0].contains(&new)
            && restarted[0].contains("SIGKILL"),
        "{restarted:?}"
    );

    // Cancel: the node is told, reports its end, and the hub lets go of everything.
    let (s, c) = env
        .api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!((s, &c["status"]), (202, &json!("cancelling")), "{c:#}");
    node.wait_cancel(&rid).await;
    let mut end = node_state(&st, 16 * MIB, "cancelled", Some(4712), None);
    end.status = JobStatus::Cancelled;
    let (s, v) = post_end(&env, &end, "cancelled").await;
    assert_eq!(s, 200, "{v:#}");
    let done = wait_status(&env, &rid, "cancelled").await;
    assert_released(&env, &done, &now).await;
    let (s, v) = env
        .api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!((s, &v["error"]), (409, &json!("wrong_state")), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_that_cannot_come_back_fails_the_recovery_naming_the_disk() {
    let mut env = Env::start();
    let (id, images) = two_disk_point(&env, "inst5").await;
    // The shortest grace: the recovery fails at the 5th failed restart, not after 30 min.
    let cfg = env.hub.opts.data_dir.join("grace.toml");
    std::fs::write(&cfg, "recovery_export_grace_secs = 1\n").unwrap();
    env.hub
        .opts
        .extra_args
        .extend(["--config".into(), cfg.display().to_string()]);
    production(&mut env, "tcp");
    let node = FakeNode::start(&env).await;
    let (r, st) = recover(
        &env,
        &node,
        json!({"backup_id": id, "node": NODE, "vm_name": "inst5-r", "disks": [2000]}),
    )
    .await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    assert_eq!(st.disks.len(), 1, "only the disk asked for: {st:?}");
    let held = pids(&r);
    // The image goes away under the running export (qemu-nbd keeps its open file), then the
    // export dies: no restart can open the image again.
    let moved = images[0].with_extension("moved");
    std::fs::rename(&images[0], &moved).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(held[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let done = wait_status(&env, &rid, "failed").await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains("disk 2000")
            && msg.contains("could not be kept up after 5 restart attempt(s)")
            && msg.contains("not found"),
        "{msg}"
    );
    let ev = events(&env, &rid).await;
    let failed = ev
        .iter()
        .filter(|e| e.starts_with("export_restart_failed: disk 2000"))
        .count();
    assert_eq!(failed, 5, "{ev:#?}");
    // The VM cannot read its disk any more: the node is told to stop it.
    node.wait_cancel(&rid).await;
    assert_released(&env, &done, &held).await;
    std::fs::rename(&moved, &images[0]).unwrap();
}
