//! `/health`, `/api/v1/ports`, `/api/v1/processes`, `/api/v1/events`.

use super::ApiError;
use crate::hub::AppState;
use axum::Json;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use sendense_shared::api::{DatabaseHealth, Health, PortsView, ProcessInfo};

/// Open (no token): identity of the binary and whether the database answers.
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
pub async fn processes(
    State(hub): State<AppState>,
    Query(q): Query<ProcessQuery>,
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

#[derive(Debug, Default, serde::Deserialize)]
pub struct ProcessQuery {
    pub alive: Option<bool>,
}

/// Server-sent events: one [`sendense_shared::api::HubEvent`] per `data:` line.
pub async fn events(State(hub): State<AppState>) -> impl IntoResponse {
    hub.bus.sse(hub.shutdown.clone())
}
