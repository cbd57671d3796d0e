//! Metrics and alerts: the hub's and the node's `/api/v1/metrics` pass `promtool check
//! metrics` on a live scrape; a real Prometheus (Debian's) on loopback scrapes both with their
//! bearer credentials from files and sees the backup that just finished; the alert rules of
//! `deploy/prometheus/` pass `promtool check rules` and their unit tests.

use super::sys::{Sys, SysOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("prometheus")
}

fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut c = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs prometheus)");
    if let Some(text) = stdin {
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy_dir();
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], &dir, None);
    assert!(ok && out.contains("6 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yml"], &dir, None);
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

async fn scrape(url: &str, token_file: &Path) -> String {
    let token = std::fs::read_to_string(token_file).unwrap();
    let r = reqwest::Client::new()
        .get(format!("{url}/api/v1/metrics"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{url}/api/v1/metrics");
    r.text().await.unwrap()
}

/// Prometheus, killed (by PID) when the test ends.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encoding of a query parameter (everything but unreserved characters).
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query with one result, once Prometheus has one.
async fn query_value(base: &str, q: &str, within: Duration) -> f64 {
    let t = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(r) = reqwest::Client::new()
            .get(format!("{base}/api/v1/query?query={}", encode(q)))
            .send()
            .await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            if let Some(x) = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
            {
                return x;
            }
            last = v.to_string();
        }
        assert!(
            t.elapsed() < within,
            "no result for {q} within {within:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_hub_and_node_and_sees_the_backup_that_finished() {
    let sys = Sys::start("e2emetrics", SysOptions::default()).await;
    sys.backup_completes("full").await;
    let hub_token = sys.hub.opts.data_dir.join("token");
    let node_token = sys.node.opts.token_file.clone().unwrap();

    // Live scrapes, as promtool reads them.
    let hub_text = scrape(&sys.hub.url, &hub_token).await;
    assert!(
        hub_text.contains("sendense_jobs_ended_total{kind=\"backup\",status=\"completed\"} 1"),
        "{hub_text}"
    );
    assert!(
        hub_text.contains("sendense_points{vm=\"e2emetrics\"} 1"),
        "{hub_text}"
    );
    let (ok, out) = promtool(&["check", "metrics"], &deploy_dir(), Some(&hub_text));
    assert!(ok, "promtool check metrics (hub): {out}\n{hub_text}");
    let node_text = scrape(&sys.node.url, &node_token).await;
    let (ok, out) = promtool(&["check", "metrics"], &deploy_dir(), Some(&node_text));
    assert!(ok, "promtool check metrics (node): {out}\n{node_text}");

    // The deploy configuration, pointed at this test's agents and credential files.
    let dir = sys.path("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = std::fs::read_to_string(deploy_dir().join("prometheus.yml"))
        .unwrap()
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace(
            "/etc/prometheus/sendense/hub.token",
            &hub_token.display().to_string(),
        )
        .replace(
            "/etc/prometheus/sendense/node.credential",
            &node_token.display().to_string(),
        )
        .replace("127.0.0.1:8082", sys.hub.url.trim_start_matches("http://"))
        .replace("127.0.0.1:8081", sys.node.url.trim_start_matches("http://"));
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    std::fs::copy(deploy_dir().join("alerts.yml"), dir.join("alerts.yml")).unwrap();
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"], &dir, None);
    assert!(ok, "promtool check config: {out}");
    let port = sendense_tests::net::free_port();
    let base = format!("http://127.0.0.1:{port}");
    eprintln!("+ prometheus on {base}");
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("prometheus"),
    );
    let limit = Duration::from_secs(60);
    let done = query_value(
        &base,
        r#"sendense_jobs_ended_total{job="sendense-hub",kind="backup",status="completed"}"#,
        limit,
    )
    .await;
    assert_eq!(done, 1.0);
    let up = query_value(&base, r#"up{job="sendense-node"}"#, limit).await;
    assert_eq!(
        up,
        1.0,
        "{}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap()
    );
    let node_done = query_value(
        &base,
        r#"sendense_node_backups{job="sendense-node",status="completed"}"#,
        limit,
    )
    .await;
    assert_eq!(node_done, 1.0);
    // A second backup moves the counter Prometheus sees.
    sys.backup_completes("incremental").await;
    let t = Instant::now();
    while query_value(
        &base,
        r#"sum(sendense_jobs_ended_total{job="sendense-hub",kind="backup",status="completed"})"#,
        limit,
    )
    .await
        < 2.0
    {
        assert!(
            t.elapsed() < limit,
            "Prometheus never saw the second backup"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
