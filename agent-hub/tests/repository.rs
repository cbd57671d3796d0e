//! The QCOW2 repository with the real `qemu-img` and `qemu-io`.

use agent_hub::repository::{
    self, CLUSTER_SIZE, RepoError, RepoLayout, create_full, create_incremental, qemu_img_check,
    remove_image, space,
};
use sendense_shared::ids::{BackupId, DiskKey};
use std::path::Path;
use std::process::Command;

fn info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `qemu-io` on an image (read-only unless `write`); returns whether every command succeeded.
fn qemu_io(path: &Path, write: bool, cmd: &str) -> bool {
    let mut c = Command::new("qemu-io");
    if !write {
        c.arg("-r");
    }
    let out = c
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io exits 0 even when a read pattern does not match; it says so on its output.
    out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed:")
}

#[tokio::test]
async fn full_image_has_the_disk_size_and_our_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    let layout = RepoLayout::new(dir.path());
    let path = layout
        .image_path("pgtest1", DiskKey(2001), &BackupId::from("b-1"))
        .unwrap();
    assert_eq!(path, dir.path().join("pgtest1/2001/b-1.qcow2"));
    let size = 3 * 1024 * 1024 * 1024 + 512 * 1024;
    create_full(&path, size).await.unwrap();
    let i = info(&path);
    assert_eq!(i["format"], "qcow2");
    assert_eq!(i["virtual-size"], size);
    assert_eq!(i["cluster-size"], CLUSTER_SIZE);
    assert!(i.get("backing-filename").is_none());
    assert!(qemu_img_check(&path).await.unwrap().is_clean());
    // A whole VM disk: not for every local user (qemu-img alone leaves the umask's 0644).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o640, "image");
    assert_eq!(mode(path.parent().unwrap()), 0o750, "disk directory");
    assert_eq!(mode(&dir.path().join("pgtest1")), 0o750, "VM directory");

    let e = create_full(Path::new("/proc/no/such/dir/x.qcow2"), 1 << 20)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/proc/no/such/dir"), "{e}");
}

