//! Instant recoveries: start (admin), list, one, cancel, events, and the node's progress /
//! completion reports (the node the recovery runs on). The job logic lives in
//! [`crate::recoveries`].

use super::scope::{admin_only, own_recovery};
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::hub::AppState;
use crate::node_client::NodeCallError;
use crate::recoveries::RecoveryError;
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{
    JobEvent, NodeRecoveryState, Recovery, RecoveryCompletion, RecoveryRequest,
};
use sendense_shared::errors::{ErrorCode, chain};
use sendense_shared::names::validate_name;

/// Exports every chosen disk of the point and has the node start the VM before answering
/// `202` with the recovery `running`; follow it with `GET /api/v1/recoveries/{id}`.
#[utoipa::path(
    post,
    path = "/recoveries",
    operation_id = "start_recovery",
    tag = "recoveries",
    summary = "Boots a backup point at once as a new VM on a node (instant recovery)",
    request_body = sendense_shared::api::RecoveryRequest,
    responses(
        (status = 202, description = "The recovery, `running`", body = sendense_shared::api::Recovery),
        (status = 404, description = "No such backup or node", body = sendense_shared::api::ErrorBody),
        (status = 409, description = "The point is not readable, its image is missing, a prune changes its chain, or the node runs a recovered VM of that name", body = sendense_shared::api::ErrorBody),
        (status = 422, description = "A field is invalid (`detail` names it)", body = sendense_shared::api::ErrorBody),
        (status = 502, description = "The node did not start the VM", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn start(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<RecoveryRequest>,
) -> Result<(StatusCode, Json<Recovery>), ApiError> {
    admin_only(&who, "starting an instant recovery")?;
    validate_name("backup_id", &req.backup_id.0)?;
    let r = hub.recoveries.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

#[utoipa::path(
    get,
    path = "/recoveries",
    operation_id = "list_recoveries",
    tag = "recoveries",
    summary = "Every instant recovery, newest first",
    responses(
        (status = 200, description = "The recoveries", body = Vec<sendense_shared::api::Recovery>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Recovery>>, ApiError> {
    Ok(Json(hub.recoveries.list().await?))
}

fn recovery_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("recovery_id", id)?)
}

#[utoipa::path(
    get,
    path = "/recoveries/{id}",
    operation_id = "get_recovery",
    tag = "recoveries",
    summary = "One instant recovery",
    params(("id" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "The recovery", body = sendense_shared::api::Recovery)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Recovery>, ApiError> {
    recovery_id(&id)?;
    own_recovery(&hub, &who, &id).await?;
    Ok(Json(hub.recoveries.get(&id).await?))
}

/// Every disk's stream takes a new bound (`speed_bps`; 0 lifts it) within a second: e.g. a
/// recovery started slow so the boot wins over the stream, lifted once the guest is up.
#[utoipa::path(
    post,
    path = "/recoveries/{id}/speed",
    operation_id = "recovery_speed",
    tag = "recoveries",
    summary = "Changes the bound of an instant recovery's streams",
    params(("id" = String, Path, description = "Recovery id")),
    request_body = sendense_shared::api::RecoverySpeed,
    responses(
        (status = 200, description = "The recovery", body = sendense_shared::api::Recovery),
        (status = 409, description = "The recovery does not run (`wrong_state`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn speed(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<sendense_shared::api::RecoverySpeed>,
) -> Result<Json<Recovery>, ApiError> {
    admin_only(&who, "changing an instant recovery's speed")?;
    recovery_id(&id)?;
    Ok(Json(hub.recoveries.set_speed(&id, req).await?))
}

/// The node stops the VM and removes its overlays (what the guest wrote is lost), then the
/// hub stops the exports.
#[utoipa::path(
    post,
    path = "/recoveries/{id}/cancel",
    operation_id = "cancel_recovery",
    tag = "recoveries",
    summary = "Cancels an instant recovery",
    params(("id" = String, Path, description = "Recovery id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::Recovery),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn cancel(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Recovery>), ApiError> {
    admin_only(&who, "cancelling an instant recovery")?;
    recovery_id(&id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(hub.recoveries.cancel(&id).await?),
    ))
}

#[utoipa::path(
    get,
    path = "/recoveries/{id}/events",
    operation_id = "list_recovery_events",
    tag = "recoveries",
    summary = "An instant recovery's events, oldest first",
    params(("id" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "The events", body = Vec<sendense_shared::api::JobEvent>)
    )
)]
pub async fn events(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<JobEvent>>, ApiError> {
    recovery_id(&id)?;
    own_recovery(&hub, &who, &id).await?;
    Ok(Json(hub.recoveries.events(&id).await?))
}

/// Node → hub, about once a second.
#[utoipa::path(
    post,
    path = "/recoveries/{id}/progress",
    operation_id = "report_recovery_progress",
    tag = "recoveries",
    summary = "The node reports an instant recovery's state",
    params(("id" = String, Path, description = "Recovery id")),
    request_body = sendense_shared::api::NodeRecoveryState,
    responses(
        (status = 200, description = "The recovery", body = sendense_shared::api::Recovery),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody),
        (status = 422, description = "A field is invalid (`detail` names it)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn progress(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(st): ApiJson<NodeRecoveryState>,
) -> Result<Json<Recovery>, ApiError> {
    recovery_id(&id)?;
    own_recovery(&hub, &who, &id).await?;
    Ok(Json(hub.recoveries.progress(&id, st).await?))
}

/// Node → hub, once, at the recovery's end (repeated reports of the same end get the same
/// answer).
#[utoipa::path(
    post,
    path = "/recoveries/{id}/complete",
    operation_id = "complete_recovery",
    tag = "recoveries",
    summary = "The node reports an instant recovery's end",
    params(("id" = String, Path, description = "Recovery id")),
    request_body = sendense_shared::api::RecoveryCompletion,
    responses(
        (status = 200, description = "The recovery", body = sendense_shared::api::Recovery),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody),
        (status = 422, description = "A field is invalid, or `completed` while a disk is not home (`detail` names it)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn complete(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(c): ApiJson<RecoveryCompletion>,
) -> Result<Json<Recovery>, ApiError> {
    recovery_id(&id)?;
    own_recovery(&hub, &who, &id).await?;
    Ok(Json(hub.recoveries.complete(&id, c).await?))
}

impl From<RecoveryError> for ApiError {
    fn from(e: RecoveryError) -> Self {
        let detail = e.to_string();
        match e {
            RecoveryError::Invalid { detail } => ApiError::Invalid { detail },
            RecoveryError::BackupNotFound { .. }
            | RecoveryError::NodeNotFound { .. }
            | RecoveryError::NotFound { .. } => ApiError::NotFound(detail),
            RecoveryError::NotRecoverable { .. } => {
                ApiError::conflict(ErrorCode::NotRestorable, detail)
            }
            RecoveryError::VmNameTaken { .. } => {
                ApiError::conflict(ErrorCode::AlreadyExists, detail)
            }
            RecoveryError::Pruning { .. } => ApiError::conflict(ErrorCode::BackupBusy, detail),
            RecoveryError::ImageMissing { .. } => {
                ApiError::conflict(ErrorCode::ImageMissing, detail)
            }
            RecoveryError::WrongState { .. } => ApiError::conflict(ErrorCode::WrongState, detail),
            // Exhausted is 503 ports_exhausted; a database failure while allocating is the
            // database's, never "no port free".
            RecoveryError::Ports { source, .. } => (*source).into(),
            RecoveryError::Db { source, .. } => ApiError::Database(*source),
            e @ RecoveryError::Export { .. } => ApiError::JobFailed(chain(&e)),
            RecoveryError::NodeSpeed { ref source, .. } => match source.as_ref() {
                NodeCallError::Refused {
                    status: 409 | 404, ..
                } => ApiError::conflict(ErrorCode::WrongState, chain(&e)),
                _ => ApiError::Node(chain(&e)),
            },
            RecoveryError::NodeRefused { ref source, .. } => match source.as_ref() {
                // The node's own refusal of the request (a name it runs already, a kernel it
                // does not have): its code and status, its words.
                NodeCallError::Refused {
                    status: 409 | 422,
                    code: Some(code),
                    ..
                } => ApiError::conflict(*code, chain(&e)),
                _ => ApiError::Node(chain(&e)),
            },
            RecoveryError::Internal { detail } => ApiError::internal(detail),
        }
    }
}
