//! A local user's connection flood during a job through the real tunnel (sshd on loopback, the
//! hub's exports on unix sockets, the node's streamlocal forwards): the unprivileged
//! `sendense-attacker` (run with `setpriv`) connects again and again to every NBD endpoint it
//! can name (the old TCP ports on both loopback addresses, the hub's export sockets, the
//! node's forwarded sockets), holds whatever it gets, and binds every port of the NBD range on
//! the hub's address (which used to starve the port allocator). The node still copies, the job
//! completes verified, and every connect is refused: EACCES for the sockets (their directories'
//! modes), ECONNREFUSED for the TCP ports (nothing listens there any more).

use super::sys::{DATA, DISK_SIZE, hub_bin, node_bin};
use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess, TunnelOptions};
use sendense_tests::qemu::TestVm;
use sendense_tests::sshd::{KeyPorts, Sshd};
use serde_json::{Value, json};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIND: &str = "127.0.0.2";
const ATTACKER: &str = "sendense-attacker";
/// The attacker's interpreter: Debian's, which any user may run (scripts/setup.sh).
const PYTHON: &str = "/usr/bin/python3";

/// The flood: one round of connects to every target, then the port squat, then rounds until
/// its stdin closes (or `max_secs`), every connection that succeeds held open. Prints what each
/// attempt got, by kind and errno name.
const FLOOD: &str = r#"
import errno, json, os, select, socket, sys, time
cfg = json.loads(sys.argv[1])
held, stats = [], {}
def note(kind, res):
    stats.setdefault(kind, {}).setdefault(res, 0)
    stats[kind][res] += 1
def why(e):
    return errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
def round_(tcp):
    for host, port in tcp:
        s = socket.socket(); s.settimeout(0.5)
        try:
            s.connect((host, port)); held.append(s); note("tcp", "ok")
        except OSError as e:
            note("tcp", why(e)); s.close()
    for path in cfg["unix"]:
        s = socket.socket(socket.AF_UNIX); s.settimeout(0.5)
        try:
            s.connect(path); held.append(s); note("unix", "ok")
        except OSError as e:
            note("unix", why(e)); s.close()
try:
    os.listdir(cfg["private"]); note("private", "ok")
except OSError as e:
    note("private", why(e))
round_(cfg["tcp_before_squat"] + cfg["tcp"])
for port in cfg["squat"]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port)); s.listen(16); held.append(s); note("bind", "ok")
    except OSError as e:
        note("bind", why(e)); s.close()
print("squatting", flush=True)
rounds, deadline = 1, time.time() + cfg["max_secs"]
while time.time() < deadline:
    round_(cfg["tcp"])
    rounds += 1
    r, _, _ = select.select([sys.stdin], [], [], 0.05)
    if r and not sys.stdin.read(1):
        break
print(json.dumps({"rounds": rounds, "held": len(held), "stats": stats}), flush=True)
"#;

/// The attacker's uid and gid, creating the user when missing (the tests run as root).
fn attacker() -> (u32, u32) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the flood test runs the attacker as another user: run it as root"
    );
    let lookup = || nix::unistd::User::from_name(ATTACKER).ok().flatten();
    if lookup().is_none() {
        let st = Command::new("useradd")
            .args(["-M", "-r", "-s", "/usr/sbin/nologin", ATTACKER])
            .status()
            .unwrap();
        assert!(st.success() || lookup().is_some(), "useradd {ATTACKER}");
    }
    let u = lookup().expect("the attacker user");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `n` consecutive ports free on 127.0.0.1 and on 127.0.0.2.
fn free_on_both(n: u16) -> (u16, u16) {
    let ips = [std::net::Ipv4Addr::LOCALHOST, BIND.parse().unwrap()];
    sendense_tests::net::free_port_range_on(n, &ips)
}

