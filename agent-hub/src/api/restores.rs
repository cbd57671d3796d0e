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

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Restore>>, ApiError> {
    Ok(Json(hub.restores.list().await?))
}

fn restore_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("restore_id", id)?)
}

pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Restore>, ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok(Json(hub.restores.get(&id).await?))
}

pub async fn cancel(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Restore>), ApiError> {
    restore_id(&id)?;
    own_restore(&hub, &who, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(hub.restores.cancel(&id).await?)))
}

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
            RestoreError::Busy { .. } => ApiError::conflict(ErrorCode::BackupBusy, detail),
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
