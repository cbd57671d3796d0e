//! `GET/POST /api/v1/repositories`, `PUT /api/v1/repositories/{id}`: directories that hold
//! QCOW2 chains, with their free space and their scheduled verification. Registering or
//! changing one needs the admin token, and the directory must lie under the configured
//! `repository_roots` (default: the data directory), never be the data directory itself nor
//! the log directory (compared with symlinks resolved).

use super::scope::admin_only;
use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::db::RepositoryRow;
use crate::hub::AppState;
use axum::Extension;
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use sendense_shared::api::{Repository, RepositoryRequest, RepositoryUpdate};
use sendense_shared::names::validate_name;
use std::path::{Component, Path, PathBuf};

/// The shortest verify interval: the scheduler looks once a minute.
const MIN_VERIFY_INTERVAL_SECS: u64 = 60;

#[utoipa::path(
    get,
    path = "/repositories",
    operation_id = "list_repositories",
    tag = "repositories",
    summary = "Every repository with its free space",
    responses(
        (status = 200, description = "The repositories", body = Vec<sendense_shared::api::Repository>)
    )
)]
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
#[utoipa::path(
    post,
    path = "/repositories",
    operation_id = "create_repository",
    tag = "repositories",
    summary = "Registers a directory as a repository",
    request_body = sendense_shared::api::RepositoryRequest,
    responses(
        (status = 201, description = "Registered", body = sendense_shared::api::Repository),
        (status = 409, description = "A repository with that id exists (`already_exists`)", body = sendense_shared::api::ErrorBody)
    )
)]
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
    check_interval(req.verify_interval_secs)?;
    let path = Path::new(&req.path);
    if !path.is_absolute() {
        return Err(ApiError::invalid(format!(
            "path: {:?} must be an absolute directory on the hub",
            req.path
        )));
    }
    // Checked before anything is created (no directory appears in /etc for a refused
    // request), and again on the created directory (a symlink planted meanwhile).
    let places = Places::of(&hub.config);
    places.check(path)?;
    std::fs::create_dir_all(path).map_err(|e| {
        ApiError::invalid(format!("path: cannot create directory {:?}: {e}", req.path))
    })?;
    let path = places.check(path)?;
    let path = path.display().to_string();
    hub.db.insert_repository(&req.id, &path).await?;
    if req.verify_interval_secs.is_some() {
        hub.db
            .set_verify_interval(&req.id, req.verify_interval_secs)
            .await?;
    }
    tracing::info!(id = %req.id, %path, verify_interval_secs = ?req.verify_interval_secs,
        "repository registered");
    let row = hub.db.get_repository(&req.id).await?;
    Ok((StatusCode::CREATED, Json(with_space(row))))
}

/// Changes a repository's verify interval (`null`: on demand only).
#[utoipa::path(
    put,
    path = "/repositories/{id}",
    operation_id = "update_repository",
    tag = "repositories",
    summary = "Changes a repository's verify interval",
    params(("id" = String, Path, description = "Repository id")),
    request_body = sendense_shared::api::RepositoryUpdate,
    responses(
        (status = 200, description = "Changed", body = sendense_shared::api::Repository)
    )
)]
pub async fn update(
    State(hub): State<AppState>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
    ApiJson(req): ApiJson<RepositoryUpdate>,
) -> Result<Json<Repository>, ApiError> {
    admin_only(&who, "changing a repository")?;
    validate_name("id", &id)?;
    check_interval(req.verify_interval_secs)?;
    hub.db
        .set_verify_interval(&id, req.verify_interval_secs)
        .await?;
    tracing::info!(%id, verify_interval_secs = ?req.verify_interval_secs, "repository updated");
    Ok(Json(with_space(hub.db.get_repository(&id).await?)))
}

/// Where a repository may be: under a `repository_roots` entry, never the data directory
/// itself (its database and token) nor the log directory or below it. Compared canonicalized.
struct Places {
    roots: Vec<PathBuf>,
    data_dir: PathBuf,
    log_dir: PathBuf,
}

impl Places {
    fn of(config: &crate::config::HubConfig) -> Self {
        Places {
            roots: config
                .repository_roots
                .iter()
                .map(|r| canonical(r))
                .collect(),
            data_dir: canonical(&config.data_dir),
            log_dir: canonical(&config.log_dir),
        }
    }

    /// The canonical form of `path` when it is an allowed place, or the `422` naming the field
    /// and the rule.
    fn check(&self, path: &Path) -> Result<PathBuf, ApiError> {
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ApiError::invalid(format!(
                "path: {} contains `..`; give the directory itself",
                path.display()
            )));
        }
        let c = canonical(path);
        let shown = |p: &Path| p.display().to_string();
        if c == self.data_dir {
            return Err(ApiError::invalid(format!(
                "path: {} is the hub's data directory (its database and token); a repository \
                 must be a directory of its own, e.g. {}",
                shown(path),
                shown(&self.data_dir.join("repo2"))
            )));
        }
        if c.starts_with(&self.log_dir) {
            return Err(ApiError::invalid(format!(
                "path: {} is the hub's log directory {} or inside it",
                shown(path),
                shown(&self.log_dir)
            )));
        }
        if !self.roots.iter().any(|r| c.starts_with(r)) {
            let roots: Vec<String> = self.roots.iter().map(|r| shown(r)).collect();
            return Err(ApiError::invalid(format!(
                "path: {} is not under a repository root (repository_roots in the hub's \
                 config: {})",
                shown(path),
                roots.join(", ")
            )));
        }
        Ok(c)
    }
}

/// `path` with symlinks resolved: the longest existing ancestor canonicalized, the rest (not
/// created yet) appended as given.
fn canonical(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut p = path;
    loop {
        if let Ok(c) = std::fs::canonicalize(p) {
            return rest.iter().rev().fold(c, |acc, part| acc.join(part));
        }
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                p = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_places_under_a_root_and_not_the_hubs_own() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("logs")).unwrap();
        let cfg = crate::config::HubConfig::with_data_dir(&data);
        let places = Places::of(&cfg);
        let ok = places.check(&data.join("repo2/x")).unwrap();
        assert_eq!(ok, canonical(&data).join("repo2/x"));
        for (bad, words) in [
            (PathBuf::from("/etc"), "not under a repository root"),
            (
                PathBuf::from("/etc/sendense"),
                "not under a repository root",
            ),
            (data.clone(), "data directory"),
            (data.join("logs"), "log directory"),
            (data.join("logs/x"), "log directory"),
            (data.join("repo/../../etc"), "`..`"),
        ] {
            let e = places.check(&bad).unwrap_err();
            let shown = e.body().detail;
            assert_eq!(e.code(), sendense_shared::errors::ErrorCode::InvalidField);
            assert!(shown.starts_with("path: "), "{shown}");
            assert!(shown.contains(words), "{bad:?}: {shown}");
        }
        // A symlink under the root that points out of it is judged by where it points.
        std::os::unix::fs::symlink("/etc", data.join("sneaky")).unwrap();
        let e = places.check(&data.join("sneaky/x")).unwrap_err();
        assert!(
            e.body().detail.contains("not under a repository root"),
            "{e}"
        );
    }
}
