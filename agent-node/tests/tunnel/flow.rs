//! Up, NBD data through a forward, SIGKILL of ssh, restart, data again.

use crate::support::*;
use sendense_shared::api::TunnelStateKind;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comes_up_carries_nbd_data_and_restarts_after_sigkill() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let t = TestTunnel::start(sshd.tunnel_config(&ports));
    let up = t.wait_up().await;
    assert_eq!(up.restarts, 0);
    assert_eq!(up.last_error, None);
    let mut want: Vec<String> = ports
        .nbd
        .ports()
        .map(|p| format!("L 127.0.0.2:{p} -> 127.0.0.1:{p}"))
        .collect();
    want.push(format!("L 127.0.0.2:{0} -> 127.0.0.1:{0}", ports.hub_api));
    want.push(format!(
        "R 127.0.0.1:{} -> 127.0.0.1:{}",
        ports.reverse, ports.node_api
    ));
    assert_eq!(up.forwards, want);
    // The config file holds the key's path: private.
    let cfg_file = sshd.dir.path().join("run/tunnel.ssh_config");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cfg_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Source served directly (not through the tunnel), target on the hub side in the range.
    let d = sshd.dir.path();
    let size = 16 * MIB;
    let data = random_image(&d.join("src.raw"), size, 12 * MIB as usize);
    let src_port = free_port();
    let _src = serve(&d.join("src.raw"), "raw", "src", src_port).await;
    let copy_through = |target_port: u16, export: &'static str| {
        let from = format!("nbd://127.0.0.1:{src_port}/src");
        // 127.0.0.2:P is only ssh's listener; qemu-nbd listens on 127.0.0.1:P.
        let to = format!("nbd://127.0.0.2:{target_port}/{export}");
        async move { node_copy(&from, &to).await }
    };
    let p1 = ports.nbd.first + 1;
    empty_image(&d.join("dst1.raw"), size);
    let mut dst1 = serve(&d.join("dst1.raw"), "raw", "dst1", p1).await;
    let (ok, err) = copy_through(p1, "dst1").await;
    assert!(ok, "copy through the tunnel failed: {err}");
    dst1.stop();
    let got = std::fs::read(d.join("dst1.raw")).unwrap();
    assert_eq!(got.len() as u64, size);
    assert!(got[..data.len()] == data[..], "data differs after the copy");
    assert!(got[data.len()..].iter().all(|&b| b == 0));

    // SIGKILL of ssh: the supervisor restarts it, counts it, and says why.
    let pid = t.tunnel.ssh_pid().expect("ssh runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let again = t
        .wait(Duration::from_secs(30), "up again", |s| {
            s.state == TunnelStateKind::Up && s.restarts == 1
        })
        .await;
    assert_eq!(
        again.last_error.as_deref(),
        Some(format!("ssh (PID {pid}) killed by SIGKILL").as_str())
    );
    let new_pid = t.tunnel.ssh_pid().expect("ssh runs again");
    assert_ne!(new_pid, pid);
    assert!(!sendense_shared::child::pid_alive(pid));

    // Data flows through the new ssh as well.
    let p2 = ports.nbd.last;
    empty_image(&d.join("dst2.raw"), size);
    let mut dst2 = serve(&d.join("dst2.raw"), "raw", "dst2", p2).await;
    let (ok, err) = copy_through(p2, "dst2").await;
    assert!(ok, "copy after the restart failed: {err}");
    dst2.stop();
    assert!(std::fs::read(d.join("dst2.raw")).unwrap()[..data.len()] == data[..]);

    // Shutdown stops ssh and frees the forward ports.
    t.stop().await;
    assert!(
        !sendense_shared::child::pid_alive(new_pid),
        "ssh left running"
    );
    assert_eq!(t.tunnel.state().state, TunnelStateKind::Down);
    for p in ports.nbd.ports() {
        assert!(
            std::net::TcpListener::bind(("127.0.0.2", p)).is_ok(),
            "forward port {p} still bound"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_size_range_of_101_nbd_forwards_comes_up() {
    // As many forwards as the hub's default 10100-10200, on a free block elsewhere.
    let ports = Ports {
        nbd: free_block(101),
        ..Ports::pick()
    };
    let sshd = sshd(&ports).await;
    assert_eq!(sshd.authorized_line.matches("permitopen=").count(), 102);
    let t = TestTunnel::start(sshd.tunnel_config(&ports));
    let up = t.wait_up().await;
    assert_eq!(up.forwards.len(), 103);
    // Every local forward listens (bind fails on each).
    for p in ports.nbd.ports().chain([ports.hub_api]) {
        assert!(
            std::net::TcpListener::bind(("127.0.0.2", p)).is_err(),
            "127.0.0.2:{p} is not ssh's"
        );
    }
    t.stop().await;
}
