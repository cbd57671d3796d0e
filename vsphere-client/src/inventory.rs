//! Reading the property values of VMs and snapshots: the device list (disks and their
//! controllers) and the snapshot tree.

use std::collections::HashMap;

use roxmltree::Node;

use super::soap::{child, child_text, children, moref, text, xsi_type};
use super::{DiskInfo, MoRef, SnapshotInfo, VsphereError};

/// A disk as the device list names it; the datastore is still a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawDisk {
    pub(crate) disk: DiskInfo,
    pub(crate) datastore_ref: Option<MoRef>,
}

/// The disks of a `config.hardware.device` value (`ArrayOfVirtualDevice`), sorted by key, with
/// their controllers' labels. The datastore name is the bracketed prefix of the file name until
/// [`resolve_datastores`] replaces it with the datastore's own name.
pub(crate) fn disks(method: &str, devices: Node<'_, '_>) -> Result<Vec<RawDisk>, VsphereError> {
    let bad = |detail: String| VsphereError::Protocol {
        method: method.to_string(),
        detail,
    };
    let all: Vec<Node<'_, '_>> = devices.children().filter(|c| c.is_element()).collect();
    let mut labels: HashMap<i32, String> = HashMap::new();
    for device in &all {
        if let Some(key) = child_text(*device, "key").and_then(|k| k.trim().parse::<i32>().ok()) {
            labels.insert(key, device_label(*device));
        }
    }
    let mut disks = Vec::new();
    for device in all {
        if xsi_type(device) != Some("VirtualDisk") {
            continue;
        }
        let key = int(device, "key").ok_or_else(|| bad("a VirtualDisk without key".into()))?;
        let ctx = |field: &str| format!("VirtualDisk {key}: {field}");
        let controller_key =
            int(device, "controllerKey").ok_or_else(|| bad(ctx("no controllerKey")))?;
        let unit_number = int(device, "unitNumber").ok_or_else(|| bad(ctx("no unitNumber")))?;
        let capacity_bytes = match child_text(device, "capacityInBytes") {
            Some(b) => b
                .trim()
                .parse::<u64>()
                .map_err(|_| bad(ctx(&format!("capacityInBytes {b:?} is not a number"))))?,
            None => {
                let kb = child_text(device, "capacityInKB")
                    .ok_or_else(|| bad(ctx("neither capacityInBytes nor capacityInKB")))?;
                kb.trim()
                    .parse::<u64>()
                    .ok()
                    .and_then(|kb| kb.checked_mul(1024))
                    .ok_or_else(|| bad(ctx(&format!("capacityInKB {kb:?} is not a number"))))?
            }
        };
        let backing = child(device, "backing").ok_or_else(|| bad(ctx("no backing")))?;
        let file_name = child_text(backing, "fileName")
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .ok_or_else(|| bad(ctx("backing without fileName")))?;
        let thin = child_text(backing, "thinProvisioned").and_then(|t| parse_bool(&t));
        let change_id = child_text(backing, "changeId")
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        let mode = child_text(backing, "diskMode")
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        let raw_mapping = (xsi_type(backing) == Some("VirtualDiskRawDiskMappingVer1BackingInfo"))
            .then(|| {
                child_text(backing, "compatibilityMode")
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default()
            });
        disks.push(RawDisk {
            disk: DiskInfo {
                key,
                label: device_label(device),
                controller_key,
                controller_label: labels.get(&controller_key).cloned().unwrap_or_default(),
                unit_number,
                capacity_bytes,
                datastore: bracketed_datastore(&file_name).unwrap_or_default(),
                file_name,
                thin,
                change_id,
                mode,
                raw_mapping,
            },
            datastore_ref: child(backing, "datastore").and_then(moref),
        });
    }
    disks.sort_by_key(|d| d.disk.key);
    Ok(disks)
}

/// Replaces each disk's datastore with the name its reference resolves to.
pub(crate) fn resolve_datastores(
    raw: Vec<RawDisk>,
    names: &HashMap<MoRef, String>,
) -> Vec<DiskInfo> {
    raw.into_iter()
        .map(|r| {
            let mut disk = r.disk;
            if let Some(name) = r.datastore_ref.as_ref().and_then(|d| names.get(d)) {
                disk.datastore = name.clone();
            }
            disk
        })
        .collect()
}

/// "[LocalDS_0] vm1/vm1.vmdk" → "LocalDS_0".
pub(crate) fn bracketed_datastore(file_name: &str) -> Option<String> {
    let rest = file_name.trim_start().strip_prefix('[')?;
    let (name, _) = rest.split_once(']')?;
    Some(name.to_string())
}

/// The snapshot tree of a `snapshot` value (`VirtualMachineSnapshotInfo`), flattened depth first,
/// parents before children.
pub(crate) fn snapshots(info: Node<'_, '_>) -> Vec<SnapshotInfo> {
    let mut out = Vec::new();
    for root in children(info, "rootSnapshotList") {
        walk(root, &mut out);
    }
    out
}

