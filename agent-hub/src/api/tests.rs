use super::*;
use crate::config::HubConfig;
use crate::hub::Hub;
use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct T {
    app: Router,
    hub: AppState,
    token: String,
    _dir: tempfile::TempDir,
}

async fn app() -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_data_dir(dir.path());
    // A range nothing on this machine uses; no job in these tests reaches qemu-nbd.
    cfg.nbd_ports = crate::ports::PortRange { first: 1, last: 1 };
    let hub = Hub::open(cfg).await.unwrap();
    T {
        token: hub.token.as_str().to_string(),
        app: router(hub.clone()),
        hub,
        _dir: dir,
    }
}

impl T {
    async fn call(&self, method: &str, uri: &str, body: Option<&str>, auth: bool) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if auth {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        }
        let req = req
            .body(
                body.map(|b| Body::from(b.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn health_is_open_and_names_the_database() {
    let t = app().await;
    let (s, v) = t.call("GET", "/health", None, false).await;
    assert_eq!(s, 200);
    assert_eq!(v["database"], json!({"kind": "sqlite", "ok": true}));
    assert_eq!(v["pid"], std::process::id());
}

#[tokio::test]
async fn api_needs_the_token() {
    let t = app().await;
    let (s, v) = t.call("GET", "/api/v1/vms", None, false).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "unauthorized");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("the hub's token file"),
        "{v}"
    );
    let (s, _) = t.call("GET", "/api/v1/vms", None, true).await;
    assert_eq!(s, 200);
    let (s, v) = t.call("GET", "/api/v1/nope", None, true).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"], "not_found", "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("/api/v1/nope"),
        "{v}"
    );
}

#[tokio::test]
async fn json_errors_name_the_field() {
    let t = app().await;
    let (s, v) = t.call("POST", "/api/v1/vms", Some("{"), true).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"], "invalid_json", "{v}");
    let (s, v) = t
        .call("POST", "/api/v1/vms", Some(r#"{"vm_name":"a"}"#), true)
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"], "invalid_field", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("disks"), "{v}");
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/backups",
            Some(r#"{"vm_name":1,"repository_id":"default","backup_type":"full"}"#),
            true,
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().starts_with("vm_name"), "{v}");
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/repositories",
            Some(r#"{"id":"r2","path":"relative/dir"}"#),
            true,
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("absolute"), "{v}");
}

#[tokio::test]
async fn vms_register_and_unknowns_are_404() {
    let t = app().await;
    let body = r#"{"vm_name":"pg","node":null,"disks":[
        {"disk_key":2000,"unit_number":0,"size_bytes":1048576,"label":"a"},
        {"disk_key":2001,"unit_number":1,"size_bytes":2097152,"label":"b"}]}"#;
    let (s, v) = t.call("POST", "/api/v1/vms", Some(body), true).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = t.call("GET", "/api/v1/vms/pg", None, true).await;
    assert_eq!(s, 200);
    assert_eq!(v["disks"][1]["unit_number"], 1, "{v}");
    let (s, v) = t.call("GET", "/api/v1/vms/other", None, true).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"], "not_found");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("no VM named \"other\""),
        "{v}"
    );
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/backups",
            Some(r#"{"vm_name":"pg","repository_id":"nope","backup_type":"full"}"#),
            true,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"], "not_found");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("no repository with id \"nope\""),
        "{v}"
    );
    let (s, v) = t
        .call(
            "POST",
            "/api/v1/backups/abc/progress",
            Some(r#"{"disks":[]}"#),
            true,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = t
        .call("GET", "/api/v1/backups/abc/events", None, true)
        .await;
    assert_eq!(s, 404, "{v}");
    let body = r#"{"vm_name":"pg2","node":"ghost","disks":[{"disk_key":1,"unit_number":0,"size_bytes":512,"label":"a"}]}"#;
    let (s, v) = t.call("POST", "/api/v1/vms", Some(body), true).await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("ghost"), "{v}");
}

#[tokio::test]
async fn internal_errors_do_not_leak() {
    let e = ApiError::internal("secret path /etc/x");
    assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(e.body().error, ErrorCode::Internal);
    assert!(!e.body().detail.contains("/etc/x"));
}

// One test per code the hub answers, each produced for real through the router.

