//! Each way the tunnel fails to come up is named precisely in `last_error`, and the supervisor
//! keeps retrying (restarts counted) without ever saying `up`.

use crate::support::*;
use sendense_shared::api::TunnelStateKind;
use std::time::Duration;

/// Waits for a second failure too: the cause must be stable across restarts.
async fn error_twice(t: &TestTunnel) -> String {
    let first = t.wait_error().await;
    let s = t
        .wait(Duration::from_secs(30), "restarted", |s| {
            s.restarts >= 1 && s.state == TunnelStateKind::Down
        })
        .await;
    assert_eq!(s.last_error.as_deref(), Some(first.as_str()));
    assert_ne!(s.state, TunnelStateKind::Up);
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_port_is_named_by_the_preflight() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let mut cfg = sshd.tunnel_config(&ports);
    // Nothing listens there (the hub's sshd is on sshd.port).
    let wrong = free_port();
    cfg.target.port = wrong;
    let t = TestTunnel::start(cfg);
    let e = error_twice(&t).await;
    assert_eq!(
        e,
        format!("preflight: TCP connect to 127.0.0.1:{wrong} refused")
    );
    assert_eq!(
        t.tunnel.ssh_pid(),
        None,
        "ssh must not start when the preflight fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_named() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let mut cfg = sshd.tunnel_config(&ports);
    cfg.identity = sshd.wrong_key.clone();
    let t = TestTunnel::start(cfg);
    let e = error_twice(&t).await;
    let want = format!(
        "the hub refused the key {} for {}@127.0.0.1:{}: {}@127.0.0.1: Permission denied (publickey",
        sshd.wrong_key.display(),
        sshd.user,
        sshd.port,
        sshd.user
    );
    assert!(e.starts_with(&want), "{e}\nwanted: {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_already_bound_local_forward_port_is_named() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let busy = ports.nbd.first + 1;
    // Another process holds the node-side forward address.
    let _squatter = std::net::TcpListener::bind(("127.0.0.2", busy)).unwrap();
    let t = TestTunnel::start(sshd.tunnel_config(&ports));
    let e = error_twice(&t).await;
    // ssh's cause, then who holds the port: this test process (the squatter), its command
    // line and user.
    let want = format!(
        "local forward port {busy} already in use on 127.0.0.2 (another process listens \
         there; ssh: bind [127.0.0.2]:{busy}: Address already in use); port {busy} held by pid {} (",
        std::process::id()
    );
    assert!(e.starts_with(&want), "{e}\nwanted: {want}");
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert!(e.ends_with(&format!("), user {uid}")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_named() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let other = sshd.dir.path().join("other_host_key");
    keygen(&other);
    let kh = sshd.dir.path().join("known_hosts_wrong");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    std::fs::write(&kh, format!("[127.0.0.1]:{} {other_pub}", sshd.port)).unwrap();
    let mut cfg = sshd.tunnel_config(&ports);
    cfg.known_hosts = kh.clone();
    let t = TestTunnel::start(cfg);
    let e = error_twice(&t).await;
    assert_eq!(
        e,
        format!(
            "host key verification failed for [127.0.0.1]:{0} against known_hosts {1}: Host key \
             for [127.0.0.1]:{0} has changed and you have requested strict checking.",
            sshd.port,
            kh.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_port_outside_permitlisten_is_named() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let mut cfg = sshd.tunnel_config(&ports);
    let other = free_port();
    cfg.reverse_port = other;
    let t = TestTunnel::start(cfg);
    let e = error_twice(&t).await;
    assert!(
        e.starts_with(&format!(
            "remote port forwarding failed for listen port {other}: the hub's sshd refused it"
        )),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_accepts_but_never_speaks_ssh_is_bounded() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    // Accepts TCP (so the preflight passes) and never sends an SSH banner.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let mut cfg = sshd.tunnel_config(&ports);
    cfg.target.port = silent_port;
    cfg.up_timeout = Duration::from_secs(2);
    let t = TestTunnel::start(cfg);
    let e = t.wait_error().await;
    assert!(
        e.starts_with("ssh (PID ")
            && e.contains("did not establish the forwards within 2s; stopped it"),
        "{e}"
    );
    let pid: u32 = e["ssh (PID ".len()..]
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        !sendense_shared::child::pid_alive(pid),
        "the stalled ssh was stopped"
    );
}
