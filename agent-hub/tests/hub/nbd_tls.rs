//! The authenticated data path: a job's export, started by the hub's qemu-nbd manager with the
//! hub's CA (`nbd_tls = true`, the default), opens only for the job's writer and the hub. A
//! client without a certificate (the NBD client, `qemu-img`, `nbdinfo`, run as an unprivileged
//! local user) is refused at the handshake; another job's certificate is refused by the authz;
//! unauthenticated connections held open do not lock the writer out for good.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_hub::nbd_ca::{NbdCa, backup_identity};
use agent_hub::qemu_nbd::{ExportSpec, QemuNbd, QemuNbdConfig};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient, NbdError};
use tokio_util::bytes::Bytes;

const ATTACKER: &str = "sendense-attacker";

fn qcow2(dir: &Path) -> PathBuf {
    let path = dir.join("b1.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the export if a test fails before stopping it.
struct Guard(QemuNbd);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.is_alive() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0.pid() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The export of job `job` as `prepare` starts it, with the CA in `data`.
async fn job_export(data: &Path, job: &str) -> (NbdCa, Guard) {
    let ca = NbdCa::open(data).unwrap();
    let cfg = QemuNbdConfig {
        tls: Some(ca.clone()),
        ..QemuNbdConfig::default()
    };
    let spec = ExportSpec {
        qcow2_path: qcow2(data),
        export_name: format!("vm1-disk-2000-{job}"),
        port: free_port(),
        read_only: false,
        socket: None,
        client: Some(backup_identity(job)),
    };
    // Ready means the hub's own certificate passed the handshake and the authz.
    let q = QemuNbd::start(&cfg, spec).await.expect("qemu-nbd with TLS");
    eprintln!("+ {}", q.command_line().join(" "));
    (ca, Guard(q))
}

fn with_tls(tls: sendense_shared::api::NbdTls) -> ConnectOptions {
    ConnectOptions {
        tls: Some(tls),
        ..ConnectOptions::default()
    }
}

/// An unprivileged local user for the attacker (created when missing), or `None` when this
/// test does not run as root.
fn attacker() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let lookup = || nix::unistd::User::from_name(ATTACKER).ok().flatten();
    if lookup().is_none() {
        let st = Command::new("useradd")
            .args(["-M", "-r", "-s", "/usr/sbin/nologin", ATTACKER])
            .status()
            .unwrap();
        assert!(st.success() || lookup().is_some(), "useradd {ATTACKER}");
    }
    let u = lookup().expect("the attacker user");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// Runs `program args` as the attacker (or as this user when not root).
fn as_attacker(program: &str, args: &[&str]) -> Output {
    let mut cmd = match attacker() {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    let out = cmd.args(args).output().unwrap();
    eprintln!(
        "{program} {args:?} as {ATTACKER}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn uri(addr: &NbdAddr) -> String {
    addr.to_string()
}

#[tokio::test]
async fn the_writer_gets_in_a_local_user_without_a_certificate_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, q) = job_export(dir.path(), "b1").await;
    let addr = q.0.nbd_addr();

    // The job's writer, with the certificate the start request carries.
    let writer = q.0.client_tls(Some(&ca)).unwrap().expect("a TLS export");
    let c = NbdClient::connect(&addr, &with_tls(writer)).await.unwrap();
    let data = Bytes::from(vec![0xa5; 1 << 20]);
    c.write(0, data.clone()).await.unwrap();
    c.flush().await.unwrap();

    // The project's client without TLS: refused before any option is answered.
    let e = NbdClient::connect(&addr, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("requires TLS")),
        "{e}"
    );
    // The stock tools as an unprivileged local user: no size, no data, no write.
    let u = uri(&addr);
    let out = as_attacker("qemu-img", &["info", &u]);
    assert!(!out.status.success());
    let out = as_attacker(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", q.0.spec().port)],
    );
    assert!(!out.status.success(), "NBD_OPT_LIST answered without TLS");
    let out = as_attacker("qemu-io", &["-f", "raw", "-c", "write -P 0 0 4096", &u]);
    assert!(!out.status.success());
    let out = as_attacker("qemu-io", &["-f", "raw", "-r", "-c", "read -v 0 512", &u]);
    assert!(!out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("a5 a5"),
        "the backup's bytes leaked"
    );

    // The writer's data is untouched.
    assert_eq!(c.read(0, 1 << 20).await.unwrap(), data);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn another_jobs_certificate_is_refused_by_the_authz() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, q) = job_export(dir.path(), "b1").await;
    let addr = q.0.nbd_addr();
    // Signed by the same CA, issued for job b2: the TLS handshake passes, the authz does not.
    let other = ca.issue_client(&backup_identity("b2")).unwrap();
    let e = NbdClient::connect(&addr, &with_tls(other))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("did not accept this client certificate")),
        "{e}"
    );
    // The hub itself is allowed (readiness probe, FLUSH).
    let hub = NbdClient::connect(&addr, &q.0.hub_connect_options())
        .await
        .unwrap();
    hub.flush().await.unwrap();
}