impl T {
    /// `(status, code, detail)` of an error answer.
    async fn refused(&self, method: &str, uri: &str, body: Option<&str>) -> (u16, String, String) {
        let (s, v) = self.call(method, uri, body, true).await;
        let e: ErrorBody = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
        (s, e.error.to_string(), e.detail)
    }

    async fn register(&self, vm: &str, sizes: &[u64]) {
        let disks: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"disk_key": 2000 + i, "unit_number": i, "size_bytes": s, "label": "d"}))
            .collect();
        let body = json!({"vm_name": vm, "node": null, "disks": disks}).to_string();
        let (s, v) = self.call("POST", "/api/v1/vms", Some(&body), true).await;
        assert_eq!(s, 201, "{v}");
    }

    /// A job of `vm` recorded straight in the database, moved to `status`.
    async fn seed_job(&self, vm: &str, status: sendense_shared::api::JobStatus) -> String {
        use crate::db::{NewBackup, NewBackupDisk};
        use sendense_shared::api::{BackupType, JobStatus};
        use sendense_shared::ids::{BackupId, DiskKey};
        let v = self.hub.db.get_vm(vm).await.unwrap();
        let id = BackupId(format!("seed-{vm}"));
        self.hub
            .db
            .create_backup(&NewBackup {
                backup_id: id.clone(),
                vm_context_id: v.vm_context_id,
                vm_name: vm.into(),
                backup_type: BackupType::Full,
                repository_id: "default".into(),
                disks: vec![NewBackupDisk {
                    disk_key: DiskKey(2000),
                    unit_number: 0,
                    qcow2_path: "/nonexistent/seed.qcow2".into(),
                    nbd_export_name: format!("{vm}-disk-2000"),
                    bytes_total: 1 << 20,
                    parent_backup_id: None,
                    backing_path: None,
                }],
            })
            .await
            .unwrap();
        if status != JobStatus::Pending {
            assert!(
                self.hub
                    .db
                    .transition_backup(&id, &[JobStatus::Pending], status, None)
                    .await
                    .unwrap()
            );
        }
        id.0
    }
}

fn backup_of(vm: &str) -> String {
    json!({"vm_name": vm, "repository_id": "default", "backup_type": "full"}).to_string()
}

#[tokio::test]
async fn code_invalid_json() {
    let t = app().await;
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some("{\"vm_name\": "))
        .await;
    assert_eq!((s, code.as_str()), (400, "invalid_json"), "{detail}");
}

#[tokio::test]
async fn code_invalid_name() {
    let t = app().await;
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some(&backup_of("../etc")))
        .await;
    assert_eq!((s, code.as_str()), (400, "invalid_name"), "{detail}");
    assert!(detail.starts_with("vm_name"), "{detail}");
}

