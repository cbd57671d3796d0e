//! `GET /api/v1/openapi.json`: the hub's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` and the API types' `ToSchema` (see [`super::openapi_document`]). The
//! committed copy is `docs/openapi/hub.json`; a test fails when the two differ.

use axum::Json;
use serde_json::Value;
use std::sync::OnceLock;

/// The document, made once per process (it depends only on the code).
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(super::openapi_document)
}

/// The generated description made whole (title, bearer scheme, shared error answers).
pub fn finish(doc: utoipa::openapi::OpenApi) -> Value {
    sendense_shared::api::openapi::finish(doc, sendense_shared::api::openapi::Agent::Hub)
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "hub_openapi",
    tag = "system",
    summary = "This API's OpenAPI 3.1 document",
    responses((status = 200, description = "The document", body = Object))
)]
pub async fn serve() -> Json<&'static Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::document;

    /// `docs/openapi/hub.json` is what the code generates. After a change of a handler or an
    /// API type: `SENDENSE_BLESS_OPENAPI=1 cargo nextest run -p agent-hub openapi` rewrites it;
    /// review and commit the diff (it is the API's contract for other clients).
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/hub.json");
        sendense_shared::api::openapi::check_committed(document(), &path, "agent-hub");
    }

    #[test]
    fn every_operation_is_named_documents_its_errors_and_is_protected_unless_open() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut ids = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_string()), "{id} twice");
                let open = path == "/health" || path == "/api/v1/proof";
                assert_eq!(op.get("security").is_some(), open, "{method} {path}");
                for status in
                    ["500", "503"]
                        .iter()
                        .chain(if open { &[][..] } else { &["401", "403"][..] })
                {
                    let r = &op["responses"][status];
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
        assert!(ids.len() > 50, "{ids:?}");
        let error = &doc["components"]["schemas"]["ErrorBody"];
        assert_eq!(
            error["required"],
            serde_json::json!(["error", "detail"]),
            "{error}"
        );
    }
}
