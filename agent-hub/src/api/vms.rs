//! `GET/POST /api/v1/vms`, `GET /api/v1/vms/{vm_name}`: VMs and their disks.

use super::scope::{own_node, own_vm, vm_name_for};
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::hub::AppState;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{Vm, VmRequest};
use sendense_shared::names::validate_name;

#[utoipa::path(
    get,
    path = "/vms",
    operation_id = "list_vms",
    tag = "vms",
    summary = "Every registered VM",
    responses(
        (status = 200, description = "The VMs", body = Vec<sendense_shared::api::Vm>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(hub.db.list_vms().await?))
}

#[utoipa::path(
    get,
    path = "/vms/{vm_name}",
    operation_id = "get_vm",
    tag = "vms",
    summary = "One VM",
    params(("vm_name" = String, Path, description = "VM name")),
    responses(
        (status = 200, description = "The VM", body = sendense_shared::api::Vm)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm_name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    validate_name("vm_name", &vm_name)?;
    let vm_name = vm_name_for(&hub, &who, &vm_name).await?;
    own_vm(&hub, &who, &vm_name).await?;
    find_vm(&hub, &vm_name).await.map(Json)
}

/// Registers (or updates) a VM: by hand (the admin, who may also move a VM to another node)
/// or from a node's inventory (a node's credential: only with `node` itself; a name another
/// node's VM holds is never taken over: this node's VM becomes `<name>.<node>` on the hub).
#[utoipa::path(
    post,
    path = "/vms",
    operation_id = "register_vm",
    tag = "vms",
    summary = "Registers (or updates) a VM and its disks",
    request_body = sendense_shared::api::VmRequest,
    responses(
        (status = 201, description = "Registered", body = sendense_shared::api::Vm),
        (status = 409, description = "The name and `<name>.<node>` both belong to another node's VMs (`already_exists`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn register(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<VmRequest>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    crate::vms::validate_vm(&req)?;
    own_node(&who, req.node.as_deref(), "a VM")?;
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
    let vm = match who {
        Principal::Admin => hub.db.upsert_vm(&req).await?,
        Principal::Node(_) => hub.db.upsert_vm_of_node(&req).await?,
    };
    tracing::info!(vm = %vm.vm_name, disks = vm.disks.len(), node = ?vm.node, "VM registered");
    Ok((StatusCode::CREATED, Json(vm)))
}

impl From<crate::vms::VmInvalid> for ApiError {
    fn from(e: crate::vms::VmInvalid) -> Self {
        match e {
            crate::vms::VmInvalid::Name(n) => n.into(),
            crate::vms::VmInvalid::BadLabel(d) => ApiError::BadName(d),
            crate::vms::VmInvalid::Field(d) => ApiError::invalid(d),
        }
    }
}

pub async fn find_vm(hub: &crate::hub::Hub, vm_name: &str) -> Result<Vm, ApiError> {
    match hub.db.get_vm(vm_name).await {
        Ok(vm) => Ok(vm),
        Err(crate::db::DbError::NotFound { .. }) => Err(ApiError::NotFound(format!(
            "no VM named {vm_name:?} is registered (GET /api/v1/vms lists them)"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendense_shared::api::VmDisk;
    use sendense_shared::ids::DiskKey;

    /// The rules as the API answers them (status and body).
    fn validate_vm(r: &VmRequest) -> Result<(), ApiError> {
        crate::vms::validate_vm(r).map_err(ApiError::from)
    }

    fn validate_driver(d: Option<&str>) -> Result<(), ApiError> {
        crate::vms::validate_driver(d).map_err(ApiError::from)
    }

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
