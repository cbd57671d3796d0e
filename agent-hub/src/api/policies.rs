//! Backup policies: CRUD, run-now, runs. The rules and the endpoint list live in
//! [`crate::policies`]; these handlers translate. Admin scope only (not in
//! [`super::scope::NODE_ROUTES`]).

use super::{ApiError, ApiJson};
use crate::hub::AppState;
use crate::policies::PolicyError;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sendense_shared::api::{Policy, PolicyRequest, PolicyRun};
use sendense_shared::errors::ErrorCode;
use sendense_shared::names::validate_name;

/// Runs answered when `?limit=` is absent, and the most answered.
const RUNS_DEFAULT: u32 = 50;
const RUNS_MAX: u32 = 1000;

#[utoipa::path(
    get,
    path = "/policies",
    operation_id = "list_policies",
    tag = "policies",
    summary = "Every backup policy",
    responses(
        (status = 200, description = "The policies", body = Vec<sendense_shared::api::Policy>)
    )
)]
pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Policy>>, ApiError> {
    Ok(Json(hub.policies.list().await?))
}

#[utoipa::path(
    post,
    path = "/policies",
    operation_id = "create_policy",
    tag = "policies",
    summary = "Creates a backup policy",
    request_body = sendense_shared::api::PolicyRequest,
    responses(
        (status = 201, description = "Created", body = sendense_shared::api::Policy),
        (status = 409, description = "The name is taken or a VM is claimed by another policy (`already_exists`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn create(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<PolicyRequest>,
) -> Result<(StatusCode, Json<Policy>), ApiError> {
    Ok((StatusCode::CREATED, Json(hub.policies.create(&req).await?)))
}

#[utoipa::path(
    get,
    path = "/policies/{id}",
    operation_id = "get_policy",
    tag = "policies",
    summary = "One policy",
    params(("id" = String, Path, description = "Policy id")),
    responses(
        (status = 200, description = "The policy", body = sendense_shared::api::Policy)
    )
)]
pub async fn get_one(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    validate_name("policy_id", &id)?;
    Ok(Json(hub.policies.get(&id).await?))
}

#[utoipa::path(
    put,
    path = "/policies/{id}",
    operation_id = "update_policy",
    tag = "policies",
    summary = "Replaces a policy",
    params(("id" = String, Path, description = "Policy id")),
    request_body = sendense_shared::api::PolicyRequest,
    responses(
        (status = 200, description = "Replaced", body = sendense_shared::api::Policy),
        (status = 409, description = "The name is taken or a VM is claimed by another policy (`already_exists`)", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn update(
    State(hub): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PolicyRequest>,
) -> Result<Json<Policy>, ApiError> {
    validate_name("policy_id", &id)?;
    Ok(Json(hub.policies.update(&id, &req).await?))
}

#[utoipa::path(
    delete,
    path = "/policies/{id}",
    operation_id = "delete_policy",
    tag = "policies",
    summary = "Deletes a policy",
    params(("id" = String, Path, description = "Policy id")),
    responses(
        (status = 204, description = "Deleted")
    )
)]
pub async fn delete(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_name("policy_id", &id)?;
    hub.policies.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `202`: the runs are queued (or skipped); follow them with `GET .../runs` or the event
/// stream (`policy_run`).
#[utoipa::path(
    post,
    path = "/policies/{id}/run-now",
    operation_id = "run_policy_now",
    tag = "policies",
    summary = "Queues a run of every VM of the policy now",
    params(("id" = String, Path, description = "Policy id")),
    responses(
        (status = 202, description = "The runs, queued or skipped", body = Vec<sendense_shared::api::PolicyRun>)
    )
)]
pub async fn run_now(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Vec<PolicyRun>>), ApiError> {
    validate_name("policy_id", &id)?;
    Ok((StatusCode::ACCEPTED, Json(hub.policies.run_now(&id).await?)))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// 1 to 1000; 50 when absent.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
}

#[utoipa::path(
    get,
    path = "/policies/{id}/runs",
    operation_id = "list_policy_runs",
    tag = "policies",
    summary = "A policy's runs, newest first",
    params(("id" = String, Path, description = "Policy id"), RunsQuery),
    responses(
        (status = 200, description = "The runs", body = Vec<sendense_shared::api::PolicyRun>)
    )
)]
pub async fn runs(
    State(hub): State<AppState>,
    Path(id): Path<String>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<RunsQuery>,
) -> Result<Json<Vec<PolicyRun>>, ApiError> {
    validate_name("policy_id", &id)?;
    let limit = match q.limit.as_deref() {
        None => RUNS_DEFAULT,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=RUNS_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit: {s:?} is not a number from 1 to {RUNS_MAX}"
                )));
            }
        },
    };
    Ok(Json(hub.policies.runs(&id, limit).await?))
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        let detail = e.to_string();
        match e {
            PolicyError::Invalid(_) => ApiError::invalid(detail),
            PolicyError::NotFound { .. } => ApiError::NotFound(detail),
            PolicyError::NameTaken { .. } | PolicyError::VmClaimed { .. } => {
                ApiError::conflict(ErrorCode::AlreadyExists, detail)
            }
            PolicyError::Db(e) => ApiError::from(e),
        }
    }
}
