//! The end of a backup's copies, without I/O: every disk's copy result and the circumstances
//! gathered after them (a cancel, what the tunnel says, whether the VM still exists) become each
//! disk's status and error and the job's terminal status and error.

use super::state::JobState;
use crate::copy::{CopyError, CopyOutcome};
use sendense_shared::api::{DiskStatus, JobStatus};
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::NbdAddr;

/// One disk's copy, as it ended.
pub(super) struct DiskResult {
    pub key: DiskKey,
    pub target: NbdAddr,
    pub result: Result<CopyOutcome, CopyError>,
    /// The snapshot's change id of the disk (vSphere CBT), reported when the copy succeeded.
    pub change_id: Option<String>,
    /// The target is one of the tunnel's forwards.
    pub via_tunnel: bool,
}

/// What the copies' results alone do not say.
pub(super) struct Circumstances {
    /// The job was cancelled (by the API or the shutdown), and in which words.
    pub cancelled: Option<&'static str>,
    /// The tunnel's account of a failure through it.
    pub tunnel_note: Option<String>,
    /// The VM no longer exists on its hypervisor (in words).
    pub vm_gone: Option<String>,
}

pub(super) fn is_cancel(e: &CopyError) -> bool {
    matches!(e, CopyError::Cancelled)
}

/// The disk whose own failure stopped the others (the first that failed other than by the
/// siblings' cancel), if any.
pub(super) fn failed_key(results: &[DiskResult]) -> Option<DiskKey> {
    results
        .iter()
        .find(|r| matches!(&r.result, Err(e) if !is_cancel(e)))
        .map(|r| r.key)
}

