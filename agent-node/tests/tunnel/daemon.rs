//! The real `sendense-node` with `--tunnel`: its API serves the tunnel state, the hub side
//! reaches the node's API through the reverse forward, and SIGTERM stops ssh.

use crate::support::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The direct children of `pid` (every thread's `children` list).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

struct Node(sendense_shared::child::Supervised);

impl Drop for Node {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_its_tunnel_state_and_is_reached_through_the_reverse_forward() {
    let ports = Ports::pick();
    let sshd = Sshd::start(&ports).await;
    let d = sshd.dir.path();
    let token = d.join("token");
    std::fs::write(&token, "tok\n").unwrap();
    let api = format!("127.0.0.1:{}", ports.node_api);
    let mut cmd = tokio::process::Command::new(NODE_BIN);
    cmd.args(["--listen", &api, "--name", "tnode", "--token-file"])
        .arg(&token)
        .arg("--tunnel")
        .arg(format!("{}@127.0.0.1:{}", sshd.user, sshd.port))
        .arg("--tunnel-identity")
        .arg(&sshd.user_key)
        .arg("--tunnel-known-hosts")
        .arg(&sshd.known_hosts)
        .args(["--tunnel-bind", BIND])
        .args(["--tunnel-nbd-ports", &ports.nbd.to_string()])
        .args(["--tunnel-hub-api-port", &ports.hub_api.to_string()])
        .args(["--tunnel-reverse-port", &ports.reverse.to_string()])
        .env_remove("SENDENSE_NODE_CONFIG")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let node = Node(sendense_shared::child::Supervised::spawn(cmd).unwrap());
    eprintln!("started {}", node.0.command_line_string());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        assert!(node.0.is_alive(), "node died: {}", node.0.stderr_tail());
        let r = http
            .get(format!("http://{api}/api/v1/tunnel"))
            .bearer_auth("tok")
            .send()
            .await;
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().await.unwrap();
            if v["state"] == "up" {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "tunnel not up: {v}\n{}",
                node.0.stderr_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "node API not answering: {}",
            node.0.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state["restarts"], 0);
    let forwards = state["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), ports.nbd.len() + 2);
    assert!(forwards.contains(&serde_json::json!(format!(
        "R 127.0.0.1:{} -> {api}",
        ports.reverse
    ))));

    // The hub side (127.0.0.1:reverse, sshd's listener) reaches the node's API.
    let health: serde_json::Value = http
        .get(format!("http://127.0.0.1:{}/api/v1/health", ports.reverse))
        .send()
        .await
        .expect("the reverse forward answers")
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["pid"], node.0.pid());

    // The ssh child is the node's; SIGTERM of the node stops it.
    let ssh: Vec<u32> = children(node.0.pid())
        .into_iter()
        .filter(|p| {
            sendense_shared::child::read_cmdline(*p)
                .is_some_and(|c| c.first().is_some_and(|a| a.ends_with("ssh")))
        })
        .collect();
    assert_eq!(ssh.len(), 1, "one ssh child: {ssh:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node.0.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut exit = node.0.exit_watch();
    tokio::time::timeout(Duration::from_secs(15), exit.wait_for(Option::is_some))
        .await
        .expect("node exits on SIGTERM")
        .unwrap();
    assert!(
        !sendense_shared::child::pid_alive(ssh[0]),
        "ssh outlived the node"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.2", ports.hub_api)).is_ok(),
        "the hub API forward is still bound"
    );
}
