//! The qemu-nbd manager against the real qemu-nbd: readiness, data, process group, stop, exit
//! causes, and the reconciler's checks of foreign PIDs.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use agent_hub::qemu_nbd::{
    ExportSpec, OrphanOutcome, QemuNbd, QemuNbdConfig, QemuNbdError, is_our_qemu_nbd, stop_orphan,
};
use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};
use sendense_shared::child::{pid_alive, read_cmdline};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};

const SIZE: u64 = 64 * 1024 * 1024;

/// A port nothing listens on right now (the kernel picked it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let st = StdCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    path
}

fn spec(path: &Path, export: &str, port: u16) -> ExportSpec {
    ExportSpec {
        qcow2_path: path.to_path_buf(),
        export_name: export.to_string(),
        port,
        read_only: false,
        socket: None,
        client: None,
    }
}

fn pgid(pid: u32) -> Pid {
    unistd::getpgid(Some(Pid::from_raw(pid as i32))).unwrap()
}

/// Kills the export's group if a test fails before stopping it.
struct Guard(QemuNbd);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.is_alive() {
            let _ = signal::killpg(Pid::from_raw(self.0.pid() as i32), Signal::SIGKILL);
        }
    }
}

async fn start(spec: ExportSpec) -> Guard {
    let q = QemuNbd::start(&QemuNbdConfig::default(), spec)
        .await
        .expect("qemu-nbd start");
    eprintln!("started PID {}: {}", q.pid(), q.command_line().join(" "));
    Guard(q)
}

async fn gone_within(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while pid_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn start_serves_the_export_and_stop_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2");
    let port = free_port();
    let g = start(spec(&image, "vm1-disk-2000", port)).await;
    let q = &g.0;
    let pid = q.pid();

    // Ready means a client can use it at once, with several connections.
    let addr = q.nbd_addr();
    assert_eq!(
        addr.to_string(),
        format!("nbd://127.0.0.1:{port}/vm1-disk-2000")
    );
    let a = NbdClient::connect(&addr, &ConnectOptions::default())
        .await
        .unwrap();
    let b = NbdClient::connect(&addr, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(a.size(), SIZE);
    assert!(!a.read_only());
    assert!(
        a.can_multi_conn(),
        "--shared must make qemu-nbd advertise multi-conn"
    );
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    a.write(1 << 20, data.clone().into()).await.unwrap();
    a.flush().await.unwrap();
    assert_eq!(b.read(1 << 20, 65536).await.unwrap()[..], data[..]);
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();

    // Own process group, not ours; the command line is the one the reconciler will check.
    assert_eq!(pgid(pid).as_raw() as u32, pid);
    assert_ne!(pgid(pid), unistd::getpgrp());
    let cmd = q.command_line();
    assert_eq!(read_cmdline(pid).as_deref(), Some(cmd));
    let pos = |a: &str| cmd.iter().position(|c| c == a).unwrap();
    assert!(pos("--discard=unmap") < pos("--detect-zeroes=unmap"));
    assert!(is_our_qemu_nbd(pid, port, "vm1-disk-2000"));
    assert!(!is_our_qemu_nbd(pid, port + 1, "vm1-disk-2000"));
    assert!(!is_our_qemu_nbd(pid, port, "vm1-disk-2001"));
    assert!(q.is_alive());
    assert!(q.started_at() <= chrono::Utc::now());

    let report = q.stop().await;
    assert!(report.requested);
    assert_eq!(
        report.status, "exit status 0",
        "qemu-nbd exits cleanly on SIGTERM"
    );
    assert!(!q.is_alive());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu-nbd not reaped"
    );
    assert!(port_is_free(port), "port {port} still held after stop");
    assert!(!is_our_qemu_nbd(pid, port, "vm1-disk-2000"));
    assert_eq!(q.stop().await, report, "stop is idempotent");

    // The data reached the image: serve it read-only and read it back.
    let port2 = free_port();
    let ro = start(ExportSpec {
        read_only: true,
        socket: None,
        ..spec(&image, "vm1-disk-2000", port2)
    })
    .await;
    let c = NbdClient::connect(&ro.0.nbd_addr(), &ConnectOptions::default())
        .await
        .unwrap();
    assert!(c.read_only());
    assert_eq!(c.read(1 << 20, 65536).await.unwrap()[..], data[..]);
    c.disconnect().await.unwrap();
    ro.0.stop().await;
    assert!(port_is_free(port2));
}