/// Applies the results to `st` and returns the job's terminal status.
pub(super) fn settle(
    backup_id: &BackupId,
    st: &mut JobState,
    results: Vec<DiskResult>,
    c: Circumstances,
) -> JobStatus {
    let failed_key = failed_key(&results);
    let mut all_ok = true;
    let mut first_error = None;
    for r in results {
        let key = r.key;
        let Some(d) = st.disks.iter_mut().find(|d| d.disk_key == key) else {
            continue;
        };
        match r.result {
            Ok(outcome) => {
                d.status = DiskStatus::Completed;
                tracing::info!(%backup_id, disk_key = %key,
                    written = outcome.bytes_written, zeroed = outcome.bytes_zeroed,
                    skipped = outcome.bytes_skipped,
                    read_for_grid = outcome.bytes_read_for_grid,
                    grid_cells = outcome.grid.as_ref().map(|g| g.cells.len()),
                    elapsed = ?outcome.elapsed, "disk copied");
                d.checksums = Some(outcome.checksums);
                d.grid = outcome.grid;
                d.change_id = r.change_id;
            }
            Err(e) => {
                all_ok = false;
                if c.cancelled.is_some() {
                    d.status = DiskStatus::Cancelled;
                    d.error = Some("cancelled".to_string());
                } else if Some(key) != failed_key && is_cancel(&e) {
                    d.status = DiskStatus::Cancelled;
                    d.error = Some(format!(
                        "stopped because disk {} failed",
                        failed_key.map(|k| k.to_string()).unwrap_or_default()
                    ));
                } else {
                    d.status = DiskStatus::Failed;
                    let mut msg = format!(
                        "copy to {}: {}",
                        r.target,
                        sendense_shared::errors::chain(&e)
                    );
                    if let Some(note) = c.tunnel_note.as_ref().filter(|_| r.via_tunnel) {
                        msg.push_str(&format!(" ({note})"));
                    }
                    first_error.get_or_insert_with(|| format!("disk {key}: {msg}"));
                    d.error = Some(msg);
                }
            }
        }
    }
    if let Some(cause) = c.cancelled {
        st.error.get_or_insert_with(|| cause.to_string());
        JobStatus::Cancelled
    } else if all_ok {
        JobStatus::Completed
    } else {
        st.error = match (c.vm_gone, first_error) {
            (Some(gone), Some(first)) => Some(format!("{gone}; {first}")),
            (gone, first) => gone.or(first),
        };
        JobStatus::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::state::Job;
    use sendense_shared::api::{BackupType, ChecksumRange, ChunkChecksums};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn job() -> Job {
        Job::new(
            BackupId("b1".into()),
            "vm1".into(),
            BackupType::Full,
            &[(DiskKey(2000), 1 << 20), (DiskKey(2001), 1 << 20)],
            CancellationToken::new(),
        )
    }

    fn target(key: i64) -> NbdAddr {
        NbdAddr::Tcp {
            host: "127.0.0.2".into(),
            port: 10100,
            export: format!("vm1-disk-{key}"),
        }
    }

    fn ok(key: i64) -> DiskResult {
        DiskResult {
            key: DiskKey(key),
            target: target(key),
            result: Ok(CopyOutcome {
                bytes_read: 1,
                bytes_written: 1,
                bytes_zeroed: 0,
                bytes_skipped: 0,
                checksums: ChunkChecksums {
                    chunk_size: 4096,
                    ranges: vec![ChecksumRange {
                        offset: 0,
                        length: 1,
                        blake3: "ab".into(),
                    }],
                },
                grid: None,
                bytes_read_for_grid: 0,
                elapsed: Duration::from_millis(1),
            }),
            change_id: Some(format!("c/{key}")),
            via_tunnel: false,
        }
    }

    fn err(key: i64, e: CopyError) -> DiskResult {
        DiskResult {
            result: Err(e),
            via_tunnel: true,
            ..ok(key)
        }
    }

    fn none() -> Circumstances {
        Circumstances {
            cancelled: None,
            tunnel_note: None,
            vm_gone: None,
        }
    }

    fn apply(results: Vec<DiskResult>, c: Circumstances) -> (JobStatus, Job) {
        let j = job();
        let status = settle(&j.backup_id, &mut j.lock(), results, c);
        (status, j)
    }

    #[test]
    fn every_disk_copied_completes_with_checksums_and_change_ids() {
        let (status, j) = apply(vec![ok(2000), ok(2001)], none());
        assert_eq!(status, JobStatus::Completed);
        let st = j.lock();
        assert_eq!(st.error, None);
        for d in &st.disks {
            assert_eq!(d.status, DiskStatus::Completed);
            assert_eq!(d.change_id, Some(format!("c/{}", d.disk_key)));
            assert_eq!(d.checksums.as_ref().map(|c| c.ranges.len()), Some(1));
        }
    }

    #[test]
    fn a_failed_disk_names_its_target_the_tunnel_and_stops_its_sibling() {
        let c = Circumstances {
            tunnel_note: Some("through the ssh tunnel (down)".into()),
            vm_gone: Some("VM vm1 no longer exists".into()),
            ..none()
        };
        let failed = CopyError::Options {
            reason: "boom".into(),
        };
        let (status, j) = apply(vec![err(2000, CopyError::Cancelled), err(2001, failed)], c);
        assert_eq!(status, JobStatus::Failed);
        let st = j.lock();
        assert_eq!(st.disks[0].status, DiskStatus::Cancelled);
        assert_eq!(
            st.disks[0].error.as_deref(),
            Some("stopped because disk 2001 failed")
        );
        assert_eq!(st.disks[1].status, DiskStatus::Failed);
        let want = "copy to nbd://127.0.0.2:10100/vm1-disk-2001: invalid copy options: boom \
                    (through the ssh tunnel (down))";
        assert_eq!(st.disks[1].error.as_deref(), Some(want));
        assert_eq!(
            st.error.as_deref(),
            Some(&*format!("VM vm1 no longer exists; disk 2001: {want}"))
        );
        assert_eq!(
            st.disks[1].change_id, None,
            "only a copied disk reports one"
        );
    }

    #[test]
    fn a_cancel_wins_and_keeps_its_words() {
        let c = Circumstances {
            cancelled: Some("cancelled: the node is shutting down"),
            ..none()
        };
        let (status, j) = apply(vec![ok(2000), err(2001, CopyError::Cancelled)], c);
        assert_eq!(status, JobStatus::Cancelled);
        let st = j.lock();
        assert_eq!(
            st.error.as_deref(),
            Some("cancelled: the node is shutting down")
        );
        assert_eq!(st.disks[0].status, DiskStatus::Completed);
        assert_eq!(st.disks[1].status, DiskStatus::Cancelled);
        assert_eq!(st.disks[1].error.as_deref(), Some("cancelled"));
    }
}
