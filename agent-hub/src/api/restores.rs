//! Restores: start, list, one, cancel, events, and the node's progress / completion reports.
//! The job logic lives in [`crate::restores`].

use super::scope::{own_backup, own_node, own_restore};
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::hub::AppState;
use crate::restores::RestoreError;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{JobEvent, Restore, RestoreCompletion, RestoreProgress, RestoreRequest};
use sendense_shared::errors::{ErrorCode, chain};
use sendense_shared::names::validate_name;

/// Exports the backup point and asks the node to copy it before answering `202` with the
/// restore `running`; follow it with `GET /api/v1/restores/{id}` or the event stream.
#[utoipa::path(
    post,
    path = "/restores",
    operation_id = "start_restore",
    tag = "restores",
    summary = "Restores one disk of a backup point onto a node",
    request_body = sendense_shared::api::RestoreRequest,
    responses(
        (status = 202, description = "The restore, `running`", body = sendense_shared::api::Restore),
        (status = 409, description = "The point is not restorable, busy, or its image is missing", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn start(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<(StatusCode, Json<Restore>), ApiError> {
    validate_name("backup_id", &req.backup_id.0)?;
    // A node restores only its own VMs' points, and only onto itself.
    own_node(&who, Some(&req.target.node), "a restore onto target.node")?;
    own_backup(&hub, &who, &req.backup_id.0).await?;
    let r = hub.restores.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

#[utoipa::path(
    get,
    path = "/restores",
    operation_id = "list_restores",
    tag = "restores",
    summary = "Every restore",
    responses(
        (status = 200, description = "The restores", body = Vec<sendense_shared::api::Restore>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Restore>>, ApiError> {
    Ok(Json(hub.restores.list().await?))
}

fn restore_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("restore_id", id)?)
}

#[utoipa::path(
    get,
    path = "/restores/{id}",
    operation_id = "get_restore",
    tag = "restores",
    summary = "One restore",
    params(("id" = String, Path, description = "Restore id")),
    responses(
        (status = 200, description = "The restore", body = sendense_shared::api::Restore)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Restore>, ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok(Json(hub.restores.get(&id).await?))
}

#[utoipa::path(
    post,
    path = "/restores/{id}/cancel",
    operation_id = "cancel_restore",
    tag = "restores",
    summary = "Cancels a restore",
    params(("id" = String, Path, description = "Restore id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::Restore),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn cancel(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Restore>), ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(hub.restores.cancel(&id).await?)))
}

#[utoipa::path(
    get,
    path = "/restores/{id}/events",
    operation_id = "list_restore_events",
    tag = "restores",
    summary = "A restore's events, oldest first",
    params(("id" = String, Path, description = "Restore id")),
    responses(
        (status = 200, description = "The events", body = Vec<sendense_shared::api::JobEvent>)
    )
)]
pub async fn events(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<JobEvent>>, ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok(Json(hub.restores.events(&id).await?))
}

/// Node → hub, about once a second.
#[utoipa::path(
    post,
    path = "/restores/{id}/progress",
    operation_id = "report_restore_progress",
    tag = "restores",
    summary = "The node reports a restore's progress",
    params(("id" = String, Path, description = "Restore id")),
    request_body = sendense_shared::api::RestoreProgress,
    responses(
        (status = 200, description = "The restore", body = sendense_shared::api::Restore),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn progress(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(p): ApiJson<RestoreProgress>,
) -> Result<Json<Restore>, ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok(Json(hub.restores.progress(&id, p).await?))
}

/// Node → hub, once, at the restore's end (repeated reports of the same end get the same
/// answer).
#[utoipa::path(
    post,
    path = "/restores/{id}/complete",
    operation_id = "complete_restore",
    tag = "restores",
    summary = "The node reports a restore's end",
    params(("id" = String, Path, description = "Restore id")),
    request_body = sendense_shared::api::RestoreCompletion,
    responses(
        (status = 200, description = "The restore", body = sendense_shared::api::Restore),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn complete(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(c): ApiJson<RestoreCompletion>,
) -> Result<Json<Restore>, ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok(Json(hub.restores.complete(&id, c).await?))
}

impl From<RestoreError> for ApiError {
    fn from(e: RestoreError) -> Self {
        let detail = e.to_string();
        match e {
            RestoreError::Invalid { detail } => ApiError::Invalid { detail },
            RestoreError::BackupNotFound { .. }
            | RestoreError::NodeNotFound { .. }
            | RestoreError::NotFound { .. } => ApiError::NotFound(detail),
            RestoreError::NotRestorable { .. } => {
                ApiError::conflict(ErrorCode::NotRestorable, detail)
            }
            RestoreError::Busy { .. } | RestoreError::Pruning { .. } => {
                ApiError::conflict(ErrorCode::BackupBusy, detail)
            }
            RestoreError::ImageMissing { .. } => {
                ApiError::conflict(ErrorCode::ImageMissing, detail)
            }
            RestoreError::WrongState { .. } => ApiError::conflict(ErrorCode::WrongState, detail),
            // Exhausted is 503 ports_exhausted; a database failure while allocating is the
            // database's (503 database naming its cause), never "no port free".
            RestoreError::Ports { source, .. } => (*source).into(),
            RestoreError::Db { source, .. } => ApiError::Database(*source),
            e @ RestoreError::Export { .. } => ApiError::JobFailed(chain(&e)),
        }
    }
}
