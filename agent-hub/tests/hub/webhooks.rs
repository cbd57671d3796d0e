//! Webhooks against a receiver this test runs on loopback: a failed backup is told with a
//! signature the receiver can check (HMAC-SHA256 of "{timestamp}.{body}" under the shared
//! secret, computed here independently), the first answer 500 is retried with the same
//! delivery id, and neither the secret nor the URL's query appears in the hub's logs.

use super::env::Env;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec-7c1e0b2f9a4d4e55b1aa";
const QUERY_SECRET: &str = "qtok-55e1d0c7";

type Seen = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A receiver that answers 500 to the first delivery (with `fail_first`) and 200 otherwise.
async fn receiver_with(fail_first: bool) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move {
                let mut v = s.lock().unwrap();
                v.push((headers, body));
                if fail_first && v.len() == 1 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hook?token={QUERY_SECRET}",
        l.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, seen)
}

async fn receiver() -> (String, Seen) {
    receiver_with(true).await
}

/// A 0600 secret file under `dir`.
fn secret_file(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("webhook.secret");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    writeln!(f, "{SECRET}").unwrap();
    p
}

/// The deliveries `seen` holds about `subject` (all with `None`).
fn about(seen: &Seen, subject: Option<&str>) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
        .filter(|v| subject.is_none_or(|s| v["subject"] == s))
        .collect()
}

/// Waits until `seen` holds `n` deliveries about `subject` (30 s at most).
async fn wait_deliveries(
    seen: &Seen,
    subject: Option<&str>,
    n: usize,
    log: impl Fn() -> String,
) -> Vec<Value> {
    let t = Instant::now();
    while about(seen, subject).len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "fewer than {n} deliveries within 30 s: {:?}\nhub log:\n{}",
            seen.lock().unwrap(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    about(seen, subject)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("header {name} missing: {h:?}"))
        .to_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_is_told_signed_retried_after_a_500_and_no_secret_is_logged() {
    let (url, seen) = receiver().await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_file(cfg_dir.path());
    let cfg = cfg_dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[webhook]]\nurl = \"{url}\"\nsecret_file = \"{}\"\nretry_initial_ms = 200\n\
             events = [\"job_failed\", \"verification_failed\"]\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let env = Env::start_with(|o| {
        o.extra_args
            .extend(["--config".into(), cfg.display().to_string()]);
    });
    env.vm_with_sources("whvm", &[2000]).await;
    let (id, _) = env.backup("whvm", "full").await;
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &json!({"status": "failed", "error_message": "disk 2000: source read error (test)",
                "disks": [{"disk_key": 2000, "status": "failed", "error_message": "source read error (test)"}]}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    env.api
        .wait_status(&id, &["failed"], super::env::JOB_LIMIT)
        .await;

    let t = Instant::now();
    while seen.lock().unwrap().len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "fewer than 2 deliveries within 30 s: {:?}\nhub log:\n{}",
            seen.lock().unwrap(),
            env.hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = seen.lock().unwrap().clone();
    let (first, second) = (&got[0], &got[1]);
    assert_eq!(
        header(&first.0, "x-sendense-delivery"),
        header(&second.0, "x-sendense-delivery"),
        "a retry is the same delivery"
    );
    assert_eq!(first.1, second.1, "a retry carries the same body");
    for (h, body) in [first, second] {
        assert_eq!(header(h, "x-sendense-event"), "job_failed");
        assert_eq!(header(h, "content-type"), "application/json");
        let ts = header(h, "x-sendense-timestamp");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header(h, "x-sendense-signature"), format!("sha256={want}"));
        let now = chrono::Utc::now().timestamp();
        let ts: i64 = ts.parse().unwrap();
        assert!((now - ts).abs() < 120, "timestamp {ts} vs now {now}");
    }
    let body: Value = serde_json::from_slice(&second.1).unwrap();
    assert_eq!(body["event"], "job_failed", "{body}");
    assert_eq!(body["subject"], json!(id), "{body}");
    assert_eq!(body["data"]["job_kind"], "backup", "{body}");
    assert_eq!(body["data"]["vm_name"], "whvm", "{body}");
    let summary = body["summary"].as_str().unwrap();
    assert!(
        summary.contains("whvm") && summary.contains("source read error (test)"),
        "{summary}"
    );
    assert_eq!(
        body["delivery_id"].as_str(),
        Some(header(&second.0, "x-sendense-delivery"))
    );

    // Told once: a later re-read of the job sends nothing new.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(seen.lock().unwrap().len(), 2, "one alert, one retry");

    // The hub said it retried, naming the receiver without its query, and never the secret.
    let mut logs = env.hub.stderr();
    let log_dir = env.hub.opts.data_dir.join("logs");
    for e in std::fs::read_dir(&log_dir).into_iter().flatten().flatten() {
        logs.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    assert!(logs.contains("webhook attempt failed; retrying"), "{logs}");
    assert!(logs.contains("HTTP 500"), "{logs}");
    assert!(!logs.contains(SECRET), "the secret is in the hub's logs");
    assert!(
        !logs.contains(QUERY_SECRET),
        "the URL's query is in the hub's logs"
    );
}

