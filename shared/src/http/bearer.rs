//! [`require_bearer`]: `Authorization: Bearer <token>` on every protected route.

use super::ErrorAnswer;
use crate::errors::ErrorCode;
use crate::token::Token;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The middleware's state: the token, and where an operator finds it (named in the 401, e.g.
/// `"the hub's token file"`), never the token itself.
#[derive(Clone, Debug)]
pub struct Bearer {
    pub token: Token,
    pub source: &'static str,
}

impl Bearer {
    pub fn new(token: Token, source: &'static str) -> Self {
        Bearer { token, source }
    }
}

/// Middleware (`axum::middleware::from_fn_with_state(bearer, require_bearer)`): passes a
/// request whose `Authorization` is `Bearer <token>` (scheme in any case, as RFC 7235 has it),
/// answers `401 unauthorized` naming what was wrong otherwise.
pub async fn require_bearer(State(b): State<Bearer>, req: Request, next: Next) -> Response {
    let given = match bearer_of(req.headers(), b.source) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if !b.token.matches(given) {
        return ErrorAnswer::new(
            ErrorCode::Unauthorized,
            format!("bearer token does not match {}", b.source),
        )
        .into_response();
    }
    next.run(req).await
}

/// The token of `Authorization: Bearer <token>` (trimmed), or the `401 unauthorized` naming
/// what was wrong; `source` says where an operator finds the token.
pub fn bearer_of<'h>(headers: &'h HeaderMap, source: &str) -> Result<&'h str, ErrorAnswer> {
    let refuse = |detail: String| ErrorAnswer::new(ErrorCode::Unauthorized, detail);
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(refuse(format!(
            "missing Authorization header: send `Authorization: Bearer <token>` (the token of {source})"
        )));
    };
    let given = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(rest)
    });
    match given {
        Some(g) => Ok(g.trim()),
        None => Err(refuse(
            "Authorization header is not `Bearer <token>`".to_string(),
        )),
    }
}
