//! The HTTP API (`shared/API.md`): routes, the one [`ApiError`] every handler answers with, and
//! the [`ApiJson`] extractor whose rejections name the offending field.
//!
//! - [`system`]: `/health`, ports, processes, the SSE event stream.
//! - [`repositories`], [`vms`], [`backups`], [`restores`], [`nodes`]: one module per resource.
//!
//! `/health` is open; everything under `/api/v1` passes [`crate::auth::require_bearer`].

pub mod backups;
pub mod nodes;
pub mod repositories;
pub mod restores;
pub mod system;
pub mod vms;

use crate::hub::AppState;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, OriginalUri, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use sendense_shared::api::ErrorBody;
use serde::de::DeserializeOwned;

/// Completion reports carry one checksum per written chunk: a 2 TiB disk at 4 MiB chunks is
/// about half a million ranges, some 60 MB of JSON.
const COMPLETION_BODY_LIMIT: usize = 256 << 20;

/// The whole router, state applied.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/repositories",
            get(repositories::list).post(repositories::create),
        )
        .route("/vms", get(vms::list).post(vms::register))
        .route("/vms/{vm_name}", get(vms::get_one))
        .route("/backups", get(backups::list).post(backups::start))
        .route("/backups/{id}", get(backups::get_one))
        .route("/backups/{id}/cancel", post(backups::cancel))
        .route("/backups/{id}/events", get(backups::events))
        .route("/backups/{id}/verification", get(backups::verification))
        .route("/backups/{id}/progress", post(backups::progress))
        .route(
            "/backups/{id}/complete",
            post(backups::complete).layer(DefaultBodyLimit::max(COMPLETION_BODY_LIMIT)),
        )
        .route("/restores", get(restores::list).post(restores::start))
        .route("/restores/{id}", get(restores::get_one))
        .route("/restores/{id}/cancel", post(restores::cancel))
        .route("/restores/{id}/events", get(restores::events))
        .route("/restores/{id}/progress", post(restores::progress))
        .route("/restores/{id}/complete", post(restores::complete))
        .route("/ports", get(system::ports))
        .route("/processes", get(system::processes))
        .route("/events", get(system::events))
        .route("/nodes", get(nodes::list).post(nodes::register))
        .route("/nodes/{name}", get(nodes::get_one))
        .route("/nodes/{name}/discover", post(nodes::discover))
        .route("/nodes/{name}/inventory", put(nodes::push_inventory))
        .route("/tunnel", get(nodes::tunnel))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.token.clone(),
            crate::auth::require_bearer,
        ));
    Router::new()
        .route("/health", get(system::health))
        .nest("/api/v1", v1)
        .fallback(not_found)
        .with_state(state)
}

/// The full path, also inside the nested `/api/v1` router (which sees it stripped).
async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::NotFound {
        what: "route",
        detail: format!("no route {method} {}", uri.path()),
    }
}

/// Every error answer of the API: a status and `{"error","detail"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all (syntax, empty, wrong content).
    #[error("invalid JSON: {0}")]
    BadJson(String),
    /// A name that would become a path component or export name is unsafe; names the field.
    #[error("invalid name: {0}")]
    BadName(String),
    /// JSON of the wrong shape, or a value refused by validation; `detail` names the field.
    #[error("invalid field: {detail}")]
    Invalid { detail: String },
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("{what} not found: {detail}")]
    NotFound { what: &'static str, detail: String },
    #[error("{error}: {detail}")]
    Conflict { error: &'static str, detail: String },
    #[error("not enough space: {0}")]
    InsufficientStorage(String),
    #[error("no NBD port free: {0}")]
    PortsExhausted(String),
    /// A node answered wrongly or not at all.
    #[error("node error: {0}")]
    Node(String),
    /// A step of a job failed; the cause is operational (shown, also in the job's events).
    #[error("{error}: {detail}")]
    JobFailed { error: &'static str, detail: String },
    /// A bug or an unreachable database: logged in full, answered vaguely.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>) -> Self {
        ApiError::Invalid {
            detail: detail.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadJson(_) | ApiError::BadName(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::PortsExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Node(_) => StatusCode::BAD_GATEWAY,
            ApiError::JobFailed { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (error, detail): (String, String) = match self {
            ApiError::BadJson(d) => ("invalid JSON".into(), d.clone()),
            ApiError::BadName(d) => ("invalid name".into(), d.clone()),
            ApiError::Invalid { detail } => ("invalid field".into(), detail.clone()),
            ApiError::Unauthorized(d) => ("unauthorized".into(), (*d).into()),
            ApiError::NotFound { what, detail } => (format!("{what} not found"), detail.clone()),
            ApiError::Conflict { error, detail } => ((*error).into(), detail.clone()),
            ApiError::InsufficientStorage(d) => ("insufficient storage".into(), d.clone()),
            ApiError::PortsExhausted(d) => ("no NBD port available".into(), d.clone()),
            ApiError::Node(d) => ("node error".into(), d.clone()),
            ApiError::JobFailed { error, detail } => ((*error).into(), detail.clone()),
            ApiError::Internal(_) => (
                "internal error".into(),
                "the hub logged the cause; see its log file".into(),
            ),
        };
        ErrorBody { error, detail }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error answered with 500");
        } else if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        (status, axum::Json(self.body())).into_response()
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::NotFound { what } => ApiError::NotFound {
                what: "record",
                detail: what.to_string(),
            },
            crate::db::DbError::Conflict { what } => ApiError::Conflict {
                error: "already exists",
                detail: what.to_string(),
            },
            other => ApiError::internal(format!("database: {other:#}")),
        }
    }
}

/// Names that would escape the repository (`..`, `/`, NUL) are a 400: the request is malformed,
/// not merely of an unexpected value.
impl From<sendense_shared::names::NameError> for ApiError {
    fn from(e: sendense_shared::names::NameError) -> Self {
        ApiError::BadName(e.to_string())
    }
}

/// JSON body extractor: like `axum::Json`, without insisting on a `Content-Type` header, and
/// with rejections in the API's error shape naming the field (`disks[0].size_bytes: invalid
/// type: string "x", expected u64`).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadJson(e.body_text()))?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::invalid(strip_prefix(&e.body_text())))
            }
            Err(e) => Err(ApiError::BadJson(strip_prefix(&e.body_text()))),
        }
    }
}

