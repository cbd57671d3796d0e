//! `GET/POST /api/v1/repositories`: directories that hold QCOW2 chains, with their free space.

use super::{ApiError, ApiJson};
use crate::hub::AppState;
use axum::Json;
use super::scope::admin_only;
use crate::auth::Principal;
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use sendense_shared::api::{Repository, RepositoryRequest};
use sendense_shared::names::validate_name;
use std::path::Path;

pub async fn list(State(hub): State<AppState>) -> Result<Json<Vec<Repository>>, ApiError> {
    let rows = hub.db.list_repositories().await?;
    Ok(Json(
        rows.into_iter().map(|r| with_space(r.id, r.path)).collect(),
    ))
}

/// Registers a directory (created if missing) under a new id.
pub async fn create(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<RepositoryRequest>,
) -> Result<(StatusCode, Json<Repository>), ApiError> {
    admin_only(&who, "registering a repository")?;
    validate_name("id", &req.id)?;
    if req.path.contains('\0') {
        return Err(ApiError::BadName("path contains a NUL byte".into()));
    }
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
    tracing::info!(id = %req.id, path = %req.path, "repository registered");
    Ok((StatusCode::CREATED, Json(with_space(req.id, req.path))))
}

/// Free and total bytes now; zero when the directory is gone (the list still shows it).
fn with_space(id: String, path: String) -> Repository {
    let (free_bytes, total_bytes) = match crate::repository::space(Path::new(&path)) {
        Ok(s) => (s.free_bytes, s.total_bytes),
        Err(e) => {
            tracing::warn!(%id, %path, error = %e, "cannot read repository space");
            (0, 0)
        }
    };
    Repository {
        id,
        path,
        free_bytes,
        total_bytes,
        verify_interval_secs: None,
        last_verified_at: None,
    }
}