#[tokio::test]
async fn code_invalid_field() {
    let t = app().await;
    let (s, code, detail) = t
        .refused(
            "POST",
            "/api/v1/backups",
            Some(r#"{"vm_name":"a","backup_type":"full"}"#),
        )
        .await;
    assert_eq!((s, code.as_str()), (422, "invalid_field"), "{detail}");
    assert!(detail.contains("repository_id"), "{detail}");
    // A value refused by validation, not by serde.
    let (s, code, detail) = t
        .refused("GET", "/api/v1/backups?status=weekly", None)
        .await;
    assert_eq!((s, code.as_str()), (422, "invalid_field"), "{detail}");
    assert!(detail.starts_with("status:"), "{detail}");
}

#[tokio::test]
async fn code_unauthorized() {
    let t = app().await;
    let (s, v) = t.call("GET", "/api/v1/backups", None, false).await;
    assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")), "{v}");
}

#[tokio::test]
async fn code_forbidden_names_the_scope() {
    let mut t = app().await;
    let node = t.hub.auth.credentials.enroll("n1").await.unwrap();
    t.token = node.as_str().to_string();
    let body = json!({"id": "r2", "path": t._dir.path().join("r2")}).to_string();
    let (s, code, detail) = t.refused("POST", "/api/v1/repositories", Some(&body)).await;
    assert_eq!((s, code.as_str()), (403, "forbidden"), "{detail}");
    assert!(detail.starts_with("scope admin: "), "{detail}");
    assert!(detail.contains("n1"), "{detail}");
    let reg = r#"{"name":"n2","api_url":"http://127.0.0.1:9","version":"t"}"#;
    let (s, code, detail) = t.refused("POST", "/api/v1/nodes", Some(reg)).await;
    assert_eq!((s, code.as_str()), (403, "forbidden"), "{detail}");
    assert!(detail.starts_with("scope node:n1: "), "{detail}");
    // Revoked: 401 from the next request on.
    t.hub.auth.credentials.revoke("n1").await.unwrap();
    let (s, code, detail) = t.refused("GET", "/api/v1/nodes/n1", None).await;
    assert_eq!((s, code.as_str()), (401, "unauthorized"), "{detail}");
}

#[tokio::test]
async fn code_not_found() {
    let t = app().await;
    let (s, code, detail) = t.refused("GET", "/api/v1/backups/b-none", None).await;
    assert_eq!((s, code.as_str()), (404, "not_found"), "{detail}");
    assert!(detail.contains("b-none"), "{detail}");
}

#[tokio::test]
async fn code_already_exists() {
    let t = app().await;
    let dir = t._dir.path().join("second");
    let body = json!({"id": "default", "path": dir}).to_string();
    let (s, code, detail) = t.refused("POST", "/api/v1/repositories", Some(&body)).await;
    assert_eq!((s, code.as_str()), (409, "already_exists"), "{detail}");
    assert!(detail.contains("default"), "{detail}");
}

#[tokio::test]
async fn code_vm_busy() {
    let t = app().await;
    t.register("busy", &[1 << 20]).await;
    let id = t
        .seed_job("busy", sendense_shared::api::JobStatus::Running)
        .await;
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some(&backup_of("busy")))
        .await;
    assert_eq!((s, code.as_str()), (409, "vm_busy"), "{detail}");
    assert!(detail.contains(&id), "{detail}");
}

#[tokio::test]
async fn code_wrong_state() {
    let t = app().await;
    t.register("done", &[1 << 20]).await;
    let id = t
        .seed_job("done", sendense_shared::api::JobStatus::Failed)
        .await;
    let (s, code, detail) = t
        .refused("POST", &format!("/api/v1/backups/{id}/cancel"), None)
        .await;
    assert_eq!((s, code.as_str()), (409, "wrong_state"), "{detail}");
    assert!(detail.contains("failed"), "{detail}");
}

#[tokio::test]
async fn code_node_not_registered() {
    let t = app().await;
    // The API refuses a VM of an unknown node; the database does not (a node's record may
    // go while its VMs stay).
    t.hub
        .db
        .upsert_vm(&sendense_shared::api::VmRequest {
            vm_name: "orphan".into(),
            node: Some("ghost".into()),
            disks: vec![sendense_shared::api::VmDisk {
                disk_key: sendense_shared::ids::DiskKey(2000),
                unit_number: 0,
                size_bytes: 1 << 20,
                label: "d".into(),
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            }],
        })
        .await
        .unwrap();
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some(&backup_of("orphan")))
        .await;
    assert_eq!((s, code.as_str()), (409, "node_not_registered"), "{detail}");
    assert!(detail.contains("ghost"), "{detail}");
}

#[tokio::test]
async fn code_insufficient_storage() {
    let t = app().await;
    // 1 EiB: no test machine has that much free.
    t.register("huge", &[1 << 60]).await;
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some(&backup_of("huge")))
        .await;
    assert_eq!(
        (s, code.as_str()),
        (507, "insufficient_storage"),
        "{detail}"
    );
    assert!(detail.contains(&(1u64 << 60).to_string()), "{detail}");
}

#[tokio::test]
async fn code_ports_exhausted() {
    let t = app().await;
    // Two disks, a range of one port.
    t.register("two", &[1 << 20, 1 << 20]).await;
    let (s, code, detail) = t
        .refused("POST", "/api/v1/backups", Some(&backup_of("two")))
        .await;
    assert_eq!((s, code.as_str()), (503, "ports_exhausted"), "{detail}");
    assert!(detail.contains("range 1-1"), "{detail}");
}