#[tokio::test]
async fn incremental_records_a_relative_backing_file_and_the_chain_reads_through() {
    let dir = tempfile::tempdir().unwrap();
    let layout = RepoLayout::new(dir.path().join("repo"));
    let base = layout
        .image_path("pgtest1", DiskKey(2000), &BackupId::from("b-1"))
        .unwrap();
    let top = layout
        .image_path("pgtest1", DiskKey(2000), &BackupId::from("b-2"))
        .unwrap();
    create_full(&base, 64 << 20).await.unwrap();
    assert!(qemu_io(&base, true, "write -P 0xab 0 1M"));
    assert!(qemu_io(&base, true, "write -P 0xcd 8M 1M"));

    create_incremental(&top, &base, 64 << 20).await.unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(&top).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o640, "incremental image");
    }
    let i = info(&top);
    assert_eq!(
        i["backing-filename"], "b-1.qcow2",
        "backing path must be relative"
    );
    assert_eq!(i["backing-filename-format"], "qcow2");
    assert_eq!(i["virtual-size"], 64 << 20);

    // Writes to the top change only the top.
    assert!(qemu_io(&top, true, "write -P 0x11 8M 64k"));
    assert!(
        qemu_io(&top, false, "read -P 0xab 0 1M"),
        "unchanged data reads through the chain"
    );
    assert!(qemu_io(&top, false, "read -P 0x11 8M 64k"));
    assert!(qemu_io(&top, false, "read -P 0xcd 9371648 64k"));
    assert!(
        qemu_io(&base, false, "read -P 0xcd 8M 1M"),
        "the base is untouched"
    );
    assert!(
        !qemu_io(&top, false, "read -P 0xcd 8M 64k"),
        "the check can fail"
    );

    // The chain survives moving the whole repository (it holds no absolute path).
    let moved = dir.path().join("moved");
    std::fs::rename(dir.path().join("repo"), &moved).unwrap();
    let top_moved = moved.join("pgtest1/2000/b-2.qcow2");
    assert!(qemu_io(&top_moved, false, "read -P 0xab 0 1M"));
    let chain = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json"])
        .arg(&top_moved)
        .output()
        .unwrap();
    assert!(
        chain.status.success(),
        "{}",
        String::from_utf8_lossy(&chain.stderr)
    );
    let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert!(qemu_img_check(&top_moved).await.unwrap().is_clean());

    // A backing file in another directory is recorded relative too.
    let other = moved.join("pgtest1/3000/b-3.qcow2");
    create_incremental(&other, &top_moved, 64 << 20)
        .await
        .unwrap();
    assert_eq!(info(&other)["backing-filename"], "../2000/b-2.qcow2");
    assert!(qemu_io(&other, false, "read -P 0x11 8M 64k"));

    let e = create_incremental(
        &moved.join("x/y.qcow2"),
        &moved.join("missing.qcow2"),
        1 << 20,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RepoError::Command { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.qcow2"), "{e}");
}

#[tokio::test]
async fn check_reports_a_damaged_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    create_full(&path, 16 << 20).await.unwrap();
    assert!(qemu_io(&path, true, "write -P 0x5a 0 4M"));
    let clean = qemu_img_check(&path).await.unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.format, "qcow2");
    assert!(clean.allocated_clusters.unwrap() >= 64, "{clean:?}");

    // Raise the refcount of cluster 0 (the header) from 1 to 2 by hand: one leaked cluster.
    // Header offset 48: refcount table offset; its first entry: the first refcount block, whose
    // first 16-bit big-endian entry counts cluster 0.
    let mut bytes = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let table = be64(&bytes, 48);
    let block = be64(&bytes, table);
    assert_eq!(
        &bytes[block..block + 2],
        &[0, 1],
        "cluster 0 is referenced once"
    );
    bytes[block + 1] = 2;
    std::fs::write(&path, &bytes).unwrap();
    let leaky = qemu_img_check(&path).await.unwrap();
    assert_eq!(leaky.leaks, 1, "{leaky:?}");
    assert!(!leaky.is_clean());
    assert!(
        leaky.summary().starts_with("NOT clean"),
        "{}",
        leaky.summary()
    );

    // Not a qcow2 at all: the check itself fails, with the command in the error.
    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, vec![0u8; 65536]).unwrap();
    let e = qemu_img_check(&junk).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("qemu-img check") && msg.contains("junk.qcow2"),
        "{msg}"
    );
}

#[test]
fn space_matches_statvfs() {
    let dir = tempfile::tempdir().unwrap();
    let s = space(dir.path()).unwrap();
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %b %S"])
        .arg(dir.path())
        .output()
        .unwrap();
    let f: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(s.total_bytes, f[1] * f[2]);
    let df_free = f[0] * f[2];
    assert!(
        s.free_bytes.abs_diff(df_free) < 64 << 20,
        "{} vs {df_free}",
        s.free_bytes
    );

    let e = space(Path::new("/no/such/dir")).unwrap_err();
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
}

#[tokio::test]
async fn escaping_names_are_refused_and_removal_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let layout = RepoLayout::new(dir.path());
    for bad in ["..", "../../etc", "a/b", "a\0b"] {
        let e = layout
            .image_path(bad, DiskKey(2000), &BackupId::from("b-1"))
            .unwrap_err();
        assert!(e.to_string().contains("vm_name"), "{bad:?}: {e}");
    }
    let e = layout
        .image_path("pg", DiskKey(2000), &BackupId::from("../b"))
        .unwrap_err();
    assert!(e.to_string().contains("backup_id"), "{e}");

    let path = layout
        .image_path("pg", DiskKey(2000), &BackupId::from("b-1"))
        .unwrap();
    create_full(&path, 1 << 20).await.unwrap();
    remove_image(&path).await.unwrap();
    assert!(!path.exists());
    remove_image(&path).await.unwrap();
    assert_eq!(
        repository::relative_backing(&path, &path.with_file_name("a.qcow2")).unwrap(),
        Path::new("a.qcow2")
    );
}
