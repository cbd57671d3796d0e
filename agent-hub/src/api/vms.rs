//! `GET/POST /api/v1/vms`, `GET /api/v1/vms/{vm_name}`: VMs and their disks.

use super::{ApiError, ApiJson};
use crate::server::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{Vm, VmRequest};
use sendense_shared::names::validate_name;
use std::collections::HashSet;

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(hub.db.list_vms().await?))
}

pub async fn get_one(
    State(hub): State<AppState>,
    Path(vm_name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    validate_name("vm_name", &vm_name)?;
    find_vm(&hub, &vm_name).await.map(Json)
}

/// Registers (or updates) a VM by hand.
pub async fn register(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<VmRequest>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    validate_vm(&req)?;
    if let Some(node) = &req.node {
        match hub.db.get_node(node).await {
            Ok(_) => {}
            Err(crate::db::DbError::NotFound { .. }) => {
                return Err(ApiError::invalid(format!(
                    "node: {node:?} is not a registered node (POST /api/v1/nodes first, or use null)"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let vm = hub.db.upsert_vm(&req).await?;
    tracing::info!(vm = %vm.vm_name, disks = vm.disks.len(), node = ?vm.node, "VM registered");
    Ok((StatusCode::CREATED, Json(vm)))
}

pub async fn find_vm(hub: &crate::server::Hub, vm_name: &str) -> Result<Vm, ApiError> {
    match hub.db.get_vm(vm_name).await {
        Ok(vm) => Ok(vm),
        Err(crate::db::DbError::NotFound { .. }) => Err(ApiError::NotFound(format!(
            "no VM named {vm_name:?} is registered (GET /api/v1/vms lists them)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Every rule a VM must pass before it reaches the database: names that become paths,
/// distinct disk keys and unit numbers (the original system recorded unit 0 for every disk).
pub fn validate_vm(req: &VmRequest) -> Result<(), ApiError> {
    validate_name("vm_name", &req.vm_name)?;
    if let Some(node) = &req.node {
        validate_name("node", node)?;
    }
    if req.disks.is_empty() {
        return Err(ApiError::invalid("disks: a VM needs at least one disk"));
    }
    let mut keys = HashSet::new();
    let mut units = HashSet::new();
    for (i, d) in req.disks.iter().enumerate() {
        validate_label(i, &d.label)?;
        if d.disk_key.0 < 0 {
            return Err(ApiError::invalid(format!(
                "disks[{i}].disk_key: {} is negative",
                d.disk_key
            )));
        }
        if !keys.insert(d.disk_key) {
            return Err(ApiError::invalid(format!(
                "disks[{i}].disk_key: {} appears twice",
                d.disk_key
            )));
        }
        if d.unit_number < 0 {
            return Err(ApiError::invalid(format!(
                "disks[{i}].unit_number: {} is negative",
                d.unit_number
            )));
        }
        if !units.insert(d.unit_number) {
            return Err(ApiError::invalid(format!(
                "disks[{i}].unit_number: {} appears twice (each disk has its own unit number)",
                d.unit_number
            )));
        }
        if d.size_bytes == 0 {
            return Err(ApiError::invalid(format!(
                "disks[{i}].size_bytes: a disk of 0 bytes cannot be backed up"
            )));
        }
        if d.size_bytes % 512 != 0 {
            return Err(ApiError::invalid(format!(
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
pub fn validate_driver(driver: Option<&str>) -> Result<(), ApiError> {
    match driver {
        Some(d)
            if d.is_empty()
                || d.len() > 32
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Err(ApiError::invalid(format!(
                "driver: {d:?} is not a driver name (up to 32 letters, digits, '-' or '_', \
                 e.g. \"qemu\" or \"vsphere\")"
            )))
        }
        _ => Ok(()),
    }
}

/// A hypervisor fact shown as is (controller name, datastore path): bounded and on one line.
fn validate_fact(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.len() > max {
        return Err(ApiError::invalid(format!(
            "{field}: {} bytes is longer than {max}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field}: {v:?} contains a control character"
        )));
    }
    Ok(())
}

/// A label is shown, not used as a path, but tools and operators do paste it into paths: refuse
/// what could escape a directory or break a line, allow the spaces of "Hard disk 1".
fn validate_label(i: usize, label: &str) -> Result<(), ApiError> {
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
        Some(why) => Err(ApiError::BadName(format!("disks[{i}].label {why}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::VmDisk;
    use sendense_shared::ids::DiskKey;

    fn req(name: &str, label: &str) -> VmRequest {
        VmRequest {
            vm_name: name.into(),
            node: None,
            disks: vec![VmDisk {
                disk_key: DiskKey(2000),
                unit_number: 0,
                size_bytes: 1 << 20,
                label: label.into(),
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            }],
        }
    }

    #[test]
    fn escaping_names_and_labels_are_refused_naming_the_field() {
        for (n, l, field) in [
            ("../x", "a", "vm_name"),
            ("a/b", "a", "vm_name"),
            ("a\0b", "a", "vm_name"),
            ("ok", "../../etc", "label"),
            ("ok", "a\0", "label"),
            ("ok", "..", "label"),
        ] {
            let e = validate_vm(&req(n, l)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{n:?} {l:?}");
            assert!(e.body().detail.contains(field), "{n:?} {l:?}: {e}");
        }
        validate_vm(&req("pgtest1", "Hard disk 1")).unwrap();
    }

    #[test]
    fn duplicate_units_are_refused() {
        let mut r = req("vm", "a");
        let mut d = r.disks[0].clone();
        d.disk_key = DiskKey(2001);
        r.disks.push(d);
        let e = validate_vm(&r).unwrap_err();
        assert!(e.body().detail.contains("disks[1].unit_number"), "{e}");
    }

    #[test]
    fn hypervisor_facts_are_bounded_and_on_one_line() {
        let mut r = req("vc1", "Hard disk 1");
        r.disks[0].controller = Some("SCSI controller 0".into());
        r.disks[0].backing_file = Some("[datastore1] vc1/vc1.vmdk".into());
        r.disks[0].thin_provisioned = Some(true);
        validate_vm(&r).unwrap();
        r.disks[0].controller = Some("SCSI\ncontroller".into());
        let e = validate_vm(&r).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.body().detail.contains("disks[0].controller"), "{e}");
        r.disks[0].controller = None;
        r.disks[0].backing_file = Some("x".repeat(5000));
        let e = validate_vm(&r).unwrap_err();
        assert!(
            e.body()
                .detail
                .contains("disks[0].backing_file: 5000 bytes"),
            "{e}"
        );
        validate_driver(Some("vsphere")).unwrap();
        validate_driver(None).unwrap();
        for bad in ["", "vs phere", "a/b", &"d".repeat(33)] {
            let e = validate_driver(Some(bad)).unwrap_err();
            assert!(e.body().detail.starts_with("driver:"), "{bad:?}: {e}");
        }
    }
}
