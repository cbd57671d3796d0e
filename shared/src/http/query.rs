//! [`ApiQuery`]: the query-string extractor of both agents.

use super::ErrorAnswer;
use crate::errors::ErrorCode;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// Like `axum::extract::Query`, with the rejection in the API's error shape: `422
/// invalid_field` naming the parameter (`limit: invalid digit found in string`), where axum
/// answers a plain-text `400`.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorAnswer;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => {
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                Err(ErrorAnswer::new(ErrorCode::InvalidField, detail))
            }
        }
    }
}
