//! [`require_bearer`]: `Authorization: Bearer <token>` on every protected route.

use super::ErrorAnswer;
use crate::errors::ErrorCode;
use crate::token::Token;
use axum::extract::{Request, State};
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
    let refuse = |detail: String| ErrorAnswer::new(ErrorCode::Unauthorized, detail).into_response();
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return refuse(format!(
            "missing Authorization header: send `Authorization: Bearer <token>` (the token of {})",
            b.source
        ));
    };
    let given = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(rest)
    });
    let Some(given) = given else {
        return refuse("Authorization header is not `Bearer <token>`".to_string());
    };
    if !b.token.matches(given.trim()) {
        return refuse(format!("bearer token does not match {}", b.source));
    }
    next.run(req).await
}