fn walk(tree: Node<'_, '_>, out: &mut Vec<SnapshotInfo>) {
    if let Some(moref) = child(tree, "snapshot").and_then(moref) {
        out.push(SnapshotInfo {
            moref,
            name: child_text(tree, "name").unwrap_or_default(),
            description: child_text(tree, "description").unwrap_or_default(),
        });
    }
    for c in children(tree, "childSnapshotList") {
        walk(c, out);
    }
}

fn device_label(device: Node<'_, '_>) -> String {
    child(device, "deviceInfo")
        .and_then(|i| child_text(i, "label"))
        .unwrap_or_default()
}

fn int(node: Node<'_, '_>, name: &str) -> Option<i32> {
    child(node, name).and_then(|c| text(c).parse().ok())
}

pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roxmltree::Document;

    /// A VM's devices as the simulator sends them (its schema-instance prefix): an IDE and a SCSI
    /// controller, two disks on the SCSI controller (one thin with a change id, one thick sized
    /// only in KB), a CD-ROM.
    const DEVICES: &str = r#"<val xmlns="urn:vim25" xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ArrayOfVirtualDevice">
<VirtualDevice XMLSchema-instance:type="VirtualIDEController"><key>200</key><deviceInfo><label>IDE 0</label><summary>IDE 0</summary></deviceInfo><busNumber>0</busNumber></VirtualDevice>
<VirtualDevice XMLSchema-instance:type="VirtualLsiLogicController"><key>1000</key><deviceInfo><label>SCSI controller 0</label><summary>LSI Logic</summary></deviceInfo><busNumber>0</busNumber><device>2001</device><device>2000</device></VirtualDevice>
<VirtualDevice XMLSchema-instance:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label><summary>1,024 KB</summary></deviceInfo><backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1.vmdk</fileName><datastore type="Datastore">datastore-56</datastore><diskMode>persistent</diskMode><thinProvisioned>false</thinProvisioned></backing><controllerKey>1000</controllerKey><unitNumber>1</unitNumber><capacityInKB>1024</capacityInKB></VirtualDevice>
<VirtualDevice XMLSchema-instance:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>10,485,760 KB</summary></deviceInfo><backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/DC0_H0_VM0.vmdk</fileName><datastore type="Datastore">datastore-56</datastore><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned><changeId>52 de c0 d9 98 42 3b 3a-9b 8b 6c 2c 7f e5 8d 0f/12</changeId></backing><controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>10485760</capacityInKB><capacityInBytes>10737418240</capacityInBytes></VirtualDevice>
<VirtualDevice XMLSchema-instance:type="VirtualCdrom"><key>3000</key><deviceInfo><label>CD/DVD drive 1</label></deviceInfo><controllerKey>200</controllerKey><unitNumber>0</unitNumber></VirtualDevice>
</val>"#;

    #[test]
    fn two_disks_on_one_controller() {
        let doc = Document::parse(DEVICES).expect("xml");
        let raw = disks("t", doc.root_element()).expect("disks");
        let ds = MoRef::new("Datastore", "datastore-56");
        assert!(raw.iter().all(|r| r.datastore_ref.as_ref() == Some(&ds)));
        let names = HashMap::from([(ds, "LocalDS_0".to_string())]);
        let disks = resolve_datastores(raw, &names);
        assert_eq!(
            disks,
            vec![
                DiskInfo {
                    key: 2000,
                    label: "Hard disk 1".into(),
                    controller_key: 1000,
                    controller_label: "SCSI controller 0".into(),
                    unit_number: 0,
                    capacity_bytes: 10 << 30,
                    file_name: "[LocalDS_0] DC0_H0_VM0/DC0_H0_VM0.vmdk".into(),
                    datastore: "LocalDS_0".into(),
                    thin: Some(true),
                    change_id: Some("52 de c0 d9 98 42 3b 3a-9b 8b 6c 2c 7f e5 8d 0f/12".into()),
                    mode: Some("persistent".into()),
                    raw_mapping: None,
                },
                DiskInfo {
                    key: 2001,
                    label: "Hard disk 2".into(),
                    controller_key: 1000,
                    controller_label: "SCSI controller 0".into(),
                    unit_number: 1,
                    capacity_bytes: 1 << 20,
                    file_name: "[LocalDS_0] DC0_H0_VM0/disk1.vmdk".into(),
                    datastore: "LocalDS_0".into(),
                    thin: Some(false),
                    change_id: None,
                    mode: Some("persistent".into()),
                    raw_mapping: None,
                },
            ]
        );
    }

    #[test]
    fn independent_and_raw_mapped_disks_say_why_snapshots_miss_them() {
        let independent = DEVICES.replace(
            "disk1.vmdk</fileName><datastore type=\"Datastore\">datastore-56</datastore><diskMode>persistent",
            "disk1.vmdk</fileName><datastore type=\"Datastore\">datastore-56</datastore><diskMode>independent_persistent",
        );
        let doc = Document::parse(&independent).expect("xml");
        let raw = disks("t", doc.root_element()).expect("disks");
        assert_eq!(raw[0].disk.not_frozen_by_snapshots(), None);
        assert_eq!(raw[1].disk.mode.as_deref(), Some("independent_persistent"));
        let why = raw[1].disk.not_frozen_by_snapshots().expect("independent");
        assert!(why.contains("independent_persistent"), "{why}");
        // A physical-mode RDM as vCenter sends it: its own backing type, a LUN behind it.
        let rdm = DEVICES.replace(
            r#"<backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1.vmdk</fileName><datastore type="Datastore">datastore-56</datastore><diskMode>persistent</diskMode><thinProvisioned>false</thinProvisioned></backing>"#,
            r#"<backing XMLSchema-instance:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1-rdm.vmdk</fileName><datastore type="Datastore">datastore-56</datastore><lunUuid>0200000000600508b1</lunUuid><deviceName>vml.0200000000600508b1</deviceName><compatibilityMode>physicalMode</compatibilityMode><diskMode>independent_persistent</diskMode></backing>"#,
        );
        assert_ne!(rdm, DEVICES);
        let doc = Document::parse(&rdm).expect("xml");
        let raw = disks("t", doc.root_element()).expect("disks");
        assert_eq!(raw[1].disk.raw_mapping.as_deref(), Some("physicalMode"));
        let why = raw[1].disk.not_frozen_by_snapshots().expect("rdm");
        assert!(
            why.contains("raw device mapping") && why.contains("physical"),
            "{why}"
        );
    }

    #[test]
    fn unresolved_datastore_keeps_the_bracketed_name() {
        let doc = Document::parse(DEVICES).expect("xml");
        let raw = disks("t", doc.root_element()).expect("disks");
        let disks = resolve_datastores(raw, &HashMap::new());
        assert!(disks.iter().all(|d| d.datastore == "LocalDS_0"));
    }

    #[test]
    fn broken_disk_is_a_protocol_error_naming_the_field() {
        let body = DEVICES.replace(
            "<capacityInKB>1024</capacityInKB>",
            "<capacityInKB>lots</capacityInKB>",
        );
        let doc = Document::parse(&body).expect("xml");
        let err = disks("RetrievePropertiesEx", doc.root_element()).expect_err("bad capacity");
        let msg = err.to_string();
        assert!(
            msg.contains("2001") && msg.contains("capacityInKB"),
            "{msg}"
        );
        let body = DEVICES.replace(
            "<controllerKey>1000</controllerKey><unitNumber>1</unitNumber>",
            "",
        );
        let doc = Document::parse(&body).expect("xml");
        let err = disks("RetrievePropertiesEx", doc.root_element()).expect_err("no controller");
        assert!(err.to_string().contains("controllerKey"), "{err}");
    }

    /// A snapshot tree as vCenter sends it: root with two children, one of which has a child.
    const TREE: &str = r#"<val xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="VirtualMachineSnapshotInfo">
