//! Endpoint errors and sessions: bad credentials, unreachable server, vanished VM, refused
//! cookie and certificate, VDDK thumbprints, expired and renewed sessions.

use super::*;
use agent_node::source::vsphere::VsphereDriver;
use agent_node::source::{ReleaseOutcome, SourceDriver, SourceError};
use sendense_shared::api::BackupType;
use sendense_tests::net::free_port;
use sendense_vsphere::{Secret, TlsPolicy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[tokio::test]
async fn bad_credentials_an_unreachable_server_and_a_vanished_vm() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let mut wrong = config(&sim, pin(&sim));
    wrong.password = Secret::new("not-the-password-7f3a".into());
    let e = VsphereDriver::new(&wrong, NODE, run.path().into())
        .list_vms()
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&sim.user) && text.contains(&sim.url),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");

    let port = free_port();
    let mut gone = config(&sim, pin(&sim));
    gone.url = format!("https://127.0.0.1:{port}");
    let e = VsphereDriver::new(&gone, NODE, run.path().into())
        .snapshot(&request(&sim, "x", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");

    // A pin that is not the server's certificate.
    let pinned_wrong = config(&sim, TlsPolicy::Pinned([7; 32]));
    let e = VsphereDriver::new(&pinned_wrong, NODE, run.path().into())
        .vm(&sim.vm.name)
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Endpoint { .. }), "{e}");
    assert!(
        e.to_string().contains("certificate") && e.to_string().contains(&sim.cert_sha256),
        "the error names the certificate the server showed: {e}"
    );

    // nbdkit cannot start after the snapshot was taken: the snapshot is removed again.
    let mut no_nbdkit = config(&sim, pin(&sim));
    no_nbdkit.nbdkit = PathBuf::from("/nonexistent/nbdkit");
    let e = VsphereDriver::new(&no_nbdkit, NODE, run.path().into())
        .snapshot(&request(&sim, "n1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::Tool { detail, .. } if detail.contains("/nonexistent/nbdkit")),
        "{e}"
    );
    assert!(sim.snapshot_names().unwrap().is_empty(), "snapshot removed");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));

    // The VM disappears while its snapshot is held: release still cleans up.
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "v1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let pids = nbdkit_pids(run.path());
    sim.destroy_vm().unwrap();
    d.release(&snap, ReleaseOutcome::Failure).await.unwrap();
    assert!(pids.iter().all(|&p| !alive(p)));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    assert!(matches!(
        d.vm(&sim.vm.name).await,
        Err(SourceError::UnknownVm { .. })
    ));
}

