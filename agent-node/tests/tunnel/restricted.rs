//! The restricted key line refuses what the tunnel does not need: a `-L` to a port outside the
//! permitopen list, a `-R` outside permitlisten.

use crate::support::*;
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A listener on the hub side that greets every connection, to tell "reached" from "refused".
fn greeter(port: u16) -> std::thread::JoinHandle<()> {
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"hello from the hub\n");
        }
    })
}

/// Connects to ADDR and reads what arrives until EOF (bounded).
fn read_all(port: u16) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.2", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

fn ssh_args(sshd: &Sshd) -> Vec<String> {
    let o = |s: String| ["-o".to_string(), s];
    let mut a: Vec<String> = vec!["-N".into(), "-p".into(), sshd.port.to_string()];
    a.extend(o(format!("IdentityFile={}", sshd.user_key.display())));
    a.extend(o("IdentitiesOnly=yes".into()));
    a.extend(o(format!(
        "UserKnownHostsFile={}",
        sshd.known_hosts.display()
    )));
    a.extend(o("StrictHostKeyChecking=yes".into()));
    a.extend(o("BatchMode=yes".into()));
    a.extend(o("ExitOnForwardFailure=yes".into()));
    a
}

/// Runs ssh with `args` (stdin closed) to its end.
async fn ssh_output(args: &[String]) -> std::process::Output {
    tokio::process::Command::new("ssh")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_line_refuses_forwards_outside_the_list() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let allowed = ports.nbd.first;
    let outside = free_port();
    let _g1 = greeter(allowed);
    let _g2 = greeter(outside);

    let mut args = ssh_args(&sshd);
    args.extend([
        "-L".into(),
        format!("127.0.0.2:{allowed}:127.0.0.1:{allowed}"),
        "-L".into(),
        format!("127.0.0.2:{outside}:127.0.0.1:{outside}"),
        format!("{}@127.0.0.1", sshd.user),
    ]);
    eprintln!("ssh {}", args.join(" "));
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null());
    let ssh = sendense_shared::child::Supervised::spawn(cmd).unwrap();
    // Both local listeners exist once ssh logged in; the restriction bites at channel open.
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.2", outside)).is_err() {
        assert!(
            Instant::now() < deadline && ssh.is_alive(),
            "ssh: {}",
            ssh.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a, b) = tokio::task::spawn_blocking(move || (read_all(allowed), read_all(outside)))
        .await
        .unwrap();
    assert_eq!(
        a, b"hello from the hub\n",
        "the permitted forward must work"
    );
    assert!(
        b.is_empty(),
        "a forward outside permitopen reached the hub: {b:?}"
    );
    // ssh logs the refused channel once sshd's answer arrived: wait for that line, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let err = ssh.stderr_tail();
        if err.contains("administratively prohibited") {
            break;
        }
        assert!(Instant::now() < deadline, "ssh's stderr: {err}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ssh.stop(Duration::from_secs(3)).await;

    // -R outside permitlisten: refused by the hub, ssh exits saying so.
    let not_allowed = free_port();
    let mut args = ssh_args(&sshd);
    args.extend([
        "-R".into(),
        format!("127.0.0.1:{not_allowed}:127.0.0.1:{}", ports.node_api),
        format!("{}@127.0.0.1", sshd.user),
    ]);
    let out = ssh_output(&args).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "remote port forwarding failed for listen port {not_allowed}"
        )),
        "{err}"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", not_allowed)).is_ok(),
        "the refused port is listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_user_cannot_run_a_command() {
    let ports = Ports::pick();
    let sshd = sshd(&ports).await;
    let marker = sshd.dir.path().join("ran");
    let mut args = ssh_args(&sshd);
    args.retain(|a| a != "-N");
    args.extend([
        format!("{}@127.0.0.1", sshd.user),
        format!("touch {}; id", marker.display()),
    ]);
    let out = ssh_output(&args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("uid="), "a command ran: {stdout}");
    assert!(
        !marker.exists(),
        "a command ran: {} exists",
        marker.display()
    );
    assert!(!out.status.success());
}
