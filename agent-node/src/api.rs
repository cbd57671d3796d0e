//! The node's HTTP API (see `shared/API.md`, node part). Everything under `/api/v1/` needs
//! `Authorization: Bearer <token>` except `GET /api/v1/health`. Errors are
//! `{"error": "<short cause>", "detail": "<what to do / which field>"}`.
//!
//! `POST /api/v1/backup/start` answers:
//! - `202` with the job state once the request is valid (the snapshot and copy run after it);
//!   the same `backup_id` again while it runs answers `202` with the same job;
//! - `400 invalid field`: bad JSON, bad targets string, a disk of the VM without target, or a
//!   disk key the VM does not have (detail names the keys);
//! - `404 vm not found`;
//! - `409 vm busy` (the VM has a running job), `409 backup id used` (a finished job has it),
//!   `409 bitmap_missing` ([`ErrorCode::BitmapMissing`]: an incremental without a valid
//!   changed-block map: do a full);
//! - `502 hypervisor unavailable` (QMP not answering).
//!
//! `POST /api/v1/vms/{vm}/change-tracking` turns on the hypervisor's change tracking (vSphere
//! CBT; QEMU always tracks): `200 {"vm_name","change_tracking":true}`, `404 vm not found`,
//! `502 hypervisor unavailable` (cannot reach or log in) or `502 hypervisor error` (the
//! hypervisor refused; the detail has its cause).

use crate::jobs::{Jobs, StartError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    ErrorBody, Inventory, InventoryVm, NodeBackupStart, NodeRestoreStart, NodeRestoreState,
    TunnelState, TunnelStateKind, VmDisk,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::BackupId;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the handlers share.
pub struct NodeState {
    pub name: String,
    pub token: String,
    pub started_at: DateTime<Utc>,
    pub jobs: Arc<Jobs>,
    /// The SSH tunnel to the hub, when one is configured.
    pub tunnel: Option<Arc<crate::tunnel::Tunnel>>,
    /// Restores into new images on this host.
    pub restores: Arc<crate::restore::Restores>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.error.to_string(),
                detail: self.detail,
            }),
        )
            .into_response()
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        let detail = e.to_string();
        match e {
            StartError::UnknownVm { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "vm not found", detail)
            }
            StartError::EmptyId
            | StartError::Targets(_)
            | StartError::DuplicateTarget { .. }
            | StartError::BadTarget { .. }
            | StartError::MissingDisks { .. }
            | StartError::UnknownDisks { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid field", detail)
            }
            StartError::VmBusy { .. } => ApiError::new(StatusCode::CONFLICT, "vm busy", detail),
            StartError::DuplicateId { .. } => {
                ApiError::new(StatusCode::CONFLICT, "backup id used", detail)
            }
            // The code comes from the typed variant; the hub matches it as a value.
            StartError::BitmapMissing(_) => ApiError {
                status: StatusCode::CONFLICT,
                error: ErrorCode::BitmapMissing.as_str(),
                detail: format!("{detail}; run a full backup"),
            },
            StartError::Source(e) => {
                tracing::warn!(error = %e, "hypervisor error on backup start");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "hypervisor unavailable",
                    e.to_string(),
                )
            }
            StartError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down", detail)
            }
        }
    }
}