fn open_to_all(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_users_connection_flood_gets_nothing_and_the_job_completes() {
    let (uid, gid) = attacker();
    let tmp = tempfile::Builder::new()
        .prefix("sde2e-flood-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    // Every directory on the way is open to the attacker, so only the socket directories'
    // own modes (and the hub's 0700 data directory) can stop it.
    open_to_all(d);
    open_to_all(&d.join("sockets"));
    open_to_all(&d.join("node"));
    let hub_sockets = d.join("sockets/nbd");
    let (hub_port, _) = free_on_both(1);
    let nbd = free_on_both(4);
    let mut hopts = HubOptions::new(d.join("hub"));
    hopts.listen = format!("127.0.0.1:{hub_port}");
    hopts.nbd_ports = Some(nbd);
    hopts.extra_args.extend([
        "--nbd-socket-dir".to_string(),
        hub_sockets.display().to_string(),
    ]);
    let hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
    let api = hub.api();
    let vm = TestVm::start("floodvm", &d.join("vm"), &[DISK_SIZE, DISK_SIZE], |imgs| {
        for (i, img) in imgs.iter().enumerate() {
            for (off, len, pat) in DATA {
                disks::write_pattern(img, *off, *len, pat + i as u8);
            }
        }
    })
    .await
    .expect("start QEMU");
    let (reverse, _) = free_on_both(1);
    let (node_api, _) = free_on_both(1);
    let sshd = Sshd::start(
        &node_bin(),
        KeyPorts {
            nbd,
            hub_api: hub_port,
            reverse,
            hub_nbd_dir: Some(hub_sockets.clone()),
        },
    )
    .await;
    let node = NodeProcess::start(
        &node_bin(),
        NodeOptions {
            token_file: Some(
                hub.node_credential("floodnode")
                    .expect("enrolling the node"),
            ),
            vms: vec![("floodvm".into(), vm.node_qmp.clone())],
            listen: format!("127.0.0.1:{node_api}"),
            tunnel: Some(TunnelOptions {
                target: sshd.login(),
                identity: sshd.user_key.clone(),
                known_hosts: sshd.known_hosts.clone(),
                bind: BIND.into(),
                nbd_ports: nbd,
                hub_api_port: hub_port,
                reverse_port: reverse,
            }),
            args: vec![
                "--tunnel-hub-nbd-dir".to_string(),
                hub_sockets.display().to_string(),
            ],
            // Slow enough that the flood runs through the whole copy.
            throttle_bps: Some(16 << 20),
            ..NodeOptions::new(d.join("node"), "floodnode")
        },
    )
    .expect("start sendense-node");
    let t = Instant::now();
    loop {
        let (s, v) = api.get("/api/v1/vms/floodvm").await;
        if s == 200 && v["node"] == "floodnode" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "VM not imported through the tunnel: {s} {v}\nnode: {}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The flood, started before the job and stopped after it.
    let ports: Vec<u16> = (nbd.0..=nbd.1).collect();
    let node_sockets = d.join("node/run/nbd");
    let unix: Vec<String> = ports
        .iter()
        .flat_map(|p| {
            [
                hub_sockets.join(format!("{p}.sock")),
                node_sockets.join(format!("{p}.sock")),
            ]
        })
        .map(|p| p.display().to_string())
        .collect();
    let cfg = json!({
        "tcp_before_squat": ports.iter().map(|p| json!(["127.0.0.1", p])).collect::<Vec<_>>(),
        "tcp": ports.iter().map(|p| json!([BIND, p])).collect::<Vec<_>>(),
        "unix": unix,
        "squat": ports,
        "private": hub.opts.data_dir,
        "max_secs": 180,
    });
    let mut flood = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args([PYTHON, "-c", FLOOD])
        .arg(cfg.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv python3");
    let mut out = std::io::BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "squatting", "the flood did not start");

    // The node copies through its forwards while the flood goes on.
    let done = super::sys::full_backup_completes(&api, "floodvm", &node).await;
    let id = done["backup_id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let verified = loop {
        let b = api.get_ok(&format!("/api/v1/backups/{id}")).await;
        if b["integrity"] != "unverified" || t.elapsed() > Duration::from_secs(60) {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(verified["integrity"], "verified", "{verified:#}");
    for (i, r) in done["disk_results"].as_array().unwrap().iter().enumerate() {
        let port = r["nbd_port"].as_u64().unwrap() as u16;
        assert!((nbd.0..=nbd.1).contains(&port), "{r}");
        let now = d.join(format!("disk{i}.raw"));
        vm.copy_disk_now(i, &now).await;
        let image = Path::new(r["qcow2_path"].as_str().unwrap());
        assert!(disks::images_equal(&now, image), "disk {i} differs");
    }

    // Stop the flood: close its stdin, read its account.
    let mut stdin = flood.stdin.take().unwrap();
    let _ = stdin.flush();
    drop(stdin);
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let status = flood.wait().unwrap();
    assert!(status.success(), "the flood failed: {status}");
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    eprintln!("flood: {report}");
    let stats = &report["stats"];
    // It really was another user: the hub's data directory is closed to it.
    assert_eq!(stats["private"], json!({"EACCES": 1}), "{report}");
    // It held every port of the range on the hub's address, and the job got its slots anyway.
    assert_eq!(stats["bind"], json!({"ok": ports.len()}), "{report}");
    // Many rounds, each one refused, nothing held but its own listeners.
    let rounds = report["rounds"].as_u64().unwrap();
    assert!(rounds >= 5, "the flood ran only {rounds} rounds: {report}");
    let unix_tries = rounds * 2 * ports.len() as u64;
    assert_eq!(stats["unix"], json!({"EACCES": unix_tries}), "{report}");
    let tcp_tries = (rounds + 1) * ports.len() as u64;
    assert_eq!(stats["tcp"], json!({"ECONNREFUSED": tcp_tries}), "{report}");
    assert_eq!(report["held"], json!(ports.len()), "{report}");

    drop(node);
    drop(sshd);
    drop(hub);
}
