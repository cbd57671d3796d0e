//! `GET/POST /api/v1/repositories`, `PUT /api/v1/repositories/{id}`: directories that hold
//! QCOW2 chains, with their free space and their scheduled verification.

use super::{ApiError, ApiJson};
use crate::db::RepositoryRow;
use crate::hub::AppState;
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use sendense_shared::api::{Repository, RepositoryRequest, RepositoryUpdate};
use sendense_shared::names::validate_name;
use std::path::Path;

/// The shortest verify interval: the scheduler looks once a minute.
const MIN_VERIFY_INTERVAL_SECS: u64 = 60;

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Repository>>, ApiError> {
    let rows = hub.db.list_repositories().await?;
    Ok(Json(rows.into_iter().map(with_space).collect()))
}

fn check_interval(secs: Option<u64>) -> Result<(), ApiError> {
    match secs {
        Some(s) if s < MIN_VERIFY_INTERVAL_SECS => Err(ApiError::invalid(format!(
            "verify_interval_secs: {s} is shorter than {MIN_VERIFY_INTERVAL_SECS} (the hub \
             looks for due verifications once a minute); null verifies on demand only"
        ))),
        _ => Ok(()),
    }
}

/// Registers a directory (created if missing) under a new id.
pub async fn create(
    State(hub): State<AppState>,
    ApiJson(req): ApiJson<RepositoryRequest>,
) -> Result<(StatusCode, Json<Repository>), ApiError> {
    validate_name("id", &req.id)?;
    if req.path.contains('\0') {
        return Err(ApiError::BadName("path contains a NUL byte".into()));
    }
    check_interval(req.verify_interval_secs)?;
    let path = Path::new(&req.path);
    if !path.is_absolute() {
        return Err(ApiError::invalid(format!(
            "path: {:?} must be an absolute directory on the hub",
            req.path
        )));
    }
    std::fs::create_dir_all(path).map_err(|e| {
        ApiError::invalid(format!("path: cannot create directory {:?}: {e}", req.path))
    })?;
    hub.db.insert_repository(&req.id, &req.path).await?;
    if req.verify_interval_secs.is_some() {
        hub.db
            .set_verify_interval(&req.id, req.verify_interval_secs)
            .await?;
    }
    tracing::info!(id = %req.id, path = %req.path, verify_interval_secs = ?req.verify_interval_secs,
        "repository registered");
    let row = hub.db.get_repository(&req.id).await?;
    Ok((StatusCode::CREATED, Json(with_space(row))))
}

/// Changes a repository's verify interval (`null`: on demand only).
pub async fn update(
    State(hub): State<AppState>,
    UrlPath(id): UrlPath<String>,
    ApiJson(req): ApiJson<RepositoryUpdate>,
) -> Result<Json<Repository>, ApiError> {
    validate_name("id", &id)?;
    check_interval(req.verify_interval_secs)?;
    hub.db
        .set_verify_interval(&id, req.verify_interval_secs)
        .await?;
    tracing::info!(%id, verify_interval_secs = ?req.verify_interval_secs, "repository updated");
    Ok(Json(with_space(hub.db.get_repository(&id).await?)))
}

/// Free and total bytes now; zero when the directory is gone (the list still shows it).
fn with_space(r: RepositoryRow) -> Repository {
    let (free_bytes, total_bytes) = match crate::repository::space(Path::new(&r.path)) {
        Ok(s) => (s.free_bytes, s.total_bytes),
        Err(e) => {
            tracing::warn!(id = %r.id, path = %r.path, error = %e, "cannot read repository space");
            (0, 0)
        }
    };
    Repository {
        id: r.id,
        path: r.path,
        free_bytes,
        total_bytes,
        verify_interval_secs: r.verify_interval_secs,
        last_verified_at: r.last_verified_at,
    }
}
