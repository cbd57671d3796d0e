//! Verification that cannot be fooled, with the real node: bytes that land in the hub's image
//! where the node wrote nothing (a hole it skipped, an area an incremental did not change) are
//! caught by the whole-disk read-back, which the written-range checksums alone never saw.

use super::sys::{MIB, SLOW_BPS, Sys, SysOptions, disk};

/// A throttled node; the hub's exports without TLS (`nbd_tls = false`), so that the test's
/// scribbler, standing for a fault below the authenticated data path, can reach them.
fn slow() -> SysOptions {
    SysOptions {
        throttle_bps: Some(SLOW_BPS),
        hub: Some(Box::new(super::sys::plain_nbd)),
        ..Default::default()
    }
}

/// Writes `len` bytes of 0x5a at `offset` into the job's export of disk `key`, as a second NBD
/// client (a fault in the write path, another writer, storage misbehaving).
fn scribble(b: &serde_json::Value, key: i64, offset: u64, len: u64) {
    let d = disk(b, key);
    let uri = format!(
        "nbd://127.0.0.1:{}/{}",
        d["nbd_port"],
        d["nbd_export_name"].as_str().unwrap()
    );
    sendense_tests::run(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P 0x5a {offset} {len}")])
            .arg(&uri),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_skipped_hole_or_an_unchanged_area_fails_verification() {
    let sys = Sys::start("e2ehole", slow()).await;
    // 1. A full: 80 MiB of disk 2000 is a hole the node never writes (cell 20 of 4 MiB).
    let (id, b) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;
    scribble(&b, 2000, 80 * MIB, 4096);
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    sys.assert_event(
        &id,
        "checksums_mismatch",
        &["disk 2000", "cell 20 (offset 83886080, 4194304 bytes)"],
    )
    .await;
    sys.assert_clean(&end).await;

    // 2. An incremental over a good full: garbage at 100 MiB of disk 2001, an area the guest
    // did not change since the full (the node lists only changed cells; the rest are the
    // full's, inherited).
    let full = sys.backup_completes("full").await;
    assert_eq!(full["integrity"], "verified", "{full:#}");
    // 36 MiB changed: about 3 s of copying at the node's throttle, time to scribble.
    sys.vm.guest_write(1, 0x78, 8 * MIB, 36 * MIB).await;
    let (id, b) = sys.backup("incremental").await;
    assert_eq!(b["backup_type"], "incremental", "{b}");
    scribble(&b, 2001, 100 * MIB, 65536);
    let copying = sys.node.get(&format!("/backup/{id}")).await.1;
    assert!(
        matches!(copying["status"].as_str(), Some("preparing" | "running")),
        "scribbled too late: {copying}"
    );
    let end = sys.wait_end(&id).await;
    assert_eq!(end["status"], "failed", "{end:#}");
    sys.assert_event(
        &id,
        "checksums_mismatch",
        &["disk 2001", "cell 25 (offset 104857600, 4194304 bytes)"],
    )
    .await;
    sys.assert_clean(&end).await;
    // The full under it is untouched and still the chain's good point.
    let again = sys
        .api
        .get_ok(&format!(
            "/api/v1/backups/{}",
            full["backup_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(again["integrity"], "verified", "{again:#}");
}
