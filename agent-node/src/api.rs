//! The node's HTTP API (see `shared/API.md`, node part). Everything under `/api/v1/` needs
//! `Authorization: Bearer <token>` except `GET /api/v1/health`. Errors are
//! `{"error": <ErrorCode>, "detail": "<what to do / which field>"}`, the status following the
//! code; bearer check, JSON extraction and error answers are `sendense_shared::http`'s, the
//! hub's too, so both answer bad input alike (`400 invalid_json` for syntax, `422
//! invalid_field` naming the field for shape).
//!
//! `POST /api/v1/backup/start` answers:
//! - `202` with the job state once the request is valid (the snapshot and copy run after it);
//!   the same `backup_id` again while it runs answers `202` with the same job;
//! - `400 invalid_json`: not JSON;
//! - `422 invalid_field`: JSON of the wrong shape, bad targets string, a disk of the VM without
//!   target, or a disk key the VM does not have (detail names the field or the keys);
//! - `404 not_found` (no such VM);
//! - `409 vm_busy` (the VM has a running job), `409 already_exists` (a finished job has the
//!   backup id), `409 bitmap_missing` (an incremental without a valid changed-block map: do a
//!   full);
//! - `502 hypervisor_unavailable` (QMP not answering); `503 shutting_down`.
//!
//! `POST /api/v1/vms/{vm}/change-tracking` turns on the hypervisor's change tracking (vSphere
//! CBT; QEMU always tracks): `200 {"vm_name","change_tracking":true}`, `404 not_found`,
//! `502 hypervisor_unavailable` (cannot reach or log in) or `502 hypervisor_error` (the
//! hypervisor refused; the detail has its cause).

use crate::jobs::{Jobs, StartError};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    Inventory, InventoryVm, NodeBackupStart, NodeRecoveryStart, NodeRecoveryState,
    NodeRestoreStart, NodeRestoreState, TunnelState, TunnelStateKind, VmDisk,
};
use sendense_shared::errors::{ErrorCode, chain};
use sendense_shared::http::{ApiJson, Bearer, require_bearer};
use sendense_shared::ids::BackupId;
use sendense_shared::token::Token;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What the handlers share.
pub struct NodeState {
    pub name: String,
    pub token: Token,
    pub started_at: DateTime<Utc>,
    pub jobs: Arc<Jobs>,
    /// The SSH tunnel to the hub, when one is configured.
    pub tunnel: Option<Arc<crate::tunnel::Tunnel>>,
    /// Restores into new images on this host.
    pub restores: Arc<crate::restore::Restores>,
    /// Instant recoveries: VMs booted from the hub's exports on this host.
    pub recoveries: Arc<crate::recovery::Recoveries>,
}

/// An error answer: `{"error": <ErrorCode>, "detail"}`, the status from the code (the same
/// table as the hub's).
pub use sendense_shared::http::ErrorAnswer as ApiError;

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        let detail = e.to_string();
        match e {
            StartError::UnknownVm { .. } => ApiError::new(ErrorCode::NotFound, detail),
            StartError::EmptyId
            | StartError::Targets(_)
            | StartError::DuplicateTarget { .. }
            | StartError::BadTarget { .. }
            | StartError::MissingDisks { .. }
            | StartError::UnknownDisks { .. } => ApiError::new(ErrorCode::InvalidField, detail),
            StartError::VmBusy { .. } => ApiError::new(ErrorCode::VmBusy, detail),
            StartError::DuplicateId { .. } => ApiError::new(ErrorCode::AlreadyExists, detail),
            StartError::BitmapMissing(_) => ApiError::new(
                ErrorCode::BitmapMissing,
                format!("{detail}; run a full backup"),
            ),
            StartError::Source(e) => {
                let detail = chain(&e);
                tracing::warn!(error = %detail, "hypervisor error on backup start");
                ApiError::new(ErrorCode::HypervisorUnavailable, detail)
            }
            StartError::ShuttingDown => ApiError::new(ErrorCode::ShuttingDown, detail),
        }
    }
}