/// The router with every route.
pub fn router(state: Arc<NodeState>) -> Router {
    let protected = Router::new()
        .route("/api/v1/inventory", get(inventory))
        .route("/api/v1/backup/start", post(backup_start))
        .route("/api/v1/backups", get(backup_list))
        .route("/api/v1/backup/{id}", get(backup_get))
        .route("/api/v1/backup/{id}/cancel", post(backup_cancel))
        .route("/api/v1/tunnel", get(tunnel))
        .route("/api/v1/vms/{vm}/change-tracking", post(change_tracking))
        .route("/api/v1/restore/start", post(restore_start))
        .route("/api/v1/restore/{id}", get(restore_get))
        .route("/api/v1/restore/{id}/cancel", post(restore_cancel))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/api/v1/health", get(health))
        .merge(protected)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found", "no such route") })
        .with_state(state)
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<NodeState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn auth(State(state): State<Arc<NodeState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token does not match the node's --token-file",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token> (the token of --token-file)",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /api/v1/restore/start`: `202` with the restore's state; `400 invalid field` (id, path,
/// source, size; the detail names it); `409 restore id used`; `503 shutting down`.
async fn restore_start(
    State(state): State<Arc<NodeState>>,
    body: Result<Json<NodeRestoreStart>, JsonRejection>,
) -> Result<(StatusCode, Json<NodeRestoreState>), ApiError> {
    use crate::restore::RestoreError;
    let Json(req) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid field", e.body_text()))?;
    match state.restores.start(req) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ RestoreError::Duplicate(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "restore id used",
            e.to_string(),
        )),
        Err(e @ RestoreError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
            e.to_string(),
        )),
        Err(
            e @ (RestoreError::Id(_)
            | RestoreError::Path { .. }
            | RestoreError::Source(_)
            | RestoreError::SourceExport { .. }
            | RestoreError::Size),
        ) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid field",
            e.to_string(),
        )),
    }
}

async fn restore_get(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Json<NodeRestoreState>, ApiError> {
    state
        .restores
        .get(&id)
        .map(|j| Json(j.view()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not found",
                format!("no restore {id}"),
            )
        })
}

/// `POST /api/v1/restore/{id}/cancel`: `202` with the restore's state (it stops its qemu-nbd,
/// deletes the partial image and ends `cancelled`); `404 not_found`; `409 wrong_state` when it
/// has ended already.
async fn restore_cancel(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeRestoreState>), ApiError> {
    use crate::restore::CancelError;
    match state.restores.cancel(&id) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(job.view()))),
        Err(e @ CancelError::NotFound { .. }) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound.as_str(),
            e.to_string(),
        )),
        Err(e @ CancelError::Ended { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::WrongState.as_str(),
            e.to_string(),
        )),
    }
}

async fn health(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    Json(sendense_shared::identity::health(
        "healthy",
        state.started_at,
        None,
    ))
}

async fn inventory(State(state): State<Arc<NodeState>>) -> Result<Json<Inventory>, ApiError> {
    let vms = state.jobs.driver().list_vms().await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "hypervisor unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(Inventory {
        vms: vms.into_iter().map(inventory_vm).collect(),
    }))
}

/// A driver VM as the API shows it.
pub fn inventory_vm(vm: crate::source::SourceVm) -> InventoryVm {
    InventoryVm {
        vm_name: vm.vm_name,
        vm_id: vm.vm_id,
        disks: vm
            .disks
            .into_iter()
            .map(|d| VmDisk {
                disk_key: d.disk_key,
                unit_number: d.unit_number,
                size_bytes: d.size_bytes,
                label: d.label,
                controller: d.controller,
                backing_file: d.backing_file,
                thin_provisioned: d.thin_provisioned,
            })
            .collect(),
        driver: Some(vm.driver.to_string()),
        change_tracking: vm.change_tracking,
    }
}

async fn change_tracking(
    State(state): State<Arc<NodeState>>,
    Path(vm): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::source::SourceError;
    let driver = state.jobs.driver();
    // The VM first: a driver that always tracks answers Ok for any name.
    let enabled = match driver.vm(&vm).await {
        Ok(_) => driver.enable_change_tracking(&vm).await,
        Err(e) => Err(e),
    };
    match enabled {
        Ok(()) => Ok(Json(
            serde_json::json!({"vm_name": vm, "change_tracking": true}),
        )),
        Err(e @ SourceError::UnknownVm { .. }) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "vm not found",
            e.to_string(),
        )),
        Err(e @ (SourceError::Endpoint { .. } | SourceError::Qmp { .. })) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "hypervisor unavailable",
            e.to_string(),
        )),
        Err(e) => {
            tracing::warn!(vm = %vm, error = %e, "enabling change tracking failed");
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "hypervisor error",
                e.to_string(),
            ))
        }
    }
}