#[tokio::test]
async fn nbdkit_names_a_refused_cookie_and_an_untrusted_certificate() {
    use agent_node::source::nbdkit::{CaInfo, Nbdkit, NbdkitSpec, Plugin};
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let path = sim.vm.disks[0]
        .file_name
        .split_once("] ")
        .unwrap()
        .1
        .replace(".vmdk", "-flat.vmdk");
    let url = format!(
        "{}/folder/{path}?dcPath={}&dsName={}",
        sim.url, sim.datacenter, sim.datastore
    );
    let spec = |cookie: &str, cainfo: Option<CaInfo>| NbdkitSpec {
        run_dir: run.path().to_path_buf(),
        stem: "t-2000".into(),
        export: "vm1-disk-2000".into(),
        plugin: Plugin::Curl {
            url: url.clone(),
            cookie: cookie.into(),
            cookie_renew_secs: None,
            cainfo,
            insecure: false,
        },
    };
    // A session the server does not know.
    let e = Nbdkit::start(
        Path::new("nbdkit"),
        spec(
            "vmware_soap_session=\"52000000-0000-0000-0000-000000000000\"",
            Some(CaInfo::File(sim.cert_pem.clone())),
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("vm1-disk-2000") && e.contains("HTTP 401"), "{e}");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // A live session, but the simulator's self-signed certificate is not in the system store.
    let cookie = format!(
        "vmware_soap_session={}",
        sim.login_cookie(&sim.user, &sim.password).unwrap()
    );
    let e = Nbdkit::start(Path::new("nbdkit"), spec(&cookie, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // The same session with the certificate trusted: the export serves the disk.
    let n = Nbdkit::start(
        Path::new("nbdkit"),
        spec(
            &cookie,
            Some(CaInfo::Pem(std::fs::read_to_string(&sim.cert_pem).unwrap())),
        ),
    )
    .await
    .unwrap();
    let data = read_export(&n.socket(), n.export()).await;
    assert!(
        data == sim.disk_image(2000).unwrap(),
        "bytes through nbdkit curl"
    );
    let pid = n.pid();
    n.stop().await;
    assert!(!alive(pid));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
}

#[test]
fn the_vddk_thumbprint_is_the_sha1_fingerprint_openssl_prints() {
    let sim = sim();
    let pem = std::fs::read_to_string(&sim.cert_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(&sim.cert_pem)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    // "SHA1 Fingerprint=AA:BB:..."
    let text = String::from_utf8(out.stdout).unwrap();
    let want = text.trim().rsplit('=').next().unwrap();
    assert_eq!(
        agent_node::source::vsphere::sha1_thumbprint(&pem).as_deref(),
        Some(want)
    );
    assert_eq!(
        agent_node::source::vsphere::sha1_thumbprint("not a pem"),
        None
    );
}

#[tokio::test]
async fn an_expired_session_is_opened_again() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "s1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    // The session the driver uses, as it handed it to nbdkit.
    let cookie_file = run.path().join("nbdkit-s1-2000.cookie");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cookie_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the cookie file is private");
    let cookie = std::fs::read_to_string(&cookie_file).unwrap();
    let value = cookie
        .strip_prefix("vmware_soap_session=")
        .expect("a session cookie");
    // The server ends that session (as an idle timeout would).
    let (status, _, body) = sim
        .soap_call(
            Some(value),
            r#"<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>"#,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = sim.datastore_file_url(&sim.vm.disks[0].file_name);
    assert_eq!(
        sim.range_get(&url, Some(value), 0, 512).unwrap().0,
        401,
        "the session is gone"
    );
    // The next calls log in again and work: release removes the snapshot.
    assert_eq!(d.list_vms().await.unwrap().len(), 1);
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
}

/// Reads `len` bytes at `offset` of an export through a new connection.
async fn try_read(socket: &Path, export: &str, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    let c = connect(socket, export).await?;
    let r = c
        .read(offset, len)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string());
    let _ = c.disconnect().await;
    r
}

#[tokio::test]
async fn a_session_ended_mid_export_is_renewed_and_nbdkit_reads_again() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim, pin(&sim));
    cfg.session_keepalive = std::time::Duration::from_secs(1);
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    sim.write_disk(2000, 0, &pattern(0x5a, 64 * 1024)).unwrap();
    let snap = d
        .snapshot(&request(&sim, "ka-1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let disk = &snap.disks[0];
    let pids = nbdkit_pids(run.path());
    let cookie_file = run.path().join("nbdkit-ka-1-2000.cookie");
    let first = std::fs::read_to_string(&cookie_file).unwrap();
    let value = first
        .strip_prefix("vmware_soap_session=")
        .expect("a session cookie")
        .trim_matches('"')
        .to_string();
    assert_eq!(
        try_read(&disk.socket, &disk.export, 0, 512).await.unwrap(),
        pattern(0x5a, 512)
    );

    // A connection open across the session's end, like the copy engine's.
    let held = connect(&disk.socket, &disk.export).await.unwrap();
    // The session ends behind the driver's back (an administrator, or vCenter's idle timeout).
    let (status, _, body) = sim
        .soap_call(
            Some(&value),
            r#"<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>"#,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = sim.datastore_file_url(&sim.vm.disks[0].file_name);
    assert_eq!(
        sim.range_get(&url, Some(&value), 0, 512).unwrap().0,
        401,
        "the old session is gone"
    );

    // The keepalive notices, logs in again and rewrites the cookie file; nbdkit re-reads it and
    // serves the disk again (the same nbdkit processes: no restart). The very first read after
    // the logout already succeeds: nbdkit's retry-request filter holds it over the gap (the
    // copy engine would otherwise have seen EIO).
    let read = held.read(0, 512).await.map(|b| b.to_vec());
    let _ = held.disconnect().await;
    match read {
        Ok(data) => assert!(data == pattern(0x5a, 512), "other bytes after the logout"),
        Err(e) => panic!(
            "the first read after the logout failed: {e} (cookie file now {:?})",
            std::fs::read_to_string(&cookie_file)
        ),
    }
    let renewed = std::fs::read_to_string(&cookie_file).unwrap();
    assert_ne!(renewed, first, "a new session's cookie");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cookie_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the rewritten cookie file is private");
    assert_eq!(nbdkit_pids(run.path()), pids, "the same nbdkits");
    assert!(pids.iter().all(|&p| alive(p)));
    // Every disk reads again, the second too.
    let d1 = &snap.disks[1];
    assert!(try_read(&d1.socket, &d1.export, 0, 512).await.is_ok());

    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
    assert!(pids.iter().all(|&p| !alive(p)));
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
}
