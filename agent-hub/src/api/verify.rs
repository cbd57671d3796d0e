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
#[utoipa::path(
    post,
    path = "/verify",
    operation_id = "start_verify",
    tag = "verify",
    summary = "Re-reads completed points against their checksums",
    request_body = sendense_shared::api::VerifyRequest,
    responses(
        (status = 202, description = "The verify job, `pending`", body = sendense_shared::api::VerifyJob),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn start(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> Result<(StatusCode, Json<VerifyJob>), ApiError> {
    let v = hub.verify.start(&req, Trigger::Manual).await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

#[utoipa::path(
    get,
    path = "/verify",
    operation_id = "list_verifies",
    tag = "verify",
    summary = "Every verify job",
    responses(
        (status = 200, description = "The verify jobs", body = Vec<sendense_shared::api::VerifyJob>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<VerifyJob>>, ApiError> {
    Ok(Json(hub.verify.list().await?))
}

fn verify_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("verify_id", id)?)
}

#[utoipa::path(
    get,
    path = "/verify/{id}",
    operation_id = "get_verify",
    tag = "verify",
    summary = "One verify job",
    params(("id" = String, Path, description = "Verify job id")),
    responses(
        (status = 200, description = "The verify job", body = sendense_shared::api::VerifyJob)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<VerifyJob>, ApiError> {
    verify_id(&id)?;
    Ok(Json(hub.verify.get(&id).await?))
}

#[utoipa::path(
    post,
    path = "/verify/{id}/cancel",
    operation_id = "cancel_verify",
    tag = "verify",
    summary = "Cancels a verify job",
    params(("id" = String, Path, description = "Verify job id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::VerifyJob),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn cancel(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<VerifyJob>), ApiError> {
    verify_id(&id)?;
    Ok((StatusCode::ACCEPTED, Json(hub.verify.cancel(&id).await?)))
}

/// The job's events on every point it read, oldest first.
#[utoipa::path(
    get,
    path = "/verify/{id}/events",
    operation_id = "list_verify_events",
    tag = "verify",
    summary = "A verify job's events, oldest first",
    params(("id" = String, Path, description = "Verify job id")),
    responses(
        (status = 200, description = "The events", body = Vec<sendense_shared::api::JobEvent>)
    )
)]
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
            VerifyError::WrongState { .. }
            | VerifyError::NotCompleted { .. }
            | VerifyError::Pruning { .. } => ApiError::conflict(ErrorCode::WrongState, detail),
            VerifyError::Db { source, .. } => source.into(),
        }
    }
}