<currentSnapshot type="VirtualMachineSnapshot">snapshot-4</currentSnapshot>
<rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-1</snapshot><vm type="VirtualMachine">vm-42</vm><name>base</name><description>before upgrade</description><id>1</id><createTime>2026-11-27T01:00:00Z</createTime><state>poweredOff</state><quiesced>false</quiesced>
  <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-2</snapshot><vm type="VirtualMachine">vm-42</vm><name>a</name><description></description><id>2</id><createTime>2026-11-27T02:00:00Z</createTime><state>poweredOff</state><quiesced>false</quiesced>
    <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-4</snapshot><vm type="VirtualMachine">vm-42</vm><name>sendense-backup-7 &amp; co</name><id>4</id><createTime>2026-11-27T04:00:00Z</createTime><state>poweredOff</state><quiesced>true</quiesced></childSnapshotList>
  </childSnapshotList>
  <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-3</snapshot><vm type="VirtualMachine">vm-42</vm><name>b</name><description>second branch</description><id>3</id><createTime>2026-11-27T03:00:00Z</createTime><state>poweredOff</state><quiesced>false</quiesced></childSnapshotList>
</rootSnapshotList>
</val>"#;

    #[test]
    fn snapshot_tree_with_children_is_flattened_parents_first() {
        let doc = Document::parse(TREE).expect("xml");
        let flat = snapshots(doc.root_element());
        let got: Vec<(&str, &str, &str)> = flat
            .iter()
            .map(|s| {
                (
                    s.moref.value.as_str(),
                    s.name.as_str(),
                    s.description.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("snapshot-1", "base", "before upgrade"),
                ("snapshot-2", "a", ""),
                ("snapshot-4", "sendense-backup-7 & co", ""),
                ("snapshot-3", "b", "second branch"),
            ]
        );
        assert!(
            flat.iter()
                .all(|s| s.moref.kind == "VirtualMachineSnapshot")
        );
    }

    #[test]
    fn datastore_in_brackets() {
        assert_eq!(
            bracketed_datastore("[LocalDS_0] vm/a.vmdk").as_deref(),
            Some("LocalDS_0")
        );
        assert_eq!(
            bracketed_datastore("[ds with space] a.vmdk").as_deref(),
            Some("ds with space")
        );
        assert_eq!(bracketed_datastore("vm/a.vmdk"), None);
        assert_eq!(bracketed_datastore("[unterminated a.vmdk"), None);
    }
}
