//! The fake hub's `GET /api/v1/backups/{id}/files/archive`: a fixed body for `/etc`, a 404
//! naming the path for anything else.

use super::{Shared, error};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sendense_shared::errors::ErrorCode;

/// What the archive of `/etc` is (not a real tar: the console passes the bytes through).
pub const TAR: &str = "etc/hostname\0pgtest1\n";

#[derive(serde::Deserialize)]
pub(super) struct Q {
    path: Option<String>,
}

pub(super) async fn archive(
    State(_s): State<Shared>,
    Path(_id): Path<String>,
    Query(q): Query<Q>,
) -> Response {
    match q.path.as_deref() {
        Some("/etc") => ([("content-type", "application/x-tar")], TAR).into_response(),
        other => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!(
                "path: {}: no such file or directory",
                other.unwrap_or_default()
            ),
        ),
    }
}
