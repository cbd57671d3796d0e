//! Verify jobs: start, list, one, cancel, events. The job logic lives in [`crate::verify`].

use super::{ApiError, ApiJson};
use crate::hub::AppState;
use crate::verify::{Trigger, VerifyError};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{JobEvent, VerifyJob, VerifyRequest};
use sendense_shared::errors::ErrorCode;
use sendense_shared::names::validate_name;

/// Picks the points of the scope and starts reading them in the background: `202` with the
/// job `pending`; follow it with `GET /api/v1/verify/{id}` or the event stream.
pub async fn start(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> Result<(StatusCode, Json<VerifyJob>), ApiError> {
    let v = hub.verify.start(&req, Trigger::Manual).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<VerifyJob>>, ApiError> {
    Ok(Json(hub.verify.list().await?))
}

fn verify_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("verify_id", id)?)
}

pub async fn get_one(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<VerifyJob>, ApiError> {
    verify_id(&id)?;
    Ok(Json(hub.verify.get(&id).await?))
}

pub async fn cancel(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<VerifyJob>), ApiError> {
    verify_id(&id)?;
    Ok((StatusCode::ACCEPTED, Json(hub.verify.cancel(&id).await?)))
}

/// The job's events on every point it read, oldest first.
pub async fn events(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<JobEvent>>, ApiError> {
    verify_id(&id)?;
    Ok(Json(hub.verify.events(&id).await?))
}

impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        let detail = e.to_string();
        match e {
            VerifyError::Invalid { detail } => ApiError::Invalid { detail },
            VerifyError::NotFound { .. } => ApiError::NotFound(detail),
            VerifyError::WrongState { .. } | VerifyError::NotCompleted { .. } => {
                ApiError::conflict(ErrorCode::WrongState, detail)
            }
            VerifyError::Db { source, .. } => source.into(),
        }
    }
}
