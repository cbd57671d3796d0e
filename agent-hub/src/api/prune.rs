//! Prune jobs, protected points, a VM's points under retention, a repository's space. The logic
//! lives in [`crate::prune`]; admin scope only (none of these routes is a node's).

use super::{ApiError, ApiJson};
use crate::hub::AppState;
use crate::prune::{PruneError, Started};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sendense_shared::api::{
    Backup, JobEvent, PruneJob, PrunePlan, PruneRequest, RepositorySpace, Retention,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::BackupId;
use sendense_shared::names::validate_name;

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DryRun {
    #[serde(default)]
    dry_run: Option<bool>,
}

/// `POST /api/v1/prune[?dry_run=true]`: a dry run answers `200` with the plan and changes
/// nothing; otherwise `202` with the job `pending`.
#[utoipa::path(
    post,
    path = "/prune",
    operation_id = "start_prune",
    tag = "prune",
    summary = "Prunes one VM's points (or answers the plan of a dry run)",
    params(DryRun),
    request_body = sendense_shared::api::PruneRequest,
    responses(
        (status = 200, description = "Dry run: the plan, nothing changed", body = sendense_shared::api::PrunePlan),
        (status = 202, description = "The prune job, `pending`", body = sendense_shared::api::PruneJob),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn start(
    State(hub): State<AppState>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<DryRun>,
    ApiJson(mut req): ApiJson<PruneRequest>,
) -> Result<Response, ApiError> {
    req.dry_run |= q.dry_run.unwrap_or(false);
    Ok(match hub.prune.start(&req).await? {
        Started::DryRun(plan) => (StatusCode::OK, Json(plan)).into_response(),
        Started::Job(job) => (StatusCode::ACCEPTED, Json(*job)).into_response(),
    })
}

#[utoipa::path(
    get,
    path = "/prune",
    operation_id = "list_prunes",
    tag = "prune",
    summary = "Every prune job",
    responses(
        (status = 200, description = "The prune jobs", body = Vec<sendense_shared::api::PruneJob>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<PruneJob>>, ApiError> {
    Ok(Json(hub.prune.list().await?))
}

fn prune_id(id: &str) -> Result<(), ApiError> {
    Ok(validate_name("prune_id", id)?)
}

#[utoipa::path(
    get,
    path = "/prune/{id}",
    operation_id = "get_prune",
    tag = "prune",
    summary = "One prune job",
    params(("id" = String, Path, description = "Prune job id")),
    responses(
        (status = 200, description = "The prune job", body = sendense_shared::api::PruneJob)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PruneJob>, ApiError> {
    prune_id(&id)?;
    Ok(Json(hub.prune.get(&id).await?))
}

#[utoipa::path(
    post,
    path = "/prune/{id}/cancel",
    operation_id = "cancel_prune",
    tag = "prune",
    summary = "Cancels a prune job",
    params(("id" = String, Path, description = "Prune job id")),
    responses(
        (status = 202, description = "Cancelling", body = sendense_shared::api::PruneJob),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn cancel(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<PruneJob>), ApiError> {
    prune_id(&id)?;
    Ok((StatusCode::ACCEPTED, Json(hub.prune.cancel(&id).await?)))
}

#[utoipa::path(
    get,
    path = "/prune/{id}/events",
    operation_id = "list_prune_events",
    tag = "prune",
    summary = "A prune job's event log, oldest first",
    params(("id" = String, Path, description = "Prune job id")),
    responses(
        (status = 200, description = "The events", body = Vec<sendense_shared::api::JobEvent>)
    )
)]
pub async fn events(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<JobEvent>>, ApiError> {
    prune_id(&id)?;
    Ok(Json(hub.prune.events(&id).await?))
}

#[utoipa::path(
    post,
    path = "/backups/{id}/protect",
    operation_id = "protect_backup",
    tag = "prune",
    summary = "Exempts a point from pruning",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "Protected", body = sendense_shared::api::Backup),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn protect(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Backup>, ApiError> {
    Ok(Json(hub.prune.protect(&BackupId(id), true).await?))
}

#[utoipa::path(
    post,
    path = "/backups/{id}/unprotect",
    operation_id = "unprotect_backup",
    tag = "prune",
    summary = "Lets retention prune a point again",
    params(("id" = String, Path, description = "Backup id")),
    responses(
        (status = 200, description = "Not protected", body = sendense_shared::api::Backup),
        (status = 409, description = "The job or VM is in a state that does not allow it (`wrong_state`, `vm_busy`, ...)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn unprotect(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Backup>, ApiError> {
    Ok(Json(hub.prune.protect(&BackupId(id), false).await?))
}

/// `GET /api/v1/vms/{name}/points[?keep_last=N&keep_daily=N...]`: the VM's points, newest
/// first, with the rule that keeps each under the retention of the query (when it names any
/// rule) or of the policy covering the VM.
#[utoipa::path(
    get,
    path = "/vms/{vm_name}/points",
    operation_id = "list_vm_points",
    tag = "prune",
    summary = "A VM's points, newest first, with the rule that keeps each",
    params(("vm_name" = String, Path, description = "VM name"), sendense_shared::api::Retention),
    responses(
        (status = 200, description = "The points", body = sendense_shared::api::PrunePlan)
    )
)]
pub async fn points(
    State(hub): State<AppState>,
    Path(vm): Path<String>,
    sendense_shared::http::ApiQuery(r): sendense_shared::http::ApiQuery<Retention>,
) -> Result<Json<PrunePlan>, ApiError> {
    validate_name("vm_name", &vm)?;
    let given = (r != Retention::default()).then_some(r);
    Ok(Json(hub.prune.plan(&vm, given.as_ref()).await?))
}

#[utoipa::path(
    get,
    path = "/repositories/{id}/space",
    operation_id = "get_repository_space",
    tag = "prune",
    summary = "A repository's space per VM and its forecast",
    params(("id" = String, Path, description = "Repository id")),
    responses(
        (status = 200, description = "The space", body = sendense_shared::api::RepositorySpace)
    )
)]
pub async fn space(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RepositorySpace>, ApiError> {
    validate_name("repository_id", &id)?;
    Ok(Json(
        crate::prune::space::repository_space(&hub.db, &id).await?,
    ))
}

impl From<PruneError> for ApiError {
    fn from(e: PruneError) -> Self {
        let detail = sendense_shared::errors::chain(&e);
        match e {
            PruneError::Invalid { detail } => ApiError::Invalid { detail },
            PruneError::NotFound { .. } => ApiError::NotFound(detail),
            PruneError::Busy { .. } => ApiError::conflict(ErrorCode::VmBusy, detail),
            PruneError::WrongState { .. } | PruneError::PointState { .. } | PruneError::Plan(_) => {
                ApiError::conflict(ErrorCode::WrongState, detail)
            }
            PruneError::Estimate { .. } => ApiError::JobFailed(detail),
            PruneError::Db { source, .. } => source.into(),
        }
    }
}
