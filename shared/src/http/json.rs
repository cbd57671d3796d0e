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
            Err(JsonRejection::JsonDataError(e)) => {
                // JSON Schema's `integer` admits whole-number floats (`343.0`, `1e3`); serde's
                // integer fields do not. The body is tried again with those written as
                // integers; if it still does not fit, that second answer names the field
                // that is really wrong.
                let e = match with_whole_floats_as_integers(&bytes) {
                    Some(b) => match axum::Json::<T>::from_bytes(&b) {
                        Ok(axum::Json(v)) => return Ok(ApiJson(v)),
                        Err(JsonRejection::JsonDataError(again)) => again,
                        Err(_) => e,
                    },
                    None => e,
                };
                Err(ErrorAnswer::new(
                    ErrorCode::InvalidField,
                    strip_prefix(&e.body_text()),
                ))
            }
            Err(e) => Err(ErrorAnswer::new(
                ErrorCode::InvalidJson,
                strip_prefix(&e.body_text()),
            )),
        }
    }
}

/// The body again with every float that is a whole number within ±2^53 written as an
/// integer; `None` when it holds none (nothing to retry) or is not JSON.
fn with_whole_floats_as_integers(bytes: &[u8]) -> Option<Vec<u8>> {
    fn walk(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 || !f.is_finite() {
                    return false;
                }
                // Only within ±2^53, where a float holds every whole number exactly: an
                // integer literal too big for i64/u64 (parsed as a float, rounded) stays refused.
                const EXACT: f64 = 9_007_199_254_740_992.0;
                if f.abs() > EXACT {
                    false
                } else {
                    *v = if f >= 0.0 {
                        serde_json::Value::from(f as u64)
                    } else {
                        serde_json::Value::from(f as i64)
                    };
                    true
                }
            }
            // Every element is walked (no short cut once one changed).
            serde_json::Value::Array(items) => {
                let mut changed = false;
                for x in items {
                    changed |= walk(x);
                }
                changed
            }
            serde_json::Value::Object(map) => {
                let mut changed = false;
                for x in map.values_mut() {
                    changed |= walk(x);
                }
                changed
            }
            _ => false,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if !walk(&mut value) {
        return None;
    }
    serde_json::to_vec(&value).ok()
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

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Body {
        count: u32,
        offset: i64,
        ratio: f64,
        sizes: Vec<u64>,
    }

    async fn extract(body: &str) -> Result<Body, ErrorAnswer> {
        let req = Request::builder()
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        ApiJson::<Body>::from_request(req, &()).await.map(|j| j.0)
    }

    #[tokio::test]
    async fn whole_number_floats_fill_integer_fields_as_json_schema_allows() {
        let b = extract(r#"{"count": 343.0, "offset": -2.0, "ratio": 1, "sizes": [1e3, 4]}"#)
            .await
            .expect("accepted");
        assert_eq!(
            b,
            Body {
                count: 343,
                offset: -2,
                ratio: 1.0,
                sizes: vec![1000, 4]
            }
        );
    }

    #[tokio::test]
    async fn fractions_and_out_of_range_values_are_still_refused_naming_the_field() {
        let e = extract(r#"{"count": 3.5, "offset": 0, "ratio": 1, "sizes": []}"#)
            .await
            .expect_err("3.5 is no integer");
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.detail.starts_with("count:"), "{}", e.detail);
        let e = extract(r#"{"count": 5e9, "offset": 0, "ratio": 1, "sizes": []}"#)
            .await
            .expect_err("5e9 does not fit u32");
        assert!(e.detail.starts_with("count:"), "{}", e.detail);
        // One below i64::MIN: serde reads it as a float that rounds to i64::MIN.
        let e = extract(r#"{"count": 1, "offset": -9223372036854775809, "ratio": 1, "sizes": []}"#)
            .await
            .expect_err("out of i64");
        assert!(e.detail.starts_with("offset:"), "{}", e.detail);
        let e = extract(r#"{"count": 1.0, "offset": 0, "ratio": "x", "sizes": []}"#)
            .await
            .expect_err("ratio is no number");
        assert!(e.detail.starts_with("ratio:"), "{}", e.detail);
    }
}
