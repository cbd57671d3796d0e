//! VM records as the hub accepts them: the rules a VM (registered by hand or imported from a
//! node's inventory) must pass before it reaches the database.

use sendense_shared::api::{Backup, Integrity, JobStatus, VmRequest};
use sendense_shared::names::{NameError, validate_name};
use std::collections::{BTreeMap, HashSet};

/// Each VM's newest good point among `backups`: completed and not corrupt, at its completion
/// time (what the metrics' point age and the webhooks' "no good point" both read).
pub fn newest_good_points(backups: &[Backup]) -> BTreeMap<&str, chrono::DateTime<chrono::Utc>> {
    let mut best = BTreeMap::new();
    for b in backups {
        if b.status == JobStatus::Completed && b.integrity != Integrity::Corrupt {
            let at = b.completed_at.unwrap_or(b.created_at);
            let e = best.entry(b.vm_name.as_str()).or_insert(at);
            if at > *e {
                *e = at;
            }
        }
    }
    best
}

/// Why a VM was refused; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum VmInvalid {
    /// A name that would become a path component or export name is unsafe.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A disk label that could escape a directory or break a line.
    #[error("{0}")]
    BadLabel(String),
    /// A value refused by the rules.
    #[error("{0}")]
    Field(String),
}

impl VmInvalid {
    fn field(detail: impl Into<String>) -> Self {
        VmInvalid::Field(detail.into())
    }
}

/// Every rule a VM must pass before it reaches the database: names that become paths,
/// distinct disk keys and unit numbers (the original system recorded unit 0 for every disk).
pub fn validate_vm(req: &VmRequest) -> Result<(), VmInvalid> {
    validate_name("vm_name", &req.vm_name)?;
    if let Some(node) = &req.node {
        validate_name("node", node)?;
    }
    if req.disks.is_empty() {
        return Err(VmInvalid::field("disks: a VM needs at least one disk"));
    }
    let mut keys = HashSet::new();
    let mut units = HashSet::new();
    for (i, d) in req.disks.iter().enumerate() {
        validate_label(i, &d.label)?;
        if d.disk_key.0 < 0 {
            return Err(VmInvalid::field(format!(
                "disks[{i}].disk_key: {} is negative",
                d.disk_key
            )));
        }
        if !keys.insert(d.disk_key) {
            return Err(VmInvalid::field(format!(
                "disks[{i}].disk_key: {} appears twice",
                d.disk_key
            )));
        }
        if d.unit_number < 0 {
            return Err(VmInvalid::field(format!(
                "disks[{i}].unit_number: {} is negative",
                d.unit_number
            )));
        }
        if !units.insert(d.unit_number) {
            return Err(VmInvalid::field(format!(
                "disks[{i}].unit_number: {} appears twice (each disk has its own unit number)",
                d.unit_number
            )));
        }
        if d.size_bytes == 0 {
            return Err(VmInvalid::field(format!(
                "disks[{i}].size_bytes: a disk of 0 bytes cannot be backed up"
            )));
        }
        if d.size_bytes % 512 != 0 {
            return Err(VmInvalid::field(format!(
                "disks[{i}].size_bytes: {} is not a multiple of 512",
                d.size_bytes
            )));
        }
        if let Some(c) = &d.controller {
            validate_fact(&format!("disks[{i}].controller"), c, 255)?;
        }
        if let Some(b) = &d.backing_file {
            validate_fact(&format!("disks[{i}].backing_file"), b, 4096)?;
        }
    }
    Ok(())
}

/// The source driver an inventory names: a short word such as `qemu` or `vsphere`.
pub fn validate_driver(driver: Option<&str>) -> Result<(), VmInvalid> {
    match driver {
        Some(d)
            if d.is_empty()
                || d.len() > 32
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Err(VmInvalid::field(format!(
                "driver: {d:?} is not a driver name (up to 32 letters, digits, '-' or '_', \
                 e.g. \"qemu\" or \"vsphere\")"
            )))
        }
        _ => Ok(()),
    }
}

/// A hypervisor fact shown as is (controller name, datastore path): bounded and on one line.
fn validate_fact(field: &str, v: &str, max: usize) -> Result<(), VmInvalid> {
    if v.len() > max {
        return Err(VmInvalid::field(format!(
            "{field}: {} bytes is longer than {max}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(VmInvalid::field(format!(
            "{field}: {v:?} contains a control character"
        )));
    }
    Ok(())
}

/// A label is shown, not used as a path, but tools and operators do paste it into paths: refuse
/// what could escape a directory or break a line, allow the spaces of "Hard disk 1".
fn validate_label(i: usize, label: &str) -> Result<(), VmInvalid> {
    let bad = if label.len() > 256 {
        Some("is longer than 256 bytes".to_string())
    } else if label.contains('\0') {
        Some("contains a NUL byte".to_string())
    } else if label.contains(['/', '\\']) {
        Some("contains a path separator".to_string())
    } else if label.split(' ').any(|w| w == "..") || label == "." {
        Some("is a relative path component".to_string())
    } else if label.chars().any(char::is_control) {
        Some("contains a control character".to_string())
    } else {
        None
    };
    match bad {
        Some(why) => Err(VmInvalid::BadLabel(format!("disks[{i}].label {why}"))),
        None => Ok(()),
    }
}