/// The router with every route.
pub fn router(state: Arc<NodeState>) -> Router {
    let protected = protected().route_layer(axum::middleware::from_fn_with_state(
        Bearer::new(state.token.clone(), "the node's --token-file"),
        require_bearer,
    ));
    let (router, _) = open().merge(protected).split_for_parts();
    router.with_state(state)
}

/// The node's OpenAPI 3.1 document (`GET /api/v1/openapi.json`, committed as
/// `docs/openapi/node.json`), from the same routes as [`router`]; made once per process.
pub fn openapi_document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        sendense_shared::api::openapi::finish(
            open().merge(protected()).into_openapi(),
            sendense_shared::api::openapi::Agent::Node,
        )
    })
}

/// The bearer-protected routes, each with its OpenAPI description from the same `routes!`
/// list (one list per path): a route cannot be served undocumented.
fn protected() -> OpenApiRouter<Arc<NodeState>> {
    OpenApiRouter::new()
        .routes(routes!(inventory))
        .routes(routes!(backup_start))
        .routes(routes!(backup_check))
        .routes(routes!(backup_list))
        .routes(routes!(backup_get))
        .routes(routes!(backup_cancel))
        .routes(routes!(tunnel))
        .routes(routes!(metrics))
        .routes(routes!(change_tracking))
        .routes(routes!(restore_start))
        .routes(routes!(restore_get))
        .routes(routes!(restore_cancel))
        .routes(routes!(recovery_start))
        .routes(routes!(recovery_get))
        .routes(routes!(recovery_cancel))
        .routes(routes!(recovery_speed))
        .routes(routes!(openapi))
}

/// The open routes, and the answer to every other path.
fn open() -> OpenApiRouter<Arc<NodeState>> {
    OpenApiRouter::new()
        .routes(routes!(health))
        // Open: a caller asks it before it sends its credential (sendense_shared::proof).
        .routes(routes!(proof))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no route {method} {}", uri.path()),
            )
        })
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "node_openapi",
    tag = "system",
    summary = "This API's OpenAPI 3.1 document",
    responses((status = 200, description = "The document", body = Object))
)]
async fn openapi() -> Json<&'static serde_json::Value> {
    Json(openapi_document())
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<NodeState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// `POST /api/v1/restore/start`: `202` with the restore's state; `422 invalid_field` (id, path,
/// source, size; the detail names it); `409 already_exists` (restore id used); `503
/// shutting_down`.
#[utoipa::path(
    post,
    path = "/api/v1/restore/start",
    operation_id = "node_start_restore",
    tag = "restores",
    summary = "Copies a hub export into a new image on this host",
    request_body = sendense_shared::api::NodeRestoreStart,
    responses(
        (status = 202, description = "The restore", body = sendense_shared::api::NodeRestoreState),
        (status = 409, description = "The restore id is used (`already_exists`), or `replace_vm` runs (`vm_busy`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn restore_start(
    State(state): State<Arc<NodeState>>,
    ApiJson(req): ApiJson<NodeRestoreStart>,
) -> Result<(StatusCode, Json<NodeRestoreState>), ApiError> {
    use crate::restore::RestoreError;
    match state.restores.start(req) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ RestoreError::Duplicate(_)) => {
            Err(ApiError::new(ErrorCode::AlreadyExists, e.to_string()))
        }
        Err(e @ RestoreError::ShuttingDown) => {
            Err(ApiError::new(ErrorCode::ShuttingDown, e.to_string()))
        }
        Err(e @ RestoreError::Replace(crate::restore::replace::ReplaceError::Running { .. })) => {
            Err(ApiError::new(ErrorCode::VmBusy, e.to_string()))
        }
        Err(
            e @ (RestoreError::Id(_)
            | RestoreError::Replace(_)
            | RestoreError::Path { .. }
            | RestoreError::Source(_)
            | RestoreError::SourceExport { .. }
            | RestoreError::Size),
        ) => Err(ApiError::new(ErrorCode::InvalidField, e.to_string())),
    }
}