/// axum prefixes serde's message with a sentence about "the target type"; the path and cause
/// after it are what a caller needs.
fn strip_prefix(text: &str) -> String {
    for p in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
    ] {
        if let Some(rest) = text.strip_prefix(p) {
            return rest.to_string();
        }
    }
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HubConfig;
    use crate::hub::Hub;
    use axum::body::Body;
    use axum::http::{Request, header};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    struct T {
        app: Router,
        token: String,
        _dir: tempfile::TempDir,
    }

    async fn app() -> T {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = HubConfig::with_data_dir(dir.path());
        // A range nothing on this machine uses; no job in these tests reaches qemu-nbd.
        cfg.nbd_ports = crate::ports::PortRange { first: 1, last: 1 };
        let hub = Hub::open(cfg).await.unwrap();
        T {
            token: hub.token.as_str().to_string(),
            app: router(hub),
            _dir: dir,
        }
    }

    impl T {
        async fn call(
            &self,
            method: &str,
            uri: &str,
            body: Option<&str>,
            auth: bool,
        ) -> (u16, Value) {
            let mut req = Request::builder().method(method).uri(uri);
            if auth {
                req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
            }
            let req = req
                .body(
                    body.map(|b| Body::from(b.to_string()))
                        .unwrap_or_else(Body::empty),
                )
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }
    }

    #[tokio::test]
    async fn health_is_open_and_names_the_database() {
        let t = app().await;
        let (s, v) = t.call("GET", "/health", None, false).await;
        assert_eq!(s, 200);
        assert_eq!(v["database"], json!({"kind": "sqlite", "ok": true}));
        assert_eq!(v["pid"], std::process::id());
    }

    #[tokio::test]
    async fn api_needs_the_token() {
        let t = app().await;
        let (s, v) = t.call("GET", "/api/v1/vms", None, false).await;
        assert_eq!(s, 401);
        assert_eq!(v["error"], "unauthorized");
        let (s, _) = t.call("GET", "/api/v1/vms", None, true).await;
        assert_eq!(s, 200);
        let (s, v) = t.call("GET", "/api/v1/nope", None, true).await;
        assert_eq!(s, 404);
        assert!(
            v["detail"].as_str().unwrap().contains("/api/v1/nope"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn json_errors_name_the_field() {
        let t = app().await;
        let (s, v) = t.call("POST", "/api/v1/vms", Some("{"), true).await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = t
            .call("POST", "/api/v1/vms", Some(r#"{"vm_name":"a"}"#), true)
            .await;
        assert_eq!(s, 422, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("disks"), "{v}");
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/backups",
                Some(r#"{"vm_name":1,"repository_id":"default","backup_type":"full"}"#),
                true,
            )
            .await;
        assert_eq!(s, 422, "{v}");
        assert!(v["detail"].as_str().unwrap().starts_with("vm_name"), "{v}");
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/repositories",
                Some(r#"{"id":"r2","path":"relative/dir"}"#),
                true,
            )
            .await;
        assert_eq!(s, 422, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("absolute"), "{v}");
    }

    #[tokio::test]
    async fn vms_register_and_unknowns_are_404() {
        let t = app().await;
        let body = r#"{"vm_name":"pg","node":null,"disks":[
            {"disk_key":2000,"unit_number":0,"size_bytes":1048576,"label":"a"},
            {"disk_key":2001,"unit_number":1,"size_bytes":2097152,"label":"b"}]}"#;
        let (s, v) = t.call("POST", "/api/v1/vms", Some(body), true).await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = t.call("GET", "/api/v1/vms/pg", None, true).await;
        assert_eq!(s, 200);
        assert_eq!(v["disks"][1]["unit_number"], 1, "{v}");
        let (s, v) = t.call("GET", "/api/v1/vms/other", None, true).await;
        assert_eq!(s, 404, "{v}");
        assert_eq!(v["error"], "vm not found");
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/backups",
                Some(r#"{"vm_name":"pg","repository_id":"nope","backup_type":"full"}"#),
                true,
            )
            .await;
        assert_eq!(s, 404, "{v}");
        assert_eq!(v["error"], "repository not found");
        let (s, v) = t
            .call(
                "POST",
                "/api/v1/backups/abc/progress",
                Some(r#"{"disks":[]}"#),
                true,
            )
            .await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = t
            .call("GET", "/api/v1/backups/abc/events", None, true)
            .await;
        assert_eq!(s, 404, "{v}");
        let body = r#"{"vm_name":"pg2","node":"ghost","disks":[{"disk_key":1,"unit_number":0,"size_bytes":512,"label":"a"}]}"#;
        let (s, v) = t.call("POST", "/api/v1/vms", Some(body), true).await;
        assert_eq!(s, 422, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("ghost"), "{v}");
    }

    #[tokio::test]
    async fn internal_errors_do_not_leak() {
        let e = ApiError::internal("secret path /etc/x");
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body().detail.contains("/etc/x"));
    }
}
