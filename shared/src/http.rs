//! HTTP plumbing of the hub's and the node's servers (feature `server`, so the console does not
//! pull axum), so both answer a request the same way:
//!
//! - [`ErrorAnswer`]: an error answer, `{"error": <ErrorCode>, "detail"}` with the status
//!   [`status_of`] the code;
//! - [`ApiJson`]: the JSON body extractor (no `Content-Type` needed; `400 invalid_json` for
//!   syntax, `422 invalid_field` naming the field for shape);
//! - [`ApiQuery`]: the query-string extractor (`422 invalid_field` naming the parameter);
//! - [`require_bearer`]: the `Authorization: Bearer <token>` middleware (constant-time compare,
//!   `401 unauthorized` naming what was wrong);
//! - [`proof`]: the query check of the open `GET /api/v1/proof` challenge.

mod bearer;
mod json;
pub mod proof;
mod query;

pub use bearer::{Bearer, bearer_of, require_bearer};
pub use json::ApiJson;
pub use query::ApiQuery;

use crate::api::ErrorBody;
use crate::errors::ErrorCode;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// The status every agent answers a code with: one table, so hub and node cannot drift.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson | ErrorCode::InvalidName => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidField => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists
        | ErrorCode::VmBusy
        | ErrorCode::BackupBusy
        | ErrorCode::WrongState
        | ErrorCode::Cancelled
        | ErrorCode::NotRestorable
        | ErrorCode::ImageMissing
        | ErrorCode::BitmapMissing
        | ErrorCode::NodeNotRegistered
        | ErrorCode::ConsistencyRequired => StatusCode::CONFLICT,
        ErrorCode::NodeUnreachable
        | ErrorCode::HypervisorUnavailable
        | ErrorCode::HypervisorError => StatusCode::BAD_GATEWAY,
        ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        // A database that is down, locked or out of connections is a passing condition of a
        // dependency, not a bug: 503 tells a caller (a node's report loop, the console) that
        // the same request may succeed later, and `/health` says `degraded` meanwhile.
        ErrorCode::PortsExhausted | ErrorCode::ShuttingDown | ErrorCode::Database => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::JobFailed | ErrorCode::Internal | ErrorCode::Other => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// An error answer: the code decides the status, the detail is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub code: ErrorCode,
    pub detail: String,
}

impl ErrorAnswer {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ErrorAnswer {
            code,
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code,
            detail: self.detail.clone(),
        }
    }
}

impl std::fmt::Display for ErrorAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl std::error::Error for ErrorAnswer {}

impl IntoResponse for ErrorAnswer {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(ErrorBody {
                error: self.code,
                detail: self.detail,
            }),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests;