/// `POST /api/v1/restore/{id}/cancel`: `202` with the restore's state (it stops its qemu-nbd,
/// deletes the partial image and ends `cancelled`); `404 not_found`; `409 wrong_state` when it
/// has ended already.
#[utoipa::path(
    post,
    path = "/api/v1/restore/{id}/cancel",
    operation_id = "node_cancel_restore",
    tag = "restores",
    summary = "Cancels a restore",
    params(("id" = String, Path, description = "Restore id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::NodeRestoreState),
        (status = 409, description = "The restore has ended (`wrong_state`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn restore_cancel(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeRestoreState>), ApiError> {
    use crate::restore::CancelError;
    match state.restores.cancel(&id) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ CancelError::NotFound { .. }) => {
            Err(ApiError::new(ErrorCode::NotFound, e.to_string()))
        }
        Err(e @ CancelError::Ended { .. }) => {
            Err(ApiError::new(ErrorCode::WrongState, e.to_string()))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/restore/{id}",
    operation_id = "node_get_restore",
    tag = "restores",
    summary = "One restore",
    params(("id" = String, Path, description = "Restore id")),
    responses(
        (status = 200, description = "The restore", body = sendense_shared::api::NodeRestoreState)
    )
)]
async fn restore_get(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Json<NodeRestoreState>, ApiError> {
    state
        .restores
        .get(&id)
        .map(|j| Json(j.view()))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no restore {id}")))
}

/// `POST /api/v1/recovery/start`: `202` with the recovery's state (the VM starts and its disks
/// stream home after it); `422 invalid_field` (id, vm_name, memory_mib, cpus, machine, kernel,
/// initrd, append, overlay_dir, disks; the detail names it); `409 already_exists` (recovery
/// id used, VM name used by a live recovery, or its overlays exist); `503 shutting_down`.
#[utoipa::path(
    post,
    path = "/api/v1/recovery/start",
    operation_id = "node_start_recovery",
    tag = "recoveries",
    summary = "Boots a backup point as a new VM on this host from the hub's exports",
    request_body = sendense_shared::api::NodeRecoveryStart,
    responses(
        (status = 202, description = "The recovery", body = sendense_shared::api::NodeRecoveryState),
        (status = 409, description = "The recovery id, the VM name or its overlays are taken (`already_exists`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn recovery_start(
    State(state): State<Arc<NodeState>>,
    ApiJson(req): ApiJson<NodeRecoveryStart>,
) -> Result<(StatusCode, Json<NodeRecoveryState>), ApiError> {
    use crate::recovery::RecoveryError;
    match state.recoveries.start(req) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ RecoveryError::Taken(_)) => {
            Err(ApiError::new(ErrorCode::AlreadyExists, e.to_string()))
        }
        Err(e @ RecoveryError::ShuttingDown) => {
            Err(ApiError::new(ErrorCode::ShuttingDown, e.to_string()))
        }
        Err(e @ RecoveryError::Field { .. }) => {
            Err(ApiError::new(ErrorCode::InvalidField, e.to_string()))
        }
    }
}

/// `POST /api/v1/recovery/{id}/speed`: `202` with the recovery's state; every disk's stream
/// takes the new bound within a second (`speed_bps` 0: none); `404 not_found`; `409
/// wrong_state` once it has ended or is being cancelled.
#[utoipa::path(
    post,
    path = "/api/v1/recovery/{id}/speed",
    operation_id = "node_recovery_speed",
    tag = "recoveries",
    summary = "Changes the bound of a recovery's streams",
    params(("id" = String, Path, description = "Recovery id")),
    request_body = sendense_shared::api::RecoverySpeed,
    responses(
        (status = 202, description = "The recovery", body = sendense_shared::api::NodeRecoveryState),
        (status = 409, description = "The recovery has ended (`wrong_state`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn recovery_speed(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<sendense_shared::api::RecoverySpeed>,
) -> Result<(StatusCode, Json<NodeRecoveryState>), ApiError> {
    use crate::recovery::CancelError;
    match state.recoveries.set_speed(&id, req.speed_bps) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ CancelError::NotFound { .. }) => {
            Err(ApiError::new(ErrorCode::NotFound, e.to_string()))
        }
        Err(e @ CancelError::Ended { .. }) => {
            Err(ApiError::new(ErrorCode::WrongState, e.to_string()))
        }
    }
}

