//! Change tracking with dirty bitmaps: which bitmap an incremental starts from (checked on
//! every disk before anything is changed), and the rotation on release (see the module docs
//! of `source::qemu`).

use super::disks::{Bitmap, QemuDisk};
use super::journal::SnapshotState;
use super::tags::{BITMAP_PREFIX, bitmap_of};
use super::{QemuDriver, QemuVm};
use crate::source::{ReleaseOutcome, SourceError};
use sendense_shared::ids::BackupId;
use serde_json::json;
use std::collections::HashMap;

/// The bitmap an incremental starts from, checked on every disk.
pub(super) fn incremental_base(
    vm: &str,
    disks: &[QemuDisk],
    previous: Option<&BackupId>,
) -> Result<String, SourceError> {
    let missing = |d: &QemuDisk, detail: String| SourceError::IncrementalBase {
        vm: vm.to_string(),
        disk_key: d.disk.disk_key,
        detail,
    };
    let mut chosen: Option<String> = None;
    for d in disks {
        let ours: Vec<&Bitmap> = d
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with(BITMAP_PREFIX))
            .collect();
        let name = match previous {
            Some(prev) => {
                let want = bitmap_of(prev);
                if !ours.iter().any(|b| b.name == want) {
                    return Err(missing(
                        d,
                        format!(
                            "no bitmap {want} (changes since backup {prev}); found {:?}",
                            ours.iter().map(|b| &b.name).collect::<Vec<_>>()
                        ),
                    ));
                }
                want
            }
            None => {
                let recording: Vec<&&Bitmap> = ours.iter().filter(|b| b.recording).collect();
                match recording.as_slice() {
                    [one] => one.name.clone(),
                    [] => return Err(missing(d, "no recording sendense bitmap".to_string())),
                    many => {
                        return Err(missing(
                            d,
                            format!(
                                "{} recording sendense bitmaps, cannot tell the base",
                                many.len()
                            ),
                        ));
                    }
                }
            }
        };
        let b = ours.iter().find(|b| b.name == name).copied();
        if let Some(b) = b {
            if b.inconsistent {
                return Err(missing(
                    d,
                    format!("bitmap {name} is inconsistent (QEMU did not save it cleanly)"),
                ));
            }
            if !b.recording {
                return Err(missing(
                    d,
                    format!("bitmap {name} is not recording (held by another snapshot?)"),
                ));
            }
        }
        match &chosen {
            None => chosen = Some(name),
            Some(c) if *c != name => {
                return Err(missing(
                    d,
                    format!("disks disagree on the base: {c} vs {name}"),
                ));
            }
            Some(_) => {}
        }
    }
    chosen.ok_or_else(|| SourceError::NoDisks { vm: vm.to_string() })
}

impl QemuDriver {
    pub(super) async fn rotate_bitmaps(
        &self,
        vm: &QemuVm,
        state: &SnapshotState,
        outcome: ReleaseOutcome,
    ) -> Result<(), SourceError> {
        let disks = self.disks(vm).await?;
        let by_node: HashMap<&str, &QemuDisk> =
            disks.iter().map(|d| (d.format_node.as_str(), d)).collect();
        let mut actions = Vec::new();
        for d in &state.disks {
            let Some(qd) = by_node.get(d.format_node.as_str()) else {
                continue; // disk gone (hot-unplugged): nothing to rotate
            };
            let has = |name: &str| qd.bitmaps.iter().any(|b| b.name == name);
            match (outcome, &state.base_bitmap) {
                (ReleaseOutcome::Success, _) => {
                    for b in qd
                        .bitmaps
                        .iter()
                        .filter(|b| b.name.starts_with(BITMAP_PREFIX) && b.name != state.new_bitmap)
                    {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": b.name}}));
                    }
                }
                (ReleaseOutcome::Failure, None) => {
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": state.new_bitmap}}));
                    }
                }
                (ReleaseOutcome::Failure, Some(base)) => {
                    if !has(base) {
                        // Nothing to roll back into; the next incremental will say "missing".
                        if has(&state.new_bitmap) {
                            actions.push(json!({"type": "block-dirty-bitmap-remove",
                                "data": {"node": d.format_node, "name": state.new_bitmap}}));
                        }
                        continue;
                    }
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                            "node": d.format_node, "target": base, "bitmaps": [state.new_bitmap]}}));
                    }
                    if !qd.bitmaps.iter().any(|b| &b.name == base && b.recording) {
                        actions.push(json!({"type": "block-dirty-bitmap-enable",
                            "data": {"node": d.format_node, "name": base}}));
                    }
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": state.new_bitmap}}));
                    }
                }
            }
        }
        if actions.is_empty() {
            return Ok(());
        }
        self.exec(vm, "transaction", json!({ "actions": actions }))
            .await
            .map(|_| ())
    }

    /// Removes every `sendense-*` bitmap of the snapshot's disks (best effort); returns names.
    pub(super) async fn drop_tracking(&self, vm: &QemuVm, state: &SnapshotState) -> Vec<String> {
        let mut dropped = Vec::new();
        let Ok(disks) = self.disks(vm).await else {
            return dropped;
        };
        for d in disks
            .iter()
            .filter(|d| state.disks.iter().any(|s| s.format_node == d.format_node))
        {
            for b in d
                .bitmaps
                .iter()
                .filter(|b| b.name.starts_with(BITMAP_PREFIX))
            {
                let args = json!({"node": d.format_node, "name": b.name});
                if self
                    .exec(vm, "block-dirty-bitmap-remove", args)
                    .await
                    .is_ok()
                {
                    dropped.push(b.name.clone());
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceDisk;
    use sendense_shared::ids::DiskKey;

    fn disk(key: i64, bitmaps: &[(&str, bool)]) -> QemuDisk {
        QemuDisk {
            disk: SourceDisk {
                disk_key: DiskKey(key),
                unit_number: 0,
                size_bytes: 1,
                label: "d".into(),
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            },
            format_node: format!("n{key}"),
            driver: "qcow2".into(),
            bitmaps: bitmaps
                .iter()
                .map(|(n, r)| Bitmap {
                    name: n.to_string(),
                    recording: *r,
                    inconsistent: false,
                })
                .collect(),
        }
    }

    #[test]
    fn base_is_the_named_previous_backup_on_every_disk() {
        let disks = [
            disk(2000, &[("sendense-a", true)]),
            disk(2001, &[("sendense-a", true), ("other", true)]),
        ];
        let prev = BackupId::from("a");
        assert_eq!(
            incremental_base("vm", &disks, Some(&prev)).unwrap(),
            "sendense-a"
        );
        assert_eq!(incremental_base("vm", &disks, None).unwrap(), "sendense-a");
    }

    #[test]
    fn missing_or_ambiguous_base_names_the_disk() {
        let disks = [
            disk(2000, &[("sendense-a", true)]),
            disk(2001, &[("sendense-b", true)]),
        ];
        let e = incremental_base("vm", &disks, Some(&BackupId::from("a")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bitmap missing"), "{e}");
        assert!(e.contains("2001"), "{e}");
        let e = incremental_base("vm", &disks, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disagree"), "{e}");
        let e = incremental_base("vm", &[disk(2000, &[])], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no recording"), "{e}");
    }
}
