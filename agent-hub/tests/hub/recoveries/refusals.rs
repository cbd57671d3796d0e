//! Requests refused naming the field, the node's scope, a VM name taken once per node, and a
//! node that refuses the start.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_refused_naming_the_field_and_a_vm_name_is_taken_once_per_node() {
    let env = Env::start();
    let node = FakeNode::start(&env).await;
    let (_, id, _) = env.gridded_full("inst3").await;
    let ok = json!({"backup_id": id, "node": NODE, "vm_name": "inst3-r"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };

    let (s, v) = request(&env, with("backup_id", json!("no-such-backup"))).await;
    assert_eq!((s, &v["error"]), (404, &json!("not_found")), "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("no-such-backup"),
        "{v}"
    );
    let (s, v) = request(&env, with("node", json!("no-such-node"))).await;
    assert_eq!(s, 404, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("no-such-node"),
        "{v}"
    );
    for (field, value, named) in [
        ("vm_name", json!("-bad name"), "vm_name"),
        ("vm_name", json!("x".repeat(64)), "vm_name"),
        ("disks", json!([2005]), "disks: backup"),
        (
            "disks",
            json!([2000, 2000]),
            "disks: disk 2000 is named twice",
        ),
        ("disks", json!([]), "disks"),
        ("speed_bps", json!(0), "speed_bps"),
        ("overlay_dir", json!("relative/dir"), "overlay_dir"),
        ("memory_mib", json!(0), "memory_mib"),
        ("kernel", json!("vmlinuz"), "kernel"),
    ] {
        let (s, v) = request(&env, with(field, value)).await;
        assert_refused_naming(s, &v, named);
    }
    // A node credential may not start one (admin scope), nor read another node's.
    let other = env.hub.node_api("othernode").unwrap();
    let (s, v) = other.post("/api/v1/recoveries", &ok).await;
    assert_eq!((s, &v["error"]), (403, &json!("forbidden")), "{v}");
    // Nothing was prepared for any refusal.
    assert_eq!(env.api.get_ok("/api/v1/recoveries").await, json!([]));
    assert_eq!(
        env.api.get_ok("/api/v1/ports").await["allocations"],
        json!([])
    );

    let (r, st) = recover(&env, &node, ok.clone()).await;
    let rid = r["recovery_id"].as_str().unwrap().to_string();
    // The point's other fields stay free; the name on the node does not.
    let (s, v) = request(&env, ok.clone()).await;
    assert_eq!((s, &v["error"]), (409, &json!("already_exists")), "{v}");
    let msg = v["detail"].as_str().unwrap();
    assert!(
        msg.starts_with("vm_name") && msg.contains(&rid) && msg.contains(NODE),
        "{v}"
    );
    for path in [
        format!("/api/v1/recoveries/{rid}"),
        format!("/api/v1/recoveries/{rid}/events"),
    ] {
        let (s, v) = other.get(&path).await;
        assert_eq!(s, 403, "{path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("node:othernode"),
            "{v}"
        );
    }
    let (s, v) = other
        .post(
            &format!("/api/v1/recoveries/{rid}/progress"),
            &serde_json::to_value(node_state(&st, 0, "running", None, None)).unwrap(),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = other
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 403, "{v}");

    // The node refuses a second VM (its own 409, its words): failed, nothing held for it.
    let (s, v) = request(&env, with("vm_name", json!("taken-inst3"))).await;
    assert_eq!((s, &v["error"]), (409, &json!("already_exists")), "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("runs on this node already"),
        "{v}"
    );
    let list = env.api.get_ok("/api/v1/recoveries").await;
    let refused = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vm_name"] == "taken-inst3")
        .unwrap();
    assert_eq!(refused["status"], "failed", "{refused:#}");
    let ports = env.api.get_ok("/api/v1/ports").await;
    assert_eq!(
        ports["allocations"].as_array().unwrap().len(),
        1,
        "only the first's: {ports:#}"
    );

    // Cancelled before the node reports anything: the first ends, the name is free again.
    let held = pids(&r);
    env.api
        .post(&format!("/api/v1/recoveries/{rid}/cancel"), &json!({}))
        .await;
    node.wait_cancel(&rid).await;
    let mut end = node_state(&st, 0, "cancelled", None, None);
    end.status = JobStatus::Cancelled;
    post_end(&env, &end, "cancelled").await;
    let done = wait_status(&env, &rid, "cancelled").await;
    assert_released(&env, &done, &held).await;
    let (s, v) = request(&env, ok).await;
    assert_eq!(s, 202, "the name is free once the recovery ended: {v}");
}
