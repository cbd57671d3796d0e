//! [`ApiJson`]: the JSON body extractor of both agents.

use super::ErrorAnswer;
use crate::errors::ErrorCode;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// JSON body extractor: like `axum::Json`, without insisting on a `Content-Type` header (curl
/// and scripts forget it), and with rejections in the API's error shape: `400 invalid_json`
/// when the body is not JSON, `422 invalid_field` naming the field when it is JSON of the
/// wrong shape (`disks[0].size_bytes: invalid type: string "x", expected u64`).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorAnswer;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ErrorAnswer::new(ErrorCode::InvalidJson, e.body_text()))?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ErrorAnswer::new(
                ErrorCode::InvalidField,
                strip_prefix(&e.body_text()),
            )),
            Err(e) => Err(ErrorAnswer::new(
                ErrorCode::InvalidJson,
                strip_prefix(&e.body_text()),
            )),
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
