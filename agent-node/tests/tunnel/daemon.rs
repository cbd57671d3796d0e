//! The real `sendense-node` with `--tunnel`: its API serves the tunnel state, the hub side
//! reaches the node's API through the reverse forward, and SIGTERM stops ssh.

use crate::support::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_its_tunnel_state_and_is_reached_through_the_reverse_forward() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let mut node = node_with_tunnel(&sshd, &ports, Vec::new());
    let state = node.wait_for("/tunnel", 30, |v| v["state"] == "up").await;
    assert_eq!(state["restarts"], 0);
    let forwards = state["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), ports.nbd.len() + 2);
    assert!(forwards.contains(&serde_json::json!(format!(
        "R 127.0.0.1:{} -> 127.0.0.1:{}",
        ports.reverse, ports.node_api
    ))));

    // The hub side (127.0.0.1:reverse, sshd's listener) reaches the node's API.
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{}/api/v1/health", ports.reverse))
            .await
            .expect("the reverse forward answers")
            .json()
            .await
            .unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["pid"], node.pid());

    // The ssh child is the node's; SIGTERM of the node stops it.
    let ssh = node.ssh_children();
    assert_eq!(ssh.len(), 1, "one ssh child: {ssh:?}");
    node.terminate(Duration::from_secs(15))
        .await
        .expect("node exits on SIGTERM");
    assert!(
        !sendense_shared::child::pid_alive(ssh[0]),
        "ssh outlived the node"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.2", ports.hub_api)).is_ok(),
        "the hub API forward is still bound"
    );
}