/// `POST /api/v1/recovery/{id}/cancel`: `202` with the recovery's state (it kills the VM,
/// removes its overlays and run files, and ends `cancelled`: what the guest wrote is lost);
/// `404 not_found`; `409 wrong_state` when it has ended already (a completed recovery's VM is
/// the operator's to stop).
#[utoipa::path(
    post,
    path = "/api/v1/recovery/{id}/cancel",
    operation_id = "node_cancel_recovery",
    tag = "recoveries",
    summary = "Cancels a recovery (the VM stops, the guest's writes are lost)",
    params(("id" = String, Path, description = "Recovery id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::NodeRecoveryState),
        (status = 409, description = "The recovery has ended (`wrong_state`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn recovery_cancel(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeRecoveryState>), ApiError> {
    use crate::recovery::CancelError;
    match state.recoveries.cancel(&id) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ CancelError::NotFound { .. }) => {
            Err(ApiError::new(ErrorCode::NotFound, e.to_string()))
        }
        Err(e @ CancelError::Ended { .. }) => {
            Err(ApiError::new(ErrorCode::WrongState, e.to_string()))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/recovery/{id}",
    operation_id = "node_get_recovery",
    tag = "recoveries",
    summary = "One recovery",
    params(("id" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "The recovery", body = sendense_shared::api::NodeRecoveryState)
    )
)]
async fn recovery_get(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Json<NodeRecoveryState>, ApiError> {
    state
        .recoveries
        .get(&id)
        .map(|j| Json(j.view()))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no recovery {id}")))
}

#[utoipa::path(
    get,
    path = "/api/v1/health",
    operation_id = "node_health",
    tag = "system",
    summary = "Identity of the binary (open)",
    security(),
    responses(
        (status = 200, description = "Healthy", body = sendense_shared::api::Health)
    )
)]
async fn health(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    Json(sendense_shared::identity::health(
        "healthy",
        state.started_at,
        None,
    ))
}

