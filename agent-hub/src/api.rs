//! The HTTP API (`shared/API.md`): routes and the one [`ApiError`] every handler answers with
//! (each maps to an [`ErrorCode`], which decides the status). The [`ApiJson`] extractor and the
//! bearer middleware are `sendense_shared::http`'s, shared with the node.
//!
//! - [`system`]: `/health`, ports, processes, the SSE event stream.
//! - [`repositories`], [`vms`], [`backups`], [`restores`], [`recoveries`], [`verify`],
//!   [`nodes`], [`policies`]: one module per resource; [`prune`]: prune jobs, protected points, a VM's points, a
//!   repository's space.
//!
//! - [`scope`]: who may call what: the admin token everything, a node's credential only its
//!   own registration, inventory, VMs, jobs and restores (`403 forbidden` naming the scope).
//!
//! `/health` and `/api/v1/proof` (the hub proves it holds a node's credential before the node
//! sends it, `sendense_shared::proof`) are open; everything under `/api/v1` passes [`scope::authenticate`] (the admin
//! token or a node credential of [`crate::auth`]).

pub mod backups;
pub mod files;
pub mod nodes;
pub mod openapi;
pub mod policies;
pub mod prune;
pub mod recoveries;
pub mod repositories;
pub mod restores;
pub mod scope;
pub mod system;
pub mod verify;
pub mod vms;

use crate::hub::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, OriginalUri};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sendense_shared::api::ErrorBody;
use sendense_shared::errors::{ErrorCode, chain};
/// The JSON body extractor (400 `invalid_json` / 422 `invalid_field` naming the field), the
/// node's too.
pub use sendense_shared::http::ApiJson;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// Completion reports carry one checksum per written chunk: a 2 TiB disk at 4 MiB chunks is
/// about half a million ranges, some 60 MB of JSON.
const COMPLETION_BODY_LIMIT: usize = 256 << 20;

/// The whole router, state applied.
pub fn router(state: AppState) -> Router {
    let v1 = v1().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        scope::authenticate,
    ));
    let (router, _) = open().nest("/api/v1", v1).split_for_parts();
    router.with_state(state)
}

/// The OpenAPI document of the API ([`openapi`]), built from the same routes as [`router`].
pub fn openapi_document() -> serde_json::Value {
    openapi::finish(open().nest("/api/v1", v1()).into_openapi())
}

/// Everything under `/api/v1` (behind [`scope::authenticate`]), each route with its OpenAPI
/// description from the same `routes!` list: a route cannot be served undocumented, nor
/// documented unserved. Each `routes!` groups the methods of one path.
fn v1() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(repositories::list, repositories::create))
        .routes(routes!(repositories::update))
        .routes(routes!(prune::space))
        .routes(routes!(prune::list, prune::start))
        .routes(routes!(prune::get_one))
        .routes(routes!(prune::cancel))
        .routes(routes!(prune::events))
        .routes(routes!(prune::points))
        .routes(routes!(prune::protect))
        .routes(routes!(prune::unprotect))
        .routes(routes!(verify::list, verify::start))
        .routes(routes!(verify::get_one))
        .routes(routes!(verify::cancel))
        .routes(routes!(verify::events))
        .routes(routes!(vms::list, vms::register))
        .routes(routes!(vms::get_one))
        .routes(routes!(backups::list, backups::start))
        .routes(routes!(backups::get_one))
        .routes(routes!(backups::cancel))
        .routes(routes!(backups::events))
        .routes(routes!(backups::verification))
        .routes(routes!(files::list))
        .routes(routes!(files::archive))
        .routes(routes!(backups::progress))
        .routes(routes!(backups::complete).layer(DefaultBodyLimit::max(COMPLETION_BODY_LIMIT)))
        .routes(routes!(restores::list, restores::start))
        .routes(routes!(restores::get_one))
        .routes(routes!(restores::cancel))
        .routes(routes!(restores::events))
        .routes(routes!(restores::progress))
        .routes(routes!(restores::complete))
        .routes(routes!(recoveries::list, recoveries::start))
        .routes(routes!(recoveries::get_one))
        .routes(routes!(recoveries::cancel))
        .routes(routes!(recoveries::speed))
        .routes(routes!(recoveries::events))
        .routes(routes!(recoveries::progress))
        .routes(routes!(recoveries::complete))
        .routes(routes!(system::ports))
        .routes(routes!(system::processes))
        .routes(routes!(system::events))
        .routes(routes!(nodes::list, nodes::register))
        .routes(routes!(nodes::get_one))
        .routes(routes!(nodes::discover))
        .routes(routes!(nodes::push_inventory))
        .routes(routes!(nodes::tunnel))
        .routes(routes!(system::metrics))
        .routes(routes!(policies::list, policies::create))
        .routes(routes!(
            policies::get_one,
            policies::update,
            policies::delete
        ))
        .routes(routes!(policies::run_now))
        .routes(routes!(policies::runs))
        .routes(routes!(openapi::serve))
        .fallback(not_found)
}

