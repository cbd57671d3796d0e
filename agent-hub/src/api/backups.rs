//! Backups: start, list, one, cancel, events, and the writer's progress / completion reports.
//! The job logic lives in [`crate::jobs`]; these handlers validate and translate.

use super::scope::{own_backup, own_vm, vm_name_for};
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::hub::AppState;
use crate::jobs::JobError;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{
    Backup, BackupRequest, CompletionReport, JobEvent, JobStatus, ProgressReport,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::BackupId;
use sendense_shared::names::validate_name;

/// Prepares every disk's export (ports, images, qemu-nbd) before answering, so a refusal
/// (space, ports, a qemu-nbd that would not start) is the answer itself; `202` with the
/// backup in `running` otherwise.
#[utoipa::path(
    post,
    path = "/backups",
    operation_id = "start_backup",
    tag = "backups",
    summary = "Starts a backup of a VM",
    request_body = sendense_shared::api::BackupRequest,
    responses(
        (status = 202, description = "The backup, exports prepared", body = sendense_shared::api::Backup),
        (status = 409, description = "The VM is busy, its node is not registered, ...", body = sendense_shared::api::ErrorBody),
        (status = 507, description = "The repository lacks the space (`insufficient_storage`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn start(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(mut req): ApiJson<BackupRequest>,
) -> Result<(StatusCode, Json<Backup>), ApiError> {
    validate_name("vm_name", &req.vm_name)?;
    validate_name("repository_id", &req.repository_id)?;
    req.vm_name = vm_name_for(&hub, &who, &req.vm_name).await?;
    own_vm(&hub, &who, &req.vm_name).await?;
    let b = hub.jobs.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(b)))
}

/// Newest first; `?vm_name=`, `?status=` and `?limit=` narrow it.
#[utoipa::path(
    get,
    path = "/backups",
    operation_id = "list_backups",
    tag = "backups",
    summary = "Backups, newest first",
    params(ListQuery),
    responses(
        (status = 200, description = "The backups", body = Vec<sendense_shared::api::Backup>)
    )
)]
pub async fn list(
    State(hub): State<AppState>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<ListQuery>,
) -> Result<Json<Vec<Backup>>, ApiError> {
    let status = match &q.status {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "status: {s:?} is not one of pending, preparing, running, finalizing, completed, \
                 failed, cancelling, cancelled"
            ))
        })?),
        None => None,
    };
    // The status narrows in the database (the reconciler's query); the name here.
    let mut list = match status {
        Some(s) => hub.db.list_backups_in(&[s]).await?,
        None => hub.db.list_backups().await?,
    };
    list.retain(|b| q.vm_name.as_ref().is_none_or(|v| &b.vm_name == v));
    if let Some(n) = q.limit {
        list.truncate(n);
    }
    Ok(Json(list))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub vm_name: Option<String>,
    #[param(value_type = Option<sendense_shared::api::JobStatus>)]
    pub status: Option<String>,
    pub limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/backups/{id}",
    operation_id = "get_backup",
    tag = "backups",
    summary = "One backup",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "The backup", body = sendense_shared::api::Backup)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Backup>, ApiError> {
    let id = backup_id(id)?;
    own_backup(&hub, &who, &id.0).await?;
    Ok(Json(hub.jobs.get(&id).await?))
}

#[utoipa::path(
    post,
    path = "/backups/{id}/cancel",
    operation_id = "cancel_backup",
    tag = "backups",
    summary = "Cancels a backup",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::Backup),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn cancel(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Backup>), ApiError> {
    let id = backup_id(id)?;
    own_backup(&hub, &who, &id.0).await?;
    Ok((StatusCode::ACCEPTED, Json(hub.jobs.cancel(&id).await?)))
}

