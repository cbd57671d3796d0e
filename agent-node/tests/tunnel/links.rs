//! A tunnel of two ssh processes ("links"): each carries its share of the NBD slots (link 0 also
//! the API forwards), each is supervised on its own (a SIGKILL of one restarts that one only), the
//! tunnel's state is made of both, and the key line still refuses what no link needs.

use crate::support::*;
use sendense_shared::api::TunnelStateKind;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_links_share_the_slots_and_restart_alone() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let cfg = agent_node::tunnel::TunnelConfig {
        links: 2,
        ..sshd.tunnel_config(&ports)
    };
    let t = TestTunnel::start(cfg);
    let up = t.wait_up().await;
    assert_eq!(up.restarts, 0);
    assert_eq!(up.links.len(), 2, "{up:?}");
    let (first, last) = (ports.nbd.first, ports.nbd.last);
    assert_eq!(up.links[0].slots, vec![first, first + 2]);
    assert_eq!(up.links[1].slots, vec![first + 1]);
    assert!(up.links[0].api && !up.links[1].api);
    assert!(up.links.iter().all(|l| l.state == TunnelStateKind::Up));
    // The tunnel lists every forward, as with one ssh.
    assert_eq!(up.forwards.len(), 5, "{:?}", up.forwards);
    let pids: Vec<u32> = t
        .tunnel
        .ssh_pids()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_ne!(pids[0], pids[1]);
    assert_eq!(up.links[1].pid, Some(pids[1]));
    for f in ["tunnel.ssh_config", "tunnel.1.ssh_config"] {
        assert!(sshd.dir.path().join("run").join(f).is_file(), "{f}");
    }

    // Every slot reachable: a copy through each link.
    let d = sshd.dir.path();
    let size = 8 * MIB;
    let data = random_image(&d.join("src.raw"), size, 6 * MIB as usize);
    let src_port = free_port();
    let _src = serve(&d.join("src.raw"), "raw", "src", src_port).await;
    let copy_to = |slot: u16, name: String| {
        let d = d.to_path_buf();
        let data = data.clone();
        async move {
            let img = d.join(format!("{name}.raw"));
            empty_image(&img, size);
            let mut dst = serve(&img, "raw", &name, slot).await;
            let (ok, err) = node_copy(
                &format!("nbd://127.0.0.1:{src_port}/src"),
                &format!("nbd://127.0.0.2:{slot}/{name}"),
            )
            .await;
            assert!(ok, "copy through slot {slot} failed: {err}");
            dst.stop();
            let got = std::fs::read(&img).unwrap();
            assert!(got[..data.len()] == data[..], "slot {slot}: data differs");
        }
    };
    for slot in first..=last {
        copy_to(slot, format!("dst{slot}")).await;
    }

    // SIGKILL of link 1's ssh: that link restarts, link 0 (and the API) never went down.
    signal(pids[1], nix::sys::signal::Signal::SIGKILL);
    let again = t
        .wait(Duration::from_secs(30), "up again", |s| {
            s.state == TunnelStateKind::Up && s.restarts == 1
        })
        .await;
    assert_eq!(
        again.last_error.as_deref(),
        Some(format!("link 1 of 2: ssh (PID {}) killed by SIGKILL", pids[1]).as_str())
    );
    assert_eq!((again.links[0].restarts, again.links[1].restarts), (0, 1));
    assert_eq!(again.links[0].last_error, None);
    let now: Vec<u32> = t
        .tunnel
        .ssh_pids()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(now[0], pids[0], "link 0 was restarted too");
    assert_ne!(now[1], pids[1]);
    // The API link's own view stayed up throughout (what the hub client's gate watches).
    assert_eq!(t.tunnel.subscribe_api().borrow().state, TunnelStateKind::Up);
    assert_eq!(t.tunnel.subscribe_api().borrow().restarts, 0);
    // Data flows through the restarted link.
    copy_to(first + 1, "again".into()).await;

    t.stop().await;
    for p in now {
        assert!(
            !sendense_shared::child::pid_alive(p),
            "ssh {p} left running"
        );
    }
    for p in ports.nbd.ports() {
        assert!(
            std::net::TcpListener::bind(("127.0.0.2", p)).is_ok(),
            "forward port {p} still bound"
        );
    }

    // Link 1's own config with one more forward outside the key's permitopen list: the hub
    // refuses that channel, the permitted slot still works.
    let outside = free_port();
    let hub_side = std::net::TcpListener::bind(("127.0.0.1", outside)).unwrap();
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.arg("-F")
        .arg(d.join("run/tunnel.1.ssh_config"))
        .args([
            "-N",
            "-L",
            &format!("127.0.0.2:{outside}:127.0.0.1:{outside}"),
        ])
        .arg("sendense-hub")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let ssh = sendense_shared::child::Supervised::spawn(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.2", outside)).is_err() {
        assert!(
            Instant::now() < deadline && ssh.is_alive(),
            "ssh: {}",
            ssh.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.2", outside)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
    .await
    .unwrap();
    assert!(got.is_empty(), "{got:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ssh.stderr_tail().contains("administratively prohibited") {
        assert!(Instant::now() < deadline, "ssh: {}", ssh.stderr_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ssh.stop(Duration::from_secs(3)).await;
    // A connection sshd had made would wait in the listener's backlog.
    hub_side.set_nonblocking(true).unwrap();
    assert!(
        hub_side.accept().is_err(),
        "a forward outside permitopen reached the hub"
    );
}