#[tokio::test]
async fn a_missing_image_is_named_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.qcow2");
    let port = free_port();
    let err = QemuNbd::start(&QemuNbdConfig::default(), spec(&missing, "x", port))
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    let QemuNbdError::ExitedBeforeReady {
        pid,
        status,
        stderr,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(status, "exit status 1");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
    assert!(
        !err.port_taken(),
        "a missing image is not a port to move from"
    );
    assert!(
        msg.contains(&format!("image {} not found", missing.display())),
        "{msg}"
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(port_is_free(port));
}

#[tokio::test]
async fn a_port_held_by_another_listener_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2");
    // Held (never accepting) for the whole test: the readiness probe connects to it and must
    // still notice that qemu-nbd died.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let err = QemuNbd::start(&QemuNbdConfig::default(), spec(&image, "x", port))
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(err, QemuNbdError::ExitedBeforeReady { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains(&format!("port {port} already in use")),
        "{msg}"
    );
    assert!(err.port_taken(), "a job moves this disk to another port");
    drop(squatter);
}

#[tokio::test]
async fn a_second_server_for_the_same_port_and_export_is_not_taken_for_ours() {
    // An old qemu-nbd still serving the same export on the port answers the handshake; the new
    // one dies of "Address already in use" and start must say so, not return success. The new
    // one starts slowly (as on a loaded host) so the probe surely reaches the old one first.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let old = start(spec(&qcow2(dir.path(), "old.qcow2"), "vm1-disk-2000", port)).await;
    let slow = dir.path().join("slow-qemu-nbd");
    std::fs::write(&slow, "#!/bin/sh\nsleep 0.5\nexec qemu-nbd \"$@\"\n").unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = QemuNbdConfig {
        binary: slow,
        ..QemuNbdConfig::default()
    };
    let err = QemuNbd::start(
        &cfg,
        spec(&qcow2(dir.path(), "new.qcow2"), "vm1-disk-2000", port),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("port {port} already in use")),
        "{err}"
    );
    assert!(old.0.is_alive(), "the old server must be left alone");
    old.0.stop().await;
}

#[tokio::test]
async fn a_sigkill_is_seen_by_exit_watch() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let g = start(spec(&qcow2(dir.path(), "d.qcow2"), "x", port)).await;
    let mut watch = g.0.exit_watch();
    assert!(watch.borrow().is_none());
    signal::kill(Pid::from_raw(g.0.pid() as i32), Signal::SIGKILL).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(2), watch.wait_for(Option::is_some))
        .await
        .expect("exit not seen within 2 s")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(report.status, "killed by SIGKILL");
    assert!(!report.requested);
    assert!(!g.0.is_alive());
    assert!(port_is_free(port));
    assert_eq!(g.0.stop().await, report);
}

#[tokio::test]
async fn a_server_that_never_answers_is_stopped_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Stands in for a qemu-nbd stuck before listening (e.g. on a hung file system).
    let stuck = dir.path().join("qemu-nbd");
    std::fs::write(&stuck, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&stuck, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = QemuNbdConfig {
        binary: stuck,
        ready_timeout: Duration::from_millis(300),
        stop_grace: Duration::from_secs(1),
        ..QemuNbdConfig::default()
    };
    let port = free_port();
    let err = QemuNbd::start(&cfg, spec(Path::new("/nonexistent.qcow2"), "x", port))
        .await
        .unwrap_err();
    let QemuNbdError::NotReady { pid, waited, .. } = &err else {
        panic!("{err:?}")
    };
    eprintln!("{err}");
    assert_eq!(*waited, Duration::from_millis(300));
    assert!(err.to_string().contains("it was stopped"));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "left running");
}