async fn backup_start(
    State(state): State<Arc<NodeState>>,
    body: Result<Json<NodeBackupStart>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid field", e.body_text()))?;
    let (job, _created) = state.jobs.start(req).await?;
    Ok((StatusCode::ACCEPTED, Json(job.view())).into_response())
}

async fn backup_list(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    Json(
        state
            .jobs
            .list()
            .iter()
            .map(|j| j.view())
            .collect::<Vec<_>>(),
    )
}

async fn backup_get(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state.jobs.get(&BackupId(id.clone())).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "backup not found",
            format!("no job {id} on this node"),
        )
    })?;
    Ok(Json(job.view()).into_response())
}

async fn backup_cancel(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state.jobs.cancel(&BackupId(id.clone())).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "backup not found",
            format!("no job {id} on this node"),
        )
    })?;
    Ok((StatusCode::ACCEPTED, Json(job.view())).into_response())
}

async fn tunnel(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    if let Some(t) = &state.tunnel {
        return Json(t.state());
    }
    Json(TunnelState {
        state: TunnelStateKind::Down,
        since: state.started_at,
        restarts: 0,
        last_error: None,
        forwards: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::CopyOptions;
    use crate::qmp::QmpLog;
    use crate::source::qemu::QemuDriver;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> Router {
        let driver = Arc::new(QemuDriver::new(
            Vec::new(),
            std::env::temp_dir(),
            Arc::new(QmpLog::new(None)),
        ));
        let jobs = Jobs::new(
            driver,
            None,
            CopyOptions::default(),
            CancellationToken::new(),
        );
        router(Arc::new(NodeState {
            name: "n".into(),
            token: "tok".into(),
            started_at: Utc::now(),
            tunnel: None,
            restores: crate::restore::Restores::new(jobs.context().clone(), std::env::temp_dir()),
            jobs,
        }))
    }

    async fn call(req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    fn get(path: &str, token: Option<&str>) -> Request<Body> {
        let mut b = Request::get(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn health_is_open_and_the_rest_needs_the_token() {
        let (s, body) = call(get("/api/v1/health", None)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["pid"], std::process::id());
        let (s, body) = call(get("/api/v1/inventory", None)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "unauthorized");
        let (s, _) = call(get("/api/v1/tunnel", Some("nope"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, body) = call(get("/api/v1/tunnel", Some("tok"))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["state"], "down");
        let (s, body) = call(get("/api/v1/inventory", Some("tok"))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["vms"], serde_json::json!([]));
        let (s, body) = call(get("/api/v1/backup/zz", Some("tok"))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "backup not found");
    }

    #[tokio::test]
    async fn bad_start_bodies_are_400_and_unknown_vm_is_404() {
        let post = |body: &str| {
            Request::post("/api/v1/backup/start")
                .header("authorization", "Bearer tok")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        let (s, body) = call(post("{not json")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid field");
        let (s, body) = call(post(
            r#"{"backup_id":"b","vm_name":"vm","backup_type":"weekly","nbd_targets":"x"}"#,
        ))
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            body["detail"].as_str().unwrap().contains("backup_type"),
            "{body}"
        );
        let (s, body) = call(post(
            r#"{"backup_id":"b","vm_name":"vm","backup_type":"full","nbd_targets":"2000:nbd://127.0.0.1:1/e"}"#,
        ))
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "vm not found");
    }

    #[tokio::test]
    async fn change_tracking_of_an_unknown_vm_is_404() {
        let (s, body) = call(
            Request::post("/api/v1/vms/nope/change-tracking")
                .header("authorization", "Bearer tok")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"], "vm not found");
        assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");
    }
}