/// `GET /api/v1/proof?nonce=&node=`: this node proves it holds its credential (role `node`),
/// so the hub sends that credential only to the real node, not to whoever holds the hub's
/// reverse-forward port while the tunnel is down.
#[utoipa::path(
    get,
    path = "/api/v1/proof",
    operation_id = "node_proof",
    tag = "system",
    summary = "The node proves it holds its credential (open)",
    params(sendense_shared::proof::ProofQuery),
    security(),
    responses(
        (status = 200, description = "The proof", body = sendense_shared::proof::ProofAnswer),
        (status = 404, description = "This is another node (`not_found`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn proof(
    State(state): State<Arc<NodeState>>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<
        sendense_shared::proof::ProofQuery,
    >,
) -> Result<Json<sendense_shared::proof::ProofAnswer>, ApiError> {
    sendense_shared::http::proof::check_query(&q)?;
    if let Some(asked) = q.node.as_deref().filter(|n| *n != state.name) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("this is node {:?}, not {asked:?}", state.name),
        ));
    }
    Ok(Json(sendense_shared::proof::ProofAnswer {
        proofs: vec![sendense_shared::proof::prove(
            &state.token,
            sendense_shared::proof::Role::Node,
            &state.name,
            &q.nonce,
        )],
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/inventory",
    operation_id = "node_inventory",
    tag = "vms",
    summary = "The VMs and disks the node serves",
    responses(
        (status = 200, description = "The inventory", body = sendense_shared::api::Inventory),
        (status = 502, description = "The hypervisor cannot be reached (`hypervisor_unavailable`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn inventory(State(state): State<Arc<NodeState>>) -> Result<Json<Inventory>, ApiError> {
    let vms = state
        .jobs
        .driver()
        .list_vms()
        .await
        .map_err(|e| ApiError::new(ErrorCode::HypervisorUnavailable, chain(&e)))?;
    Ok(Json(Inventory {
        vms: vms.into_iter().map(inventory_vm).collect(),
    }))
}

/// A driver VM as the API shows it.
pub fn inventory_vm(vm: crate::source::SourceVm) -> InventoryVm {
    InventoryVm {
        vm_name: vm.vm_name,
        vm_id: vm.vm_id,
        disks: vm
            .disks
            .into_iter()
            .map(|d| VmDisk {
                disk_key: d.disk_key,
                unit_number: d.unit_number,
                size_bytes: d.size_bytes,
                label: d.label,
                controller: d.controller,
                backing_file: d.backing_file,
                thin_provisioned: d.thin_provisioned,
            })
            .collect(),
        driver: Some(vm.driver.to_string()),
        change_tracking: vm.change_tracking,
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/vms/{vm}/change-tracking",
    operation_id = "node_enable_change_tracking",
    tag = "vms",
    summary = "Turns on the hypervisor's change tracking of a VM",
    params(("vm" = String, Path, description = "VM name")),
    responses(
        (status = 200, description = "Enabled", body = ChangeTracking),
        (status = 502, description = "The hypervisor cannot be reached or refused", body = sendense_shared::api::ErrorBody)
    )
)]
async fn change_tracking(
    State(state): State<Arc<NodeState>>,
    Path(vm): Path<String>,
) -> Result<Json<ChangeTracking>, ApiError> {
    use crate::source::SourceError;
    let driver = state.jobs.driver();
    // The VM first: a driver that always tracks answers Ok for any name.
    let enabled = match driver.vm(&vm).await {
        Ok(_) => driver.enable_change_tracking(&vm).await,
        Err(e) => Err(e),
    };
    match enabled {
        Ok(()) => Ok(Json(ChangeTracking {
            vm_name: vm,
            change_tracking: true,
        })),
        Err(e @ SourceError::UnknownVm { .. }) => {
            Err(ApiError::new(ErrorCode::NotFound, e.to_string()))
        }
        Err(e @ (SourceError::Endpoint { .. } | SourceError::Qmp { .. })) => {
            Err(ApiError::new(ErrorCode::HypervisorUnavailable, chain(&e)))
        }
        Err(e) => {
            let detail = chain(&e);
            tracing::warn!(vm = %vm, error = %detail, "enabling change tracking failed");
            Err(ApiError::new(ErrorCode::HypervisorError, detail))
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/backup/start",
    operation_id = "node_start_backup",
    tag = "backups",
    summary = "Snapshots a VM and copies its disks to the targets",
    request_body = sendense_shared::api::NodeBackupStart,
    responses(
        (status = 202, description = "The copy job", body = sendense_shared::api::NodeBackupState),
        (status = 409, description = "The VM is busy, the id is used, or an incremental has no changed-block map", body = sendense_shared::api::ErrorBody),
        (status = 502, description = "The hypervisor cannot be reached (`hypervisor_unavailable`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn backup_start(
    State(state): State<Arc<NodeState>>,
    ApiJson(req): ApiJson<NodeBackupStart>,
) -> Result<Response, ApiError> {
    let (job, _created) = state.jobs.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(job.view())).into_response())
}

/// `POST /api/v1/backup/check`: would `backup/start` take this request? `200` when it would;
/// the same refusals as a start otherwise (`409 bitmap_missing` for an incremental without a
/// valid changed-block map, `404 not_found` for an unknown VM). Side-effect free: the hub asks
/// before it prepares any export; the targets may be left empty.
#[utoipa::path(
    post,
    path = "/api/v1/backup/check",
    operation_id = "node_check_backup",
    tag = "backups",
    summary = "Would backup/start take this request? (no side effect)",
    request_body = sendense_shared::api::NodeBackupStart,
    responses(
        (status = 200, description = "It would", body = BackupCheck),
        (status = 409, description = "The VM is busy or an incremental has no changed-block map", body = sendense_shared::api::ErrorBody),
        (status = 502, description = "The hypervisor cannot be reached (`hypervisor_unavailable`)", body = sendense_shared::api::ErrorBody)
    )
)]
async fn backup_check(
    State(state): State<Arc<NodeState>>,
    ApiJson(req): ApiJson<NodeBackupStart>,
) -> Result<Json<BackupCheck>, ApiError> {
    state.jobs.check(&req).await?;
    Ok(Json(BackupCheck {
        vm_name: req.vm_name,
        backup_type: req.backup_type,
    }))
}

/// The answer of `POST /api/v1/backup/check`: the start would be taken.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct BackupCheck {
    pub vm_name: String,
    pub backup_type: sendense_shared::api::BackupType,
}

/// The answer of `POST /api/v1/vms/{vm}/change-tracking`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ChangeTracking {
    pub vm_name: String,
    /// Always `true`: the hypervisor tracks the VM's changed blocks now.
    pub change_tracking: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/backups",
    operation_id = "node_list_backups",
    tag = "backups",
    summary = "Every copy job of this node",
    responses(
        (status = 200, description = "The jobs", body = Vec<sendense_shared::api::NodeBackupState>)
    )
)]
async fn backup_list(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    Json(
        state
            .jobs
            .list()
            .iter()
            .map(|j| j.view())
            .collect::<Vec<_>>(),
    )
}

#[utoipa::path(
    get,
    path = "/api/v1/backup/{id}",
    operation_id = "node_get_backup",
    tag = "backups",
    summary = "One copy job",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "The job", body = sendense_shared::api::NodeBackupState)
    )
)]
async fn backup_get(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .jobs
        .get(&BackupId(id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no job {id} on this node")))?;
    Ok(Json(job.view()).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/backup/{id}/cancel",
    operation_id = "node_cancel_backup",
    tag = "backups",
    summary = "Cancels a copy job",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::NodeBackupState)
    )
)]
async fn backup_cancel(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .jobs
        .cancel(&BackupId(id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no job {id} on this node")))?;
    Ok((StatusCode::ACCEPTED, Json(job.view())).into_response())
}

/// Prometheus text exposition ([`crate::metrics`]).
#[utoipa::path(
    get,
    path = "/api/v1/metrics",
    operation_id = "node_metrics",
    tag = "system",
    summary = "Prometheus text exposition",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")
    )
)]
async fn metrics(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        crate::metrics::render(&state),
    )
}

