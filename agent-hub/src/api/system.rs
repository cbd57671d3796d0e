//! `/health`, `/api/v1/ports`, `/api/v1/processes`, `/api/v1/events`.

use super::ApiError;
use crate::hub::AppState;
use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use sendense_shared::api::{DatabaseHealth, Health, PortsView, ProcessInfo};

/// Open (no token): identity of the binary and whether the database answers.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "hub_health",
    tag = "system",
    summary = "Identity of the binary and whether its database answers (open)",
    security(),
    responses(
        (status = 200, description = "`healthy` or `degraded`", body = sendense_shared::api::Health)
    )
)]
pub async fn health(State(hub): State<AppState>) -> Json<Health> {
    let ok = hub.db.ping().await;
    let database = DatabaseHealth {
        kind: hub.db.kind().into(),
        ok,
    };
    Json(sendense_shared::identity::health(
        if ok { "healthy" } else { "degraded" },
        hub.started_at,
        Some(database),
    ))
}

#[utoipa::path(
    get,
    path = "/ports",
    operation_id = "list_ports",
    tag = "system",
    summary = "The NBD port range, held and squatted ports",
    responses(
        (status = 200, description = "The ports", body = sendense_shared::api::PortsView)
    )
)]
pub async fn ports(State(hub): State<AppState>) -> Result<Json<PortsView>, ApiError> {
    Ok(Json(hub.ports.view().await?))
}

impl From<crate::ports::PortError> for ApiError {
    fn from(e: crate::ports::PortError) -> Self {
        match e {
            e @ crate::ports::PortError::Exhausted { .. } => {
                ApiError::PortsExhausted(e.to_string())
            }
            crate::ports::PortError::Db(e) => e.into(),
        }
    }
}

/// Every qemu-nbd the database knows, with `alive` checked now against `/proc` (the recorded
/// flag says what the hub believes; a process that died behind its back shows `false`).
/// `?alive=true` keeps only the running ones (the list keeps every process ever started).
#[utoipa::path(
    get,
    path = "/processes",
    operation_id = "list_processes",
    tag = "system",
    summary = "Every qemu-nbd the hub started, alive checked now",
    params(ProcessQuery),
    responses(
        (status = 200, description = "The processes", body = Vec<sendense_shared::api::ProcessInfo>)
    )
)]
pub async fn processes(
    State(hub): State<AppState>,
    sendense_shared::http::ApiQuery(q): sendense_shared::http::ApiQuery<ProcessQuery>,
) -> Result<Json<Vec<ProcessInfo>>, ApiError> {
    let mut list = hub.db.list_processes().await?;
    for p in &mut list {
        if p.alive {
            p.alive = crate::qemu_nbd::is_our_qemu_nbd(p.pid, p.port.0, &p.export_name);
        }
    }
    if let Some(alive) = q.alive {
        list.retain(|p| p.alive == alive);
    }
    Ok(Json(list))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProcessQuery {
    pub alive: Option<bool>,
}

/// Prometheus text exposition of the hub's metrics ([`crate::metrics`]); admin scope.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "hub_metrics",
    tag = "system",
    summary = "Prometheus text exposition",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")
    )
)]
pub async fn metrics(State(hub): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let state = crate::metrics::ScrapeState {
        db: &hub.db,
        ports: &hub.ports,
    };
    let text = hub
        .metrics
        .render(&state)
        .await
        .map_err(|e| ApiError::Internal(sendense_shared::errors::chain(&e)))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        text,
    ))
}

/// Server-sent events: one [`sendense_shared::api::HubEvent`] per `data:` line.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "hub_events",
    tag = "system",
    summary = "Server-sent events: one HubEvent as JSON per `data:` line",
    responses(
        (status = 200, description = "`text/event-stream`; each `data:` is a HubEvent", body = sendense_shared::api::HubEvent, content_type = "text/event-stream")
    )
)]
pub async fn events(State(hub): State<AppState>) -> impl IntoResponse {
    hub.bus.sse(hub.shutdown.clone())
}