/// The open routes.
fn open() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(system::health))
        // Open (before the bearer layer): a node asks it before it sends its credential.
        .routes(routes!(nodes::proof))
        .fallback(not_found)
}

/// The full path, also inside the nested `/api/v1` router (which sees it stripped).
async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::NotFound(format!("no route {method} {}", uri.path()))
}

/// Every error answer of the API: a status and `{"error": <ErrorCode>, "detail"}`; the code
/// decides the status ([`sendense_shared::http::status_of`]), the same table as the node's.
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
    /// The route or the object does not exist; `detail` names it.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with the state: `code` says how (`already_exists`, `vm_busy`,
    /// `wrong_state`, `node_not_registered`, ...).
    #[error("{code}: {detail}")]
    Conflict { code: ErrorCode, detail: String },
    /// The credential's scope does not cover the request; `scope` is `admin` or
    /// `node:<name>`.
    #[error("forbidden (scope {scope}): {detail}")]
    Forbidden { scope: String, detail: String },
    #[error("not enough space: {0}")]
    InsufficientStorage(String),
    #[error("no NBD port free: {0}")]
    PortsExhausted(String),
    /// A node answered wrongly or not at all.
    #[error("node error: {0}")]
    Node(String),
    /// A step of a job failed; the cause is operational (shown, also in the job's events).
    #[error("job failed: {0}")]
    JobFailed(String),
    /// The database failed (down, locked, pool closed); the answer names its own cause.
    #[error("database")]
    Database(#[source] crate::db::DbError),
    /// A bug: logged in full, answered vaguely.
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

    pub fn conflict(code: ErrorCode, detail: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            detail: detail.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadJson(_) => ErrorCode::InvalidJson,
            ApiError::BadName(_) => ErrorCode::InvalidName,
            ApiError::Invalid { .. } => ErrorCode::InvalidField,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Conflict { code, .. } => *code,
            ApiError::Forbidden { .. } => ErrorCode::Forbidden,
            ApiError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            ApiError::PortsExhausted(_) => ErrorCode::PortsExhausted,
            ApiError::Node(_) => ErrorCode::NodeUnreachable,
            ApiError::JobFailed(_) => ErrorCode::JobFailed,
            ApiError::Database(_) => ErrorCode::Database,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        sendense_shared::http::status_of(self.code())
    }

    pub fn body(&self) -> ErrorBody {
        let detail = match self {
            ApiError::BadJson(d)
            | ApiError::BadName(d)
            | ApiError::Invalid { detail: d }
            | ApiError::NotFound(d)
            | ApiError::Conflict { detail: d, .. }
            | ApiError::InsufficientStorage(d)
            | ApiError::PortsExhausted(d)
            | ApiError::Node(d)
            | ApiError::JobFailed(d) => d.clone(),
            // The operator needs the database's own words (sqlx's error, the errno), not
            // "database"; they hold no secret (the URL is logged redacted, never in a query
            // error).
            ApiError::Forbidden { scope, detail } => format!("scope {scope}: {detail}"),
            ApiError::Database(e) => chain(e),
            ApiError::Internal(_) => "the hub logged the cause; see its log file".into(),
        };
        ErrorBody {
            error: self.code(),
            detail,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error answered with 500");
        } else if status.is_server_error() {
            tracing::warn!(%status, error = %chain(&self), "request failed");
        }
        (status, axum::Json(self.body())).into_response()
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        use crate::db::DbError;
        match e {
            DbError::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            DbError::Conflict { what } => {
                ApiError::conflict(ErrorCode::AlreadyExists, format!("{what} already exists"))
            }
            e @ DbError::Owned { .. } => {
                ApiError::conflict(ErrorCode::AlreadyExists, e.to_string())
            }
            // The database layer's own checks of a value (the handlers check first; this is
            // the last line).
            DbError::Invalid { field, reason } => ApiError::invalid(format!("{field}: {reason}")),
            DbError::InvalidName(e) => e.into(),
            // A value the hub cannot read back, or a URL it cannot open, is a bug or a
            // misconfiguration, not a request the client could change: logged, 500.
            e @ (DbError::Corrupt { .. } | DbError::UnsupportedUrl { .. }) => {
                ApiError::internal(chain(&e))
            }
            e @ (DbError::Connect { .. }
            | DbError::Migrate { .. }
            | DbError::Query { .. }
            | DbError::Unreachable { .. }) => ApiError::Database(e),
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

#[cfg(test)]
mod tests;