#[utoipa::path(
    get,
    path = "/api/v1/tunnel",
    operation_id = "node_tunnel",
    tag = "system",
    summary = "The SSH tunnel's state",
    responses(
        (status = 200, description = "The state", body = sendense_shared::api::TunnelState)
    )
)]
async fn tunnel(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    if let Some(t) = &state.tunnel {
        return Json(t.state());
    }
    Json(TunnelState {
        state: TunnelStateKind::Down,
        since: state.started_at,
        restarts: 0,
        last_error: None,
        links: Vec::new(),
        forwards: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::CopyOptions;
    use crate::qmp::QmpLog;
    use crate::source::qemu::QemuDriver;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> Router {
        let driver = Arc::new(QemuDriver::new(
            Vec::new(),
            std::env::temp_dir(),
            Arc::new(QmpLog::new(None)),
        ));
        let jobs = Jobs::new(
            driver,
            None,
            CopyOptions::default(),
            CancellationToken::new(),
        );
        router(Arc::new(NodeState {
            name: "n".into(),
            token: "tok".into(),
            started_at: Utc::now(),
            tunnel: None,
            restores: crate::restore::Restores::new(jobs.context().clone(), std::env::temp_dir()),
            recoveries: crate::recovery::Recoveries::new(
                jobs.context().clone(),
                std::env::temp_dir(),
                std::env::temp_dir(),
            ),
            jobs,
        }))
    }

    async fn call(req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    fn get(path: &str, token: Option<&str>) -> Request<Body> {
        let mut b = Request::get(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    /// `docs/openapi/node.json` is what the code generates; after a change of a handler or an
    /// API type, `SENDENSE_BLESS_OPENAPI=1 cargo nextest run -p agent-node openapi` rewrites it.
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/node.json");
        sendense_shared::api::openapi::check_committed(openapi_document(), &path, "agent-node");
    }

    #[tokio::test]
    async fn the_openapi_document_is_served_behind_the_token_and_lists_every_route() {
        let (s, body) = call(get("/api/v1/openapi.json", None)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
        let (s, doc) = call(get("/api/v1/openapi.json", Some("tok"))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(&doc, openapi_document());
        assert_eq!(doc["openapi"], "3.1.0");
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for p in [
            "/api/v1/backup/start",
            "/api/v1/restore/{id}/cancel",
            "/api/v1/recovery/start",
            "/api/v1/recovery/{id}",
            "/api/v1/recovery/{id}/cancel",
            "/api/v1/health",
        ] {
            assert!(paths.contains(&p), "{p} in {paths:?}");
        }
        // The open ones say so; the others need the bearer scheme.
        assert_eq!(
            doc["paths"]["/api/v1/health"]["get"]["security"],
            serde_json::json!([])
        );
        assert!(
            doc["paths"]["/api/v1/inventory"]["get"]
                .get("security")
                .is_none()
        );
        assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
        assert_eq!(
            doc["paths"]["/api/v1/backup/start"]["post"]["responses"]["422"]["content"]["application/json"]
                ["schema"]["$ref"],
            "#/components/schemas/ErrorBody"
        );
    }

    #[tokio::test]
    async fn the_proof_is_open_and_made_with_the_nodes_credential_as_node() {
        use sendense_shared::proof::{ProofAnswer, Role, nonce, verify};
        let n = nonce();
        let (s, body) = call(get(&format!("/api/v1/proof?nonce={n}&node=n"), None)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let answer: ProofAnswer = serde_json::from_value(body).unwrap();
        assert!(verify(&"tok".into(), Role::Node, "n", &n, &answer));
        // Not a hub's proof (no reflection), not under another credential.
        assert!(!verify(&"tok".into(), Role::Hub, "n", &n, &answer));
        assert!(!verify(&"other".into(), Role::Node, "n", &n, &answer));
        let (s, body) = call(get("/api/v1/proof?nonce=abc&node=n", None)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            body["detail"].as_str().unwrap().starts_with("nonce:"),
            "{body}"
        );
        let (s, body) = call(get(&format!("/api/v1/proof?nonce={n}&node=m"), None)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    }

    #[tokio::test]
    async fn health_is_open_and_the_rest_needs_the_token() {
        let (s, body) = call(get("/api/v1/health", None)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["pid"], std::process::id());
        let (s, body) = call(get("/api/v1/inventory", None)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "unauthorized");
        assert!(
            body["detail"].as_str().unwrap().contains("--token-file"),
            "{body}"
        );
        let (s, body) = call(get("/api/v1/tunnel", Some("nope"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "unauthorized");
        let (s, body) = call(get("/api/v1/tunnel", Some("tok"))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["state"], "down");
        let (s, body) = call(get("/api/v1/inventory", Some("tok"))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["vms"], serde_json::json!([]));
        let (s, body) = call(get("/api/v1/backup/zz", Some("tok"))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        assert_eq!(body["detail"], "no job zz on this node");
        let (s, body) = call(get("/api/v1/nope", Some("tok"))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        assert!(
            body["detail"].as_str().unwrap().contains("/api/v1/nope"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn bad_start_bodies_are_400_or_422_like_the_hub_and_unknown_vm_is_404() {
        let post = |body: &str| {
            Request::post("/api/v1/backup/start")
                .header("authorization", "Bearer tok")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        let (s, body) = call(post("{not json")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_json");
        let (s, body) = call(post(
            r#"{"backup_id":"b","vm_name":"vm","backup_type":"weekly","nbd_targets":"x"}"#,
        ))
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"], "invalid_field");
        assert!(
            body["detail"].as_str().unwrap().starts_with("backup_type"),
            "{body}"
        );
        let (s, body) = call(post(
            r#"{"backup_id":"b","vm_name":"vm","backup_type":"full","nbd_targets":"2000:nbd://127.0.0.1:1/e"}"#,
        ))
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
    }

    /// The hub's and the node's answers to bad input are the same code, the same status and
    /// name the same field (one `ApiJson`).
    #[tokio::test]
    async fn bad_json_is_answered_like_the_hub() {
        let post = |body: &str, content_type: bool| {
            let mut b = Request::post("/api/v1/backup/start").header("authorization", "Bearer tok");
            if content_type {
                b = b.header("content-type", "application/json");
            }
            b.body(Body::from(body.to_string())).unwrap()
        };
        for bad in ["", "{", r#"{"vm_name": "#, "not json"] {
            let (s, body) = call(post(bad, false)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
            assert_eq!(body["error"], "invalid_json", "{bad:?}: {body}");
        }
        for (bad, field) in [
            (r#"{"vm_name":"vm"}"#, "backup_id"),
            (
                r#"{"backup_id":"b","vm_name":7,"backup_type":"full","nbd_targets":""}"#,
                "vm_name: invalid type",
            ),
            (
                r#"{"backup_id":"b","vm_name":"vm","backup_type":"full","nbd_targets":"","targets":[{"disk_key":"x"}]}"#,
                "targets[0].disk_key",
            ),
        ] {
            // Content-Type is not required, as on the hub.
            for ct in [true, false] {
                let (s, body) = call(post(bad, ct)).await;
                assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
                assert_eq!(body["error"], "invalid_field", "{bad}: {body}");
                let detail = body["detail"].as_str().unwrap();
                assert!(detail.contains(field), "{bad}: {detail}");
            }
        }
        // Restores go through the same extractor.
        let (s, body) = call(
            Request::post("/api/v1/restore/start")
                .header("authorization", "Bearer tok")
                .body(Body::from(r#"{"restore_id":"r1"}"#))
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"], "invalid_field", "{body}");
    }

    #[tokio::test]
    async fn recovery_routes_name_the_bad_field_and_answer_404_for_an_unknown_id() {
        let post = |path: &str, body: serde_json::Value| {
            Request::post(path)
                .header("authorization", "Bearer tok")
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        let good = serde_json::json!({
            "recovery_id": "r1", "vm_name": "vm1", "memory_mib": 512, "cpus": 1,
            "disks": [{"disk_key": 2000, "size_bytes": 1048576,
                       "export": {"host": "127.0.0.1", "port": 10100, "export": "vm-disk-2000"}}],
        });
        for (change, field) in [
            (serde_json::json!({"recovery_id": "../r"}), "recovery_id"),
            (serde_json::json!({"vm_name": "vm/1"}), "vm_name"),
            (serde_json::json!({"memory_mib": 16}), "memory_mib"),
            (serde_json::json!({"cpus": 0}), "cpus"),
            (serde_json::json!({"overlay_dir": "rel"}), "overlay_dir"),
            (
                serde_json::json!({"kernel": "/nonexistent/vmlinuz"}),
                "kernel",
            ),
            (serde_json::json!({"disks": []}), "disks"),
            (serde_json::json!({"memory_mib": "lots"}), "memory_mib"),
        ] {
            let mut body = good.clone();
            for (k, v) in change.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (s, answer) = call(post("/api/v1/recovery/start", body)).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {answer}");
            assert_eq!(answer["error"], "invalid_field", "{answer}");
            let detail = answer["detail"].as_str().unwrap();
            assert!(detail.starts_with(field), "{field}: {detail}");
        }
        let (s, body) = call(get("/api/v1/recovery/nope", Some("tok"))).await;
        assert_eq!(
            (s, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, body) = call(post("/api/v1/recovery/nope/cancel", serde_json::json!({}))).await;
        assert_eq!(
            (s, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, _) = call(get("/api/v1/recovery/nope", None)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn change_tracking_of_an_unknown_vm_is_404() {
        let (s, body) = call(
            Request::post("/api/v1/vms/nope/change-tracking")
                .header("authorization", "Bearer tok")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"], "not_found");
        assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");
    }
}