/// qemu-nbd counts a client at accept, before any handshake: `--shared=8` idle connections hold
/// every slot, TLS or not (measured: the writer waits about 10 s). They do not hold them for
/// good: qemu drops a client that has not finished negotiating within its handshake limit
/// (10 s, the CVE-2024-7409 fix Debian's 7.2 carries), and then the writer gets in. So TLS
/// keeps the data from a local user, not the delay: one who keeps reopening connections can
/// still slow a job (see README, "NBD data path").
#[tokio::test]
async fn idle_unauthenticated_connections_do_not_lock_the_writer_out() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, q) = job_export(dir.path(), "b1").await;
    let addr = q.0.nbd_addr();
    let port = q.0.spec().port;
    let squatters: Vec<_> = (0..12)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let writer = q.0.client_tls(Some(&ca)).unwrap().unwrap();
    let t = Instant::now();
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(30),
        ..with_tls(writer)
    };
    let c = NbdClient::connect(&addr, &opts).await;
    let waited = t.elapsed();
    eprintln!(
        "writer connected after {waited:?} with {} idle connections open: {:?}",
        squatters.len(),
        c.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );
    let c = c.expect("the writer gets in once qemu drops the idle clients");
    c.write(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    assert!(q.0.is_alive(), "the export survived");
    drop(squatters);
}

/// A real job of the hub binary with `nbd_tls` on (the default): while it runs, its export
/// refuses a local user without a certificate and a certificate of another job; the writer with
/// the job's certificate (here nbdcopy over `nbds://`, libnbd's TLS) copies, and the job
/// completes: the hub's FLUSH and readiness probe passed with the hub's own certificate.
#[tokio::test]
async fn a_running_jobs_export_opens_only_for_its_writer() {
    use super::env::{Env, targets};
    let env = Env::start_with(|o| {
        let i = o.extra_args.iter().position(|a| a == "--nbd-tls").unwrap();
        o.extra_args[i + 1] = "true".to_string();
    });
    let srcs = env.vm_with_sources("tls1", &[2000]).await;
    let (id, b) = env.backup("tls1", "full").await;
    let uri = targets(&b)[0].1.clone();
    assert!(
        NbdAddr::parse(&uri).is_ok(),
        "the targets string stays a plain URI: {uri}"
    );

    let out = as_attacker("qemu-img", &["info", &uri]);
    assert!(
        !out.status.success(),
        "a local user opened the job's export"
    );
    let out = as_attacker("qemu-io", &["-f", "raw", "-c", "write -P 0 0 4096", &uri]);
    assert!(!out.status.success(), "a local user wrote into the backup");

    // The CA as the hub keeps it (this test runs as the hub's user).
    let ca = NbdCa::open(&env.hub.opts.data_dir).unwrap();
    let addr = NbdAddr::parse(&uri).unwrap();
    let other = ca.issue_client(&backup_identity("another-job")).unwrap();
    let e = NbdClient::connect(&addr, &with_tls(other))
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::Tls { .. }), "{e}");

    // The writer: the job's certificate in libnbd's layout.
    let tls = ca.issue_client(&backup_identity(&id)).unwrap();
    let dir = env.path("writer-tls");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &tls.ca_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), &tls.cert_pem).unwrap();
    std::fs::write(dir.join("client-key.pem"), &tls.key_pem).unwrap();
    let nbds = format!(
        "{}?tls-certificates={}",
        uri.replacen("nbd://", "nbds://", 1),
        dir.display()
    );
    let out = sendense_tests::disks::nbdcopy_into(&srcs[0], &nbds);
    assert!(
        out.status.success(),
        "nbdcopy with the job's certificate: {out:?}"
    );
    let done = env
        .complete_ok(
            &id,
            &serde_json::json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
        )
        .await;
    let image = done["disk_results"][0]["qcow2_path"].as_str().unwrap();
    assert!(sendense_tests::disks::images_equal(
        &srcs[0],
        Path::new(image)
    ));
}
