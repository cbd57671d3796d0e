//! Bad input gets a 4xx naming the cause, and holds nothing.

use super::env::{Env, assert_refused_naming};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_naming_the_cause() {
    let env = Env::start();
    let api = &env.api;
    env.register_vm("okvm", &[2000]).await;

    // Token.
    let (s, v) = api.without_token().get("/api/v1/backups").await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"], "unauthorized", "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("missing Authorization"),
        "{v}"
    );
    let mut wrong = api.clone();
    wrong.token = Some("not-the-token".into());
    let (s, v) = wrong.get("/api/v1/vms").await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("does not match"),
        "{v}"
    );
    let (s, _) = api.without_token().get("/health").await;
    assert_eq!(s, 200, "/health is open");

    // JSON syntax, missing field, wrong type, unknown enum value.
    let (s, v) = api.post_raw("/api/v1/backups", "{\"vm_name\": ").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"], "invalid_json");
    let (s, v) = api
        .post(
            "/api/v1/backups",
            &json!({"vm_name": "okvm", "backup_type": "full"}),
        )
        .await;
    assert_refused_naming(s, &v, "repository_id");
    let (s, v) = api
        .post(
            "/api/v1/vms",
            &json!({"vm_name": "x", "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": "big", "label": "a"}]}),
        )
        .await;
    assert_refused_naming(s, &v, "disks[0].size_bytes");
    let (s, v) = api
        .post(
            "/api/v1/backups",
            &json!({"vm_name": "okvm", "repository_id": "default", "backup_type": "fulll"}),
        )
        .await;
    assert_refused_naming(s, &v, "backup_type");

    // Unknown VM, repository, backup.
    let (s, v) = env.start_backup("nosuchvm", "full").await;
    assert_eq!(s, 404, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("nosuchvm"), "{v}");
    let (s, v) = api.get("/api/v1/vms/nosuchvm").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api
        .post(
            "/api/v1/backups",
            &json!({"vm_name": "okvm", "repository_id": "nosuchrepo", "backup_type": "full"}),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("nosuchrepo"), "{v}");
    let (s, v) = api.get("/api/v1/backups/0000").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api.get("/api/v1/backups/0000/verification").await;
    assert_eq!(s, 404, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("0000"), "{v}");

    // Names that would escape the repository.
    for (body, field) in [
        (
            json!({"vm_name": "../etc", "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": 1048576, "label": "a"}]}),
            "vm_name",
        ),
        (
            json!({"vm_name": "a/b", "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": 1048576, "label": "a"}]}),
            "vm_name",
        ),
        (
            json!({"vm_name": "a\u{0}b", "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": 1048576, "label": "a"}]}),
            "vm_name",
        ),
        (
            json!({"vm_name": "okname", "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": 1048576, "label": "../../root"}]}),
            "label",
        ),
    ] {
        let (s, v) = api.post("/api/v1/vms", &body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"], "invalid_name", "{body}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    let (s, v) = env.start_backup("../okvm", "full").await;
    assert_eq!(s, 400, "{v}");
    // `..` as the VM name reaches the hub only verbatim (a URL client resolves it to the
    // parent path, `/api/v1/`, which has no route: 404); the hub refuses the name itself.
    let (s, v) = api.get_verbatim("/api/v1/vms/..").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"], "invalid_name", "{v}");
    let (s, v) = api.get("/api/v1/vms/..").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api.get("/api/v1/vms/a%2Fb").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .post(
            "/api/v1/repositories",
            &json!({"id": "x/../y", "path": "/tmp/x"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("id"), "{v}");

    // Nothing of all that holds anything, and no job was created.
    let list = api.get_ok("/api/v1/backups").await;
    assert_eq!(list, json!([]), "{list}");
    assert_eq!(api.get_ok("/api/v1/ports").await["allocations"], json!([]));
    assert_eq!(api.get_ok("/api/v1/processes").await, json!([]));
    let vms = api.get_ok("/api/v1/vms").await;
    assert_eq!(
        vms.as_array().unwrap().len(),
        1,
        "only okvm registered: {vms}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_token_file_and_logs() {
    let out = sendense_tests::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub")).arg("--version"),
    );
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.starts_with("sendense-hub "), "{v}");
    assert!(v.contains("commit: ") && v.contains("built: "), "{v}");
    assert!(v.contains(env!("CARGO_BIN_EXE_sendense-hub")), "{v}");

    let env = Env::start();
    let h = env.api.get_ok("/health").await;
    assert_eq!(h["executable"], env!("CARGO_BIN_EXE_sendense-hub"), "{h}");
    assert_eq!(
        h["git_commit"].as_str(),
        v.lines().nth(1).and_then(|l| l.strip_prefix("commit: "))
    );
    let data = &env.hub.opts.data_dir;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "token file mode");
    assert!(
        !env.hub.command_line.contains(&env.hub.token),
        "the token never appears on a command line"
    );
    let logs: Vec<_> = std::fs::read_dir(data.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        logs.iter().any(|n| n.starts_with("sendense-hub.log")),
        "{logs:?}"
    );
    // The repository `default` lives in the data directory.
    let repos = env.api.get_ok("/api/v1/repositories").await;
    assert_eq!(repos[0]["id"], "default");
    assert_eq!(repos[0]["path"], data.join("repo").display().to_string());
}
