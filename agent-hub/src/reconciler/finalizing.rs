//! A job the previous hub process left `finalizing`: its writer reported completion and its
//! whole-disk checksums were stored before that report was acknowledged, so the images can
//! still be proven. Each disk is read back against its sidecar (checked against the catalog's
//! digest) and `qemu-img check`ed; when every disk passes, the job completes as it would have.
//! Anything short of that (a disk without checksums, a mismatch, an unreadable image) is the
//! cause the job then fails with.

use crate::db::{Db, DiskUpdate};
use crate::manifest::Manifest;
use crate::readback::ReadBack;
use sendense_shared::api::{Backup, DiskStatus, Integrity, JobStatus};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

/// Proves and completes `b`; `Ok(description)` when it completed, `Err(cause)` otherwise.
pub async fn prove(db: &Db, readback: &ReadBack, b: &Backup) -> Result<String, String> {
    let id = &b.backup_id;
    let rows = db
        .backup_disks(id)
        .await
        .map_err(|e| sendense_shared::errors::chain(&e))?;
    let mut hub_computed = false;
    let mut cells = 0;
    for r in &rows {
        let disk = r.result.disk_key;
        let (Some(path), Some(digest)) = (&r.manifest_path, &r.manifest_blake3) else {
            return Err(format!(
                "disk {disk} has no stored whole-disk checksums to prove its image with"
            ));
        };
        hub_computed |= r.result.checksums_source.as_deref() == Some("hub");
        let m = Manifest::read(Path::new(path), Some(digest))
            .await
            .map_err(|e| format!("disk {disk}: {}", sendense_shared::errors::chain(&e)))?;
        let image = Path::new(&r.result.qcow2_path);
        let report = readback
            .check(image, &m, &CancellationToken::new(), &AtomicU64::new(0))
            .await
            .map_err(|e| format!("disk {disk}: {}", sendense_shared::errors::chain(&e)))?;
        if !report.is_clean() {
            return Err(format!(
                "disk {disk}: the image differs from its stored checksums: {}",
                report.describe_mismatches()
            ));
        }
        let checked = crate::repository::qemu_img_check(image)
            .await
            .map_err(|e| format!("disk {disk}: qemu-img check failed: {e}"))?;
        if !checked.is_clean() {
            return Err(format!(
                "disk {disk}: qemu-img check: {}",
                checked.summary()
            ));
        }
        cells += report.cells;
    }
    let q = |e: crate::db::DbError| sendense_shared::errors::chain(&e);
    let integrity = if hub_computed {
        Integrity::HubComputed
    } else {
        Integrity::Verified
    };
    db.set_integrity(id, integrity, None).await.map_err(q)?;
    for r in &rows {
        db.update_disk(
            id,
            r.result.disk_key,
            &DiskUpdate {
                status: Some(DiskStatus::Completed),
                ..Default::default()
            },
        )
        .await
        .map_err(q)?;
    }
    if !db
        .transition_backup(id, &[JobStatus::Finalizing], JobStatus::Completed, None)
        .await
        .map_err(q)?
    {
        return Err("the job left finalizing meanwhile".into());
    }
    Ok(format!(
        "all {} disk(s) read back equal to their stored checksums ({cells} cells) and qemu-img \
         check clean",
        rows.len()
    ))
}