/// A secret file others may read keeps the hub from starting, naming the file and its mode.
#[tokio::test]
async fn a_secret_file_others_may_read_is_refused_at_start() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let secret_file = cfg_dir.path().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let cfg = cfg_dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[webhook]]\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"{}\"\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let data = cfg_dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendense-hub"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("webhook 0") && err.contains(&secret_file.display().to_string()),
        "{err}"
    );
    assert!(err.contains("644"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
}

/// A real repository filling up (a small tmpfs): told once as nearly full, told again only
/// after it had room and filled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_filling_up_is_told_once_until_it_had_room_again() {
    let fs = sendense_tests::tmpfs::Tmpfs::mount("8m").expect("tmpfs (tests run as root)");
    let (url, seen) = receiver_with(false).await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let secret = secret_file(cfg_dir.path());
    let cfg = cfg_dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "alert_check_interval_secs = 1\nrepository_full_percent = 20\n\
             [[webhook]]\nurl = \"{url}\"\nsecret_file = \"{}\"\n\
             events = [\"repository_nearly_full\"]\n",
            secret.display()
        ),
    )
    .unwrap();
    let root = fs.path().display().to_string();
    let env = Env::start_with(|o| {
        o.extra_args.extend([
            "--config".into(),
            cfg.display().to_string(),
            "--repository-root".into(),
            root,
        ])
    });
    let repo = fs.path().join("repo");
    let (s, r) = env
        .api
        .post(
            "/api/v1/repositories",
            &json!({"id": "small", "path": repo.display().to_string()}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let fill = fs.path().join("fill");
    std::fs::write(&fill, vec![0x5a_u8; 7 * (1 << 20)]).unwrap();
    let got = wait_deliveries(&seen, Some("small"), 1, || env.hub.stderr()).await;
    assert_eq!(got[0]["event"], "repository_nearly_full", "{}", got[0]);
    assert_eq!(got[0]["subject"], "small", "{}", got[0]);
    assert_eq!(got[0]["data"]["path"], json!(repo.display().to_string()));
    let free = got[0]["data"]["free_bytes"].as_u64().unwrap();
    let total = got[0]["data"]["total_bytes"].as_u64().unwrap();
    assert!(free * 100 < total * 20, "{}", got[0]);
    assert!(got[0]["summary"].as_str().unwrap().contains("under 20 %"));
    // (The hub's default repository may be under 20 % free on the host's disk too: only what
    // is told about "small" counts here.) Room again (seen by the next checks), then full
    // again: told a second time; meanwhile (the checks run every second) nothing more.
    std::fs::remove_file(&fill).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let told = about(&seen, Some("small"));
    assert_eq!(told.len(), 1, "told once while it stayed full: {told:#?}");
    std::fs::write(&fill, vec![0x5a_u8; 7 * (1 << 20)]).unwrap();
    let got = wait_deliveries(&seen, Some("small"), 2, || env.hub.stderr()).await;
    assert_eq!(got[1]["event"], "repository_nearly_full");
    assert_ne!(got[0]["delivery_id"], got[1]["delivery_id"]);
}
