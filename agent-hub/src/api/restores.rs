//! Restores: start, list, one. The logic lives in [`crate::restores`].

use super::{ApiError, ApiJson};
use crate::restores::RestoreError;
use crate::server::AppState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{Restore, RestoreRequest};
use sendense_shared::errors::ErrorCode;
use sendense_shared::names::validate_name;

/// Exports the backup point and asks the node to copy it before answering `202` with the
/// restore `running`; follow it with `GET /api/v1/restores/{id}`.
pub async fn start(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<(StatusCode, Json<Restore>), ApiError> {
    validate_name("backup_id", &req.backup_id.0)?;
    let r = crate::restores::start(&hub, req).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

pub async fn list(State(hub): State<AppState>) -> Json<Vec<Restore>> {
    Json(hub.restores.list())
}

pub async fn get_one(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Restore>, ApiError> {
    validate_name("restore_id", &id)?;
    Ok(Json(hub.restores.get(&id)?))
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
            RestoreError::Ports(d) => ApiError::PortsExhausted(d),
            RestoreError::Export(d) => ApiError::JobFailed(d),
            RestoreError::Db(e) => e.into(),
        }
    }
}
