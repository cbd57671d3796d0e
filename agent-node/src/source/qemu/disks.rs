//! Discovery of a VM's block devices: which disks the guest sees (in a stable order, which
//! gives their keys), their format nodes and the dirty bitmaps on them.

use super::{QemuDriver, QemuVm};
use crate::source::{SourceDisk, SourceError};
use sendense_shared::ids::DiskKey;
use serde_json::{Value, json};
use std::collections::HashMap;

/// First disk key of a VM.
pub const FIRST_DISK_KEY: i64 = 2000;

/// A disk as found in QEMU, with what the driver needs beyond [`SourceDisk`].
#[derive(Debug, Clone)]
pub(super) struct QemuDisk {
    pub(super) disk: SourceDisk,
    /// Node the guest writes to (format node): where bitmaps live and what gets fleeced.
    pub(super) format_node: String,
    pub(super) driver: String,
    pub(super) bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Clone)]
pub(super) struct Bitmap {
    pub(super) name: String,
    pub(super) recording: bool,
    pub(super) inconsistent: bool,
}

impl QemuDriver {
    pub(super) async fn disks(&self, vm: &QemuVm) -> Result<Vec<QemuDisk>, SourceError> {
        let blocks = self.exec(vm, "query-block", json!({})).await?;
        let nodes = self
            .exec(vm, "query-named-block-nodes", json!({"flat": true}))
            .await?;
        parse_disks(&vm.name, &blocks, &nodes)
    }
}

/// Disks from `query-block` (order = QEMU's device order, which follows the command line and
/// hot-plug order, so keys stay stable while the VM's configuration does) with their bitmaps
/// from `query-named-block-nodes`. Removable drives (CD-ROM) and read-only disks are skipped.
pub(super) fn parse_disks(
    vm: &str,
    blocks: &Value,
    nodes: &Value,
) -> Result<Vec<QemuDisk>, SourceError> {
    let bad = |detail: String| SourceError::Answer {
        vm: vm.to_string(),
        command: "query-block",
        detail,
    };
    let blocks = blocks
        .as_array()
        .ok_or_else(|| bad("not an array".to_string()))?;
    let mut bitmaps = bitmaps_by_node(nodes);
    let mut out = Vec::new();
    for b in blocks {
        let Some(inserted) = b.get("inserted") else {
            continue;
        };
        if b.get("removable").and_then(Value::as_bool) == Some(true)
            || inserted.get("ro").and_then(Value::as_bool) == Some(true)
        {
            continue;
        }
        let qdev = b.get("qdev").and_then(Value::as_str).unwrap_or_default();
        let device = b.get("device").and_then(Value::as_str).unwrap_or_default();
        if qdev.is_empty() && device.is_empty() {
            continue; // not attached to a guest device
        }
        let format_node = inserted
            .get("node-name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("disk {qdev}{device} has no node-name")))?
            .to_string();
        let size_bytes = inserted
            .get("image")
            .and_then(|i| i.get("virtual-size"))
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("disk {qdev}{device} has no virtual-size")))?;
        let driver = inserted
            .get("drv")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let label = qdev
            .strip_prefix("/machine/peripheral/")
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                if device.is_empty() {
                    qdev.to_string()
                } else {
                    device.to_string()
                }
            });
        let index = out.len();
        out.push(QemuDisk {
            disk: SourceDisk {
                disk_key: DiskKey(FIRST_DISK_KEY + index as i64),
                unit_number: index as i32,
                size_bytes,
                label,
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            },
            bitmaps: bitmaps.remove(&format_node).unwrap_or_default(),
            format_node,
            driver,
        });
    }
    Ok(out)
}

/// Each node's dirty bitmaps, from `query-named-block-nodes`.
fn bitmaps_by_node(nodes: &Value) -> HashMap<String, Vec<Bitmap>> {
    let mut bitmaps = HashMap::new();
    for n in nodes.as_array().into_iter().flatten() {
        let Some(name) = n.get("node-name").and_then(Value::as_str) else {
            continue;
        };
        let list = n
            .get("dirty-bitmaps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|b| {
                Some(Bitmap {
                    name: b.get("name")?.as_str()?.to_string(),
                    recording: b.get("recording").and_then(Value::as_bool).unwrap_or(false),
                    inconsistent: b
                        .get("inconsistent")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })
            })
            .collect();
        bitmaps.insert(name.to_string(), list);
    }
    bitmaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_in_device_order_skip_cdroms() {
        let blocks = json!([
            {"device": "", "qdev": "/machine/peripheral/sys/virtio-backend", "removable": false,
             "inserted": {"node-name": "fmt0", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 67108864}}},
            {"device": "cd", "qdev": "/machine/peripheral/cd0", "removable": true,
             "inserted": {"node-name": "iso", "drv": "raw", "ro": true,
                          "image": {"virtual-size": 1000}}},
            {"device": "", "qdev": "/machine/peripheral/data/virtio-backend", "removable": false,
             "inserted": {"node-name": "fmt1", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 134217728}}},
        ]);
        let nodes = json!([{"node-name": "fmt1", "dirty-bitmaps": [
            {"name": "sendense-x", "recording": true}, {"recording": false}]}]);
        let d = parse_disks("vm", &blocks, &nodes).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].disk.disk_key, DiskKey(2000));
        assert_eq!(d[0].disk.label, "sys");
        assert_eq!(d[1].disk.disk_key, DiskKey(2001));
        assert_eq!(d[1].disk.unit_number, 1);
        assert_eq!(d[1].disk.size_bytes, 134217728);
        assert_eq!(d[1].bitmaps.len(), 1);
    }
}
