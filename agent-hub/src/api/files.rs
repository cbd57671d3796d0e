//! File-level browsing of a backup point ([`crate::files`]): `GET /backups/{id}/files` lists
//! the disk's filesystems or one directory, `GET /backups/{id}/files/archive` streams a file or
//! a directory as tar. Admin only (not in [`super::scope::NODE_ROUTES`]): a node never reads
//! inside a point.

use super::ApiError;
use crate::files::{FilesError, GuestPath};
use crate::hub::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sendense_shared::api::{Backup, FileListing, JobStatus};
use sendense_shared::errors::ErrorCode;
use sendense_shared::http::ApiQuery;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::names::validate_name;

/// The query of both endpoints.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// Disk key of the backup's disk; may be left out when the backup has one disk.
    pub disk: Option<i64>,
    /// The filesystem (`/dev/sda1`, `/dev/vg0/root`); may be left out when the disk has one.
    pub fs: Option<String>,
    /// Absolute path inside the filesystem (UTF-8); without it (and without `path_b64`) the
    /// listing answers the disk's partitions, volumes and filesystems only.
    #[param(pattern = "^/")]
    pub path: Option<String>,
    /// The path's exact bytes, standard base64 (for a name that is not UTF-8).
    pub path_b64: Option<String>,
}

impl From<FilesError> for ApiError {
    fn from(e: FilesError) -> Self {
        match e {
            FilesError::Path(p) => ApiError::invalid(p.to_string()),
            e @ FilesError::Invalid { .. } => ApiError::invalid(e.to_string()),
            e @ FilesError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            e @ FilesError::TooMany { .. } => {
                ApiError::conflict(ErrorCode::BackupBusy, e.to_string())
            }
            e @ FilesError::ShuttingDown => {
                ApiError::conflict(ErrorCode::ShuttingDown, e.to_string())
            }
            e => ApiError::JobFailed(sendense_shared::errors::chain(&e)),
        }
    }
}

/// The point's image of the asked disk, checked.
async fn image_of(
    hub: &AppState,
    id: String,
    disk: Option<i64>,
) -> Result<(BackupId, DiskKey, std::path::PathBuf), ApiError> {
    validate_name("backup_id", &id)?;
    let id = BackupId(id);
    let b: Backup = hub.db.get_backup(&id).await?;
    if b.status != JobStatus::Completed {
        return Err(ApiError::conflict(
            ErrorCode::WrongState,
            format!(
                "backup {id} is {}; only a completed point can be browsed",
                b.status.as_str()
            ),
        ));
    }
    let keys = || {
        b.disk_results
            .iter()
            .map(|d| d.disk_key.0.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let d = match disk {
        Some(k) => b
            .disk_results
            .iter()
            .find(|d| d.disk_key.0 == k)
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "disk: backup {id} has no disk {k}; its disks: {}",
                    keys()
                ))
            })?,
        None => match b.disk_results.as_slice() {
            [one] => one,
            _ => {
                return Err(ApiError::invalid(format!(
                    "disk: backup {id} has several disks; name one: {}",
                    keys()
                )));
            }
        },
    };
    let path = std::path::PathBuf::from(&d.qcow2_path);
    if !path.is_file() {
        return Err(ApiError::conflict(
            ErrorCode::ImageMissing,
            format!(
                "disk: the image of disk {} ({}) is not on the hub",
                d.disk_key, d.qcow2_path
            ),
        ));
    }
    Ok((id, d.disk_key, path))
}

/// Without `path`: the disk's partitions, LVM volumes and filesystems. With `path`: that
/// directory's entries with their own metadata (a symlink is listed with its target, never
/// followed). The first request of a session waits for the appliance (about 15-30 s).
#[utoipa::path(
    get,
    path = "/backups/{id}/files",
    operation_id = "list_backup_files",
    tag = "backups",
    summary = "Browses a backup point's filesystems without restoring it",
    params(("id" = String, Path, description = "Backup id"), FilesQuery),
    responses(
        (status = 200, description = "The filesystems, or one directory", body = sendense_shared::api::FileListing),
        (status = 404, description = "No such backup, disk (`disk`), filesystem (`fs`) or path (`path`)", body = sendense_shared::api::ErrorBody),
        (status = 409, description = "The point is not completed (`wrong_state`), or every browsing session is taken (`backup_busy`)", body = sendense_shared::api::ErrorBody),
        (status = 422, description = "A path that is not absolute, has `..` or NUL, crosses a link, or is not a directory; names the field", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn list(
    State(hub): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> Result<Json<FileListing>, ApiError> {
    // The point and its disk first: a path is only judged for a point that can be browsed.
    let (id, disk, image) = image_of(&hub, id, q.disk).await?;
    let path = GuestPath::from_query(q.path.as_deref(), q.path_b64.as_deref())
        .map_err(FilesError::from)?;
    let l = hub
        .files
        .list(&id, disk, &image, q.fs.as_deref(), path.as_ref())
        .await?;
    Ok(Json(l))
}

/// A file or a directory of the point as a tar stream (`application/x-tar`): a directory's
/// entries relative to it, numeric owners; a file as one entry; a symlink as a link entry.
#[utoipa::path(
    get,
    path = "/backups/{id}/files/archive",
    operation_id = "get_backup_files_archive",
    tag = "backups",
    summary = "A file or directory of a backup point as tar",
    params(("id" = String, Path, description = "Backup id"), FilesQuery),
    responses(
        (status = 200, description = "The tar stream", content_type = "application/x-tar", body = Vec<u8>),
        (status = 404, description = "No such backup, disk, filesystem or path", body = sendense_shared::api::ErrorBody),
        (status = 409, description = "The point is not completed (`wrong_state`), or every browsing session is taken (`backup_busy`)", body = sendense_shared::api::ErrorBody),
        (status = 422, description = "A missing or invalid path; names the field", body = sendense_shared::api::ErrorBody)
    )
)]
pub async fn archive(
    State(hub): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> Result<Response, ApiError> {
    let (id, disk, image) = image_of(&hub, id, q.disk).await?;
    let path = GuestPath::from_query(q.path.as_deref(), q.path_b64.as_deref())
        .map_err(FilesError::from)?
        .ok_or_else(|| {
            ApiError::invalid("path: required (or path_b64): the file or directory to archive")
        })?;
    let a = hub
        .files
        .archive(&id, disk, &image, q.fs.as_deref(), &path)
        .await?;
    let stream =
        futures_util::stream::unfold(
            a.body,
            |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
        );
    let name: String = a
        .file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