#[tokio::test]
async fn an_abandoned_start_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    // Records its PID (kept by exec), then never listens.
    let pid_file = dir.path().join("pid");
    let stuck = dir.path().join("qemu-nbd");
    std::fs::write(
        &stuck,
        format!(
            "#!/bin/sh\necho $$ > '{}'\nexec sleep 30\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stuck, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = QemuNbdConfig {
        binary: stuck,
        ..QemuNbdConfig::default()
    };
    let start = QemuNbd::start(
        &cfg,
        spec(Path::new("/nonexistent.qcow2"), "x", free_port()),
    );
    // The job is cancelled while its export starts: the start future is dropped.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), start)
            .await
            .is_err()
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        gone_within(pid, Duration::from_secs(2)).await,
        "PID {pid} left running"
    );
    // Dead, then reaped: its /proc entry (a zombie's too) goes once the parent waited.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "PID {pid} not reaped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_missing_binary_is_named() {
    let cfg = QemuNbdConfig {
        binary: "/nonexistent/qemu-nbd".into(),
        ..QemuNbdConfig::default()
    };
    let err = QemuNbd::start(&cfg, spec(Path::new("/x.qcow2"), "x", free_port()))
        .await
        .unwrap_err();
    assert!(matches!(err, QemuNbdError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/qemu-nbd"));
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_runs() {
    let cfg = QemuNbdConfig {
        shared_connections: 1,
        ..QemuNbdConfig::default()
    };
    let err = QemuNbd::start(&cfg, spec(Path::new("/x.qcow2"), "x", 10100))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shared_connections"), "{err}");
    let err = QemuNbd::start(
        &QemuNbdConfig::default(),
        spec(Path::new("/x.qcow2"), "../etc", 10100),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("export_name"), "{err}");
}

/// A process started by "an earlier hub run": a new session, parent gone.
struct Detached {
    pid: u32,
    cmdline: Vec<String>,
}

impl Drop for Detached {
    fn drop(&mut self) {
        if pid_alive(self.pid) && read_cmdline(self.pid).as_ref() == Some(&self.cmdline) {
            let _ = signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

fn detached(args: &[String]) -> Detached {
    // `sh` exits right after forking `setsid PROG`, so PROG is nobody's child here.
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let out = StdCommand::new("sh")
        .arg("-c")
        .arg(format!(
            "setsid {} </dev/null >/dev/null 2>&1 & echo $!",
            quoted.join(" ")
        ))
        .output()
        .unwrap();
    let pid: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_cmdline(pid).as_deref() != Some(args) {
        assert!(Instant::now() < deadline, "{args:?} did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Detached {
        pid,
        cmdline: args.to_vec(),
    }
}

#[tokio::test]
async fn stop_orphan_stops_a_qemu_nbd_of_an_earlier_run_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "orphan.qcow2");
    let port = free_port();
    let mut args = vec!["qemu-nbd".to_string()];
    args.extend(agent_hub::qemu_nbd::command_args(
        &QemuNbdConfig::default(),
        &spec(&image, "vm9-disk-2001", port),
    ));
    let orphan = detached(&args);
    let pid = orphan.pid;
    // It serves (so it holds the port), as a left-over would.
    let addr = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
        export: "vm9-disk-2001".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match NbdClient::connect(&addr, &ConnectOptions::default()).await {
            Ok(c) => {
                c.disconnect().await.unwrap();
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "orphan never served: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pgid(pid).as_raw() as u32, pid);
    assert!(is_our_qemu_nbd(pid, port, "vm9-disk-2001"));

    // A record with another export or port does not match this process: left alone.
    let outcome = stop_orphan(pid, port, "vm9-disk-2000", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(outcome, OrphanOutcome::NotOurs { ref cmdline } if cmdline.starts_with("qemu-nbd ")),
        "{outcome:?}"
    );
    assert!(pid_alive(pid));

    let outcome = stop_orphan(pid, port, "vm9-disk-2001", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(outcome, OrphanOutcome::Stopped);
    assert!(gone_within(pid, Duration::from_secs(1)).await);
    assert!(port_is_free(port), "port {port} still held");
    assert_eq!(
        stop_orphan(pid, port, "vm9-disk-2001", Duration::from_secs(5))
            .await
            .unwrap(),
        OrphanOutcome::AlreadyGone
    );
}

#[tokio::test]
async fn other_processes_are_never_taken_for_qemu_nbd() {
    let me = std::process::id();
    assert!(!is_our_qemu_nbd(me, 10100, "x"));
    let sleeper = detached(&["sleep".to_string(), "33".to_string()]);
    assert!(!is_our_qemu_nbd(sleeper.pid, 10100, "x"));
    let outcome = stop_orphan(sleeper.pid, 10100, "x", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        OrphanOutcome::NotOurs {
            cmdline: "sleep 33".into()
        }
    );
    assert!(pid_alive(sleeper.pid), "a foreign process was signalled");
    let outcome = stop_orphan(me, 10100, "x", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(outcome, OrphanOutcome::NotOurs { .. }));
    // A PID above pid_max never exists.
    assert_eq!(
        stop_orphan(i32::MAX as u32, 10100, "x", Duration::from_secs(1))
            .await
            .unwrap(),
        OrphanOutcome::AlreadyGone
    );
}
