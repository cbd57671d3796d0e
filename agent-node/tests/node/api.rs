//! The node's HTTP answers: auth, validation of a start, inventory, tunnel.

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_validated_and_errors_name_the_cause() {
    let vm = TestVm::temp(&[64 * MIB, 64 * MIB], |_| {}).await;
    let node = start_node(node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None));
    let http = reqwest::Client::new();

    // Health is open; the rest needs the token.
    let r = http
        .get(format!("{}/api/v1/health", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["pid"], node.pid());
    let r = http
        .get(format!("{}/api/v1/inventory", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "unauthorized", "{b}");
    let r = http
        .get(format!("{}/api/v1/inventory", node.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "unauthorized", "{b}");

    let (code, inv) = node.get("/inventory").await;
    assert_eq!(code, 200);
    assert_eq!(inv["vms"][0]["vm_name"], "vm1");
    let disks = inv["vms"][0]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["disk_key"], 2000);
    assert_eq!(disks[1]["disk_key"], 2001);
    assert_eq!(disks[1]["unit_number"], 1);
    assert_eq!(disks[1]["label"], "disk1");
    assert_eq!(disks[0]["size_bytes"], 64 * MIB);

    let (code, t) = node.get("/tunnel").await;
    assert_eq!(code, 200);
    assert_eq!(t["state"], "down");

    let start = |vm: &str, ty: &str, targets: &str| json!({"backup_id": "x1", "vm_name": vm, "backup_type": ty, "nbd_targets": targets});
    let two = "2000:nbd://127.0.0.1:10100/a,2001:nbd://127.0.0.1:10101/b";
    let cases = [
        (start("nope", "full", two), 404, "not_found", "nope"),
        (
            start("vm1", "full", "2000:nbd://127.0.0.1:10100/a"),
            422,
            "invalid_field",
            "misses disk(s) 2001 ",
        ),
        (
            start(
                "vm1",
                "full",
                &format!("{two},2005:nbd://127.0.0.1:10102/c"),
            ),
            422,
            "invalid_field",
            "key(s) 2005 ",
        ),
        (
            start("vm1", "full", "2000:http://x"),
            422,
            "invalid_field",
            "nbd_targets",
        ),
        (
            start("vm1", "incremental", two),
            409,
            "bitmap_missing",
            "full backup",
        ),
        (json!({"vm_name": "vm1"}), 422, "invalid_field", "backup_id"),
    ];
    for (body, want_code, want_error, want_detail) in cases {
        let (code, answer) = node.post("/backup/start", body.clone()).await;
        assert_eq!(code, want_code, "{body} -> {answer}");
        assert_eq!(answer["error"], want_error, "{body} -> {answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(detail.contains(want_detail), "{body} -> {detail}");
    }
    // The same question without side effects (the hub asks it before it prepares any export;
    // the targets may be empty): a full would be taken, an incremental without a base is
    // refused with the same code, an unknown VM is named.
    let check = |vm: &str, ty: &str| json!({"backup_id": "c1", "vm_name": vm, "backup_type": ty, "nbd_targets": ""});
    let (code, answer) = node.post("/backup/check", check("vm1", "full")).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["backup_type"], "full", "{answer}");
    let (code, answer) = node
        .post("/backup/check", check("vm1", "incremental"))
        .await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["error"], "bitmap_missing", "{answer}");
    let (code, answer) = node.post("/backup/check", check("nope", "full")).await;
    assert_eq!((code, answer["error"].as_str()), (404, Some("not_found")));
    // Nothing was started by the refused requests, nor by the checks.
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    let (code, _) = node.get("/backup/x1").await;
    assert_eq!(code, 404);
    let (code, _) = node.get("/backup/c1").await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_retries_until_the_hub_answers() {
    let vm = TestVm::temp(&[64 * MIB], |_| {}).await;
    let hub = HubRecorder::start().await;
    // The hub answers 503 to the first calls, as while it is starting.
    hub.fail_first.store(3, std::sync::atomic::Ordering::SeqCst);
    let node = start_node(node_opts(
        vm.dir.as_path(),
        Some(&vm.node_qmp),
        Some(&hub.url),
    ));
    let vms = hub.wait_for("/api/v1/vms", 20).await;
    assert_eq!(hub.fail_first.load(std::sync::atomic::Ordering::SeqCst), 0);
    let nodes = hub.calls_to("/api/v1/nodes");
    assert_eq!(nodes.last().unwrap().body["name"], "node1");
    assert_eq!(nodes.last().unwrap().body["api_url"], node.url);
    assert_eq!(vms[0].body["vm_name"], "vm1");
    assert_eq!(vms[0].body["node"], "node1");
    assert_eq!(vms[0].body["disks"][0]["disk_key"], 2000);
    assert_eq!(vms[0].body["disks"][0]["size_bytes"], 64 * MIB);
    assert_eq!(
        vms[0].auth.as_deref(),
        Some(&*format!("Bearer {TOKEN}")),
        "the hub is called with the shared token"
    );
}
