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
    // Four links by default, at most one per slot (three here): the slots shared in turn, the
    // API forwards on link 0.
    let want = usize::from(agent_node::tunnel::config::DEFAULT_LINKS).min(ports.nbd.len());
    assert_eq!(want, 3);
    let links = state["links"].as_array().unwrap();
    assert_eq!(links.len(), want, "{state}");
    assert!(links.iter().all(|l| l["state"] == "up"), "{state}");
    assert_eq!(links[0]["api"], true);
    assert_eq!(links[1]["slots"], serde_json::json!([ports.nbd.first + 1]));
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

    // The ssh children (one per link) are the node's; SIGTERM of the node stops them.
    let ssh = node.ssh_children();
    assert_eq!(ssh.len(), want, "one ssh child per link: {ssh:?}");
    node.terminate(Duration::from_secs(15))
        .await
        .expect("node exits on SIGTERM");
    for p in ssh {
        assert!(
            !sendense_shared::child::pid_alive(p),
            "ssh {p} outlived the node"
        );
    }
    assert!(
        std::net::TcpListener::bind(("127.0.0.2", ports.hub_api)).is_ok(),
        "the hub API forward is still bound"
    );
}
