use super::*;
use crate::token::Token;
use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[derive(serde::Deserialize)]
struct Req {
    #[allow(dead_code)]
    name: String,
    size: u64,
}

async fn handler(ApiJson(r): ApiJson<Req>) -> String {
    r.size.to_string()
}

fn app() -> Router {
    Router::new()
        .route("/x", post(handler))
        .route_layer(axum::middleware::from_fn_with_state(
            Bearer::new(Token::new("tok"), "the test's token file"),
            require_bearer,
        ))
}

async fn call(auth: Option<&str>, body: &str) -> (StatusCode, String) {
    let mut req = axum::http::Request::post("/x");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = app()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn body(text: &str) -> ErrorBody {
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn bearer_passes_the_token_only() {
    let ok = r#"{"name":"a","size":7}"#;
    // No Content-Type needed; the scheme's case does not matter.
    assert_eq!(
        call(Some("Bearer tok"), ok).await,
        (StatusCode::OK, "7".into())
    );
    assert_eq!(call(Some("bearer tok"), ok).await.0, StatusCode::OK);
    for (auth, names) in [
        (None, "the test's token file"),
        (Some("Bearer nope"), "does not match the test's token file"),
        (Some("Bearer to"), "does not match"),
        (Some("Basic dG9r"), "not `Bearer <token>`"),
        (Some("tok"), "not `Bearer <token>`"),
    ] {
        let (s, text) = call(auth, ok).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{auth:?}");
        let b = body(&text);
        assert_eq!(b.error, ErrorCode::Unauthorized, "{auth:?}");
        assert!(b.detail.contains(names), "{auth:?}: {}", b.detail);
        assert!(!b.detail.contains("tok "), "{}", b.detail);
    }
}

#[tokio::test]
async fn json_syntax_is_400_and_shape_is_422_naming_the_field() {
    let auth = Some("Bearer tok");
    for bad in ["{", "", "not json"] {
        let (s, text) = call(auth, bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(body(&text).error, ErrorCode::InvalidJson, "{bad:?}");
    }
    for (bad, field) in [
        (r#"{"name":"a"}"#, "size"),
        (r#"{"name":"a","size":"big"}"#, "size: invalid type"),
        (r#"{"name":1,"size":1}"#, "name: invalid type"),
    ] {
        let (s, text) = call(auth, bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let b = body(&text);
        assert_eq!(b.error, ErrorCode::InvalidField, "{bad}");
        assert!(b.detail.contains(field), "{bad}: {}", b.detail);
        assert!(!b.detail.contains("target type"), "{}", b.detail);
    }
}

#[test]
fn every_code_has_an_error_status() {
    for c in ErrorCode::ALL {
        let s = status_of(*c);
        assert!(s.is_client_error() || s.is_server_error(), "{c}: {s}");
    }
    assert_eq!(
        status_of(ErrorCode::Database),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let a = ErrorAnswer::new(ErrorCode::VmBusy, "vm1 has job b1");
    assert_eq!(a.status(), StatusCode::CONFLICT);
    assert_eq!(a.to_string(), "vm_busy: vm1 has job b1");
    assert_eq!(
        serde_json::to_value(a.body()).unwrap(),
        serde_json::json!({"error": "vm_busy", "detail": "vm1 has job b1"})
    );
}