#[utoipa::path(
    get,
    path = "/backups/{id}/events",
    operation_id = "list_backup_events",
    tag = "backups",
    summary = "A backup's event log, oldest first",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "The events", body = Vec<sendense_shared::api::JobEvent>)
    )
)]
pub async fn events(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<JobEvent>>, ApiError> {
    let id = backup_id(id)?;
    own_backup(&hub, &who, &id.0).await?;
    hub.jobs.get(&id).await?;
    Ok(Json(hub.db.list_events(&id).await?))
}

#[utoipa::path(
    post,
    path = "/backups/{id}/progress",
    operation_id = "report_backup_progress",
    tag = "backups",
    summary = "The writer reports per-disk progress",
    params(("id" = String, Path, description = "Backup id")),
    request_body = sendense_shared::api::ProgressReport,
    responses(
        (status = 200, description = "The backup", body = sendense_shared::api::Backup),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn progress(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(report): ApiJson<ProgressReport>,
) -> Result<Json<Backup>, ApiError> {
    let id = backup_id(id)?;
    own_backup(&hub, &who, &id.0).await?;
    Ok(Json(hub.jobs.progress(&id, report).await?))
}

/// `202`: verification runs after the answer (reading a large disk back takes a while);
/// follow the job to `completed` or `failed`.
#[utoipa::path(
    post,
    path = "/backups/{id}/complete",
    operation_id = "complete_backup",
    tag = "backups",
    summary = "The writer reports the end of the copy",
    params(("id" = String, Path, description = "Backup id")),
    request_body = sendense_shared::api::CompletionReport,
    responses(
        (status = 202, description = "Verification runs", body = sendense_shared::api::Backup),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn complete(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(report): ApiJson<CompletionReport>,
) -> Result<(StatusCode, Json<Backup>), ApiError> {
    let id = backup_id(id)?;
    own_backup(&hub, &who, &id.0).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(hub.jobs.complete(&id, report).await?),
    ))
}

/// Verification and chain details of each disk (stored after finalization).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DiskVerification {
    pub disk_key: sendense_shared::ids::DiskKey,
    /// `"passed"`, `"failed"` or `"skipped"` (no checksums sent); absent before finalization.
    pub checksum_status: Option<String>,
    pub checksum_ranges: Option<u64>,
    pub checksum_mismatches: Option<u64>,
    /// Summary of `qemu-img check`.
    pub qemu_img_check: Option<String>,
    /// The backup this disk's image builds on (incrementals).
    pub parent_backup_id: Option<BackupId>,
    /// Backing file as recorded in the image (relative).
    pub backing_path: Option<String>,
    /// Bytes the writer really wrote into this disk's image, when it said (an incremental: the
    /// changed blocks only).
    pub bytes_transferred: Option<u64>,
    /// The hypervisor's change id the disk was copied at (vSphere CBT).
    pub change_id: Option<String>,
}

/// `GET /api/v1/backups/{id}/verification`.
#[utoipa::path(
    get,
    path = "/backups/{id}/verification",
    operation_id = "get_backup_verification",
    tag = "backups",
    summary = "Verification and chain details of each disk",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "Per disk", body = Vec<DiskVerification>)
    )
)]
pub async fn verification(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<DiskVerification>>, ApiError> {
    let id = backup_id(id)?;
    let rows = hub.db.backup_disks(&id).await?;
    // Every job has disks: none means no such backup, which the job manager's 404 names.
    if rows.is_empty() {
        hub.jobs.get(&id).await?;
    }
    Ok(Json(
        rows.into_iter()
            .map(|r| DiskVerification {
                disk_key: r.result.disk_key,
                checksum_status: r.checksum_status,
                checksum_ranges: r.checksum_ranges,
                checksum_mismatches: r.checksum_mismatches,
                qemu_img_check: r.qemu_img_check,
                parent_backup_id: r.parent_backup_id,
                backing_path: r.backing_path,
                bytes_transferred: r.bytes_transferred,
                change_id: r.result.change_id,
            })
            .collect(),
    ))
}

fn backup_id(id: String) -> Result<BackupId, ApiError> {
    validate_name("backup_id", &id)?;
    Ok(BackupId(id))
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let detail = e.to_string();
        match e {
            JobError::VmNotFound { .. }
            | JobError::RepositoryNotFound { .. }
            | JobError::BackupNotFound { .. } => ApiError::NotFound(detail),
            JobError::NodeNotFound { .. } => {
                ApiError::conflict(ErrorCode::NodeNotRegistered, detail)
            }
            JobError::Busy { .. } | JobError::Pruning { .. } => {
                ApiError::conflict(ErrorCode::VmBusy, detail)
            }
            JobError::WrongState { .. } => ApiError::conflict(ErrorCode::WrongState, detail),
            JobError::Cancelled { .. } => ApiError::conflict(ErrorCode::Cancelled, detail),
            JobError::Invalid { .. } => ApiError::invalid(detail),
            JobError::InsufficientSpace { .. } => ApiError::InsufficientStorage(detail),
            JobError::PortsExhausted { .. } => ApiError::PortsExhausted(detail),
            JobError::Prepare { .. } => ApiError::JobFailed(detail),
            JobError::Db(e) => ApiError::from(e),
        }
    }
}