#[tokio::test]
async fn code_database_names_the_database_cause() {
    let t = app().await;
    t.hub.db.close().await;
    let (s, code, detail) = t.refused("GET", "/api/v1/vms", None).await;
    assert_eq!((s, code.as_str()), (503, "database"), "{detail}");
    // The hub's step and sqlx's own words, not the bare word "database".
    assert!(
        detail.starts_with("database query failed while "),
        "{detail}"
    );
    assert!(detail.contains("closed"), "{detail}");
}

#[tokio::test]
async fn code_internal_does_not_leak() {
    let t = app().await;
    t.register("bad", &[1 << 20]).await;
    t.seed_job("bad", sendense_shared::api::JobStatus::Pending)
        .await;
    // A status this hub cannot read (a newer hub's, or a hand edit).
    sqlx::query("UPDATE backup_jobs SET status = 'bogus-status'")
        .execute(t.hub.db.pool())
        .await
        .unwrap();
    let (s, code, detail) = t.refused("GET", "/api/v1/backups", None).await;
    assert_eq!((s, code.as_str()), (500, "internal"), "{detail}");
    assert!(!detail.contains("bogus"), "{detail}");
    assert!(detail.contains("log"), "{detail}");
}

#[tokio::test]
async fn code_node_unreachable() {
    let t = app().await;
    // Nothing listens on port 1 of the loopback: the connection is refused at once.
    let reg = json!({"name": "far", "api_url": "http://127.0.0.1:1", "version": "0"}).to_string();
    let (s, v) = t.call("POST", "/api/v1/nodes", Some(&reg), true).await;
    assert_eq!(s, 201, "{v}");
    let (s, code, detail) = t.refused("POST", "/api/v1/nodes/far/discover", None).await;
    assert_eq!((s, code.as_str()), (502, "node_unreachable"), "{detail}");
    assert!(detail.contains("127.0.0.1:1/api/v1/inventory"), "{detail}");
}

#[tokio::test]
async fn the_proof_is_open_and_covers_every_valid_credential_of_the_node() {
    use sendense_shared::proof::{ProofAnswer, Role, nonce, verify};
    let t = app().await;
    let old = t.hub.auth.credentials.enroll("n1").await.unwrap();
    // Used once (a rotation revokes a credential never used at once).
    t.hub.auth.credentials.identify(old.as_str()).await.unwrap();
    let new = t.hub.auth.credentials.rotate("n1").await.unwrap();
    let n = nonce();
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/proof?nonce={n}&node=n1"),
            None,
            false,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let answer: ProofAnswer = serde_json::from_value(v).unwrap();
    // During the rotation, a node holding either file recognises its hub.
    assert!(verify(&old, Role::Hub, "n1", &n, &answer));
    assert!(verify(&new, Role::Hub, "n1", &n, &answer));
    assert!(!verify(&new, Role::Node, "n1", &n, &answer));
    let (s, v) = t
        .call("GET", "/api/v1/proof?nonce=00&node=n1", None, false)
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (422, Some("invalid_field")),
        "{v}"
    );
    t.hub.auth.credentials.revoke("n1").await.unwrap();
    let (s, v) = t
        .call(
            "GET",
            &format!("/api/v1/proof?nonce={n}&node=n1"),
            None,
            false,
        )
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn a_squatter_on_a_nodes_url_gets_no_credential() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().await;
    let credential = t.hub.auth.credentials.enroll("n1").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let rec = got.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    let body = r#"{"proofs":["00"]}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = crate::node_client::NodeClient::new(
        t.hub.auth.credentials.clone(),
        std::time::Duration::from_secs(5),
    );
    let node = crate::node_client::NodeAddr {
        name: "n1".into(),
        api_url: url.clone(),
    };
    let e = client.tunnel(&node).await.unwrap_err();
    assert!(e.proof_failure().is_some(), "{e:?}");
    let shown = chain(&e);
    assert!(
        shown.contains("did not prove it is the node of node \"n1\": squatted port?"),
        "{shown}"
    );
    let bytes = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
    assert!(bytes.starts_with("GET /api/v1/proof?nonce="), "{bytes}");
    assert!(
        !bytes.to_ascii_lowercase().contains("authorization"),
        "{bytes}"
    );
    assert!(!bytes.contains(credential.as_str()), "{bytes}");
    assert!(!bytes.contains("/api/v1/tunnel"), "{bytes}");
}
