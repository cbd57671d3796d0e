//! What the hub's and the node's OpenAPI documents share: the bearer scheme, the error body
//! ([`super::ErrorBody`]) on every error status an operation can answer, and the title. The
//! operations themselves come from each agent's handlers (`#[utoipa::path]`, collected by its
//! router), so a route cannot be served undocumented.

use serde_json::{Value, json};

/// The agent a document describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    Hub,
    Node,
}

/// The generated document (`utoipa`'s) made whole: title and version, the `bearer` security
/// scheme required by every operation that does not declare itself open (`security: []`),
/// and the error answers every operation shares, each with the `ErrorBody` schema:
///
/// - `401 unauthorized` on a protected operation; `403 forbidden` too on the hub (a node's
///   credential outside its scope);
/// - `400 invalid_json` / `invalid_name` and `422 invalid_field` where there is a body or a
///   parameter;
/// - `404 not_found` where there is a path parameter (the object does not exist);
/// - `500 internal` everywhere; `503` (database, shutting down, ports) everywhere.
///
/// Statuses an operation documents itself (a `409` with its own description) are kept. The
/// answer is JSON with sorted keys, so the committed copy diffs line by line.
pub fn finish(doc: utoipa::openapi::OpenApi, agent: Agent) -> Value {
    let mut doc = serde_json::to_value(doc).expect("an OpenAPI document serialises");
    let (title, description) = match agent {
        Agent::Hub => (
            "sendense-hub",
            "The Sendense backup server's API. Everything under /api/v1 needs \
             `Authorization: Bearer <token>`: the hub's admin token, or a node's credential \
             (which reaches only that node's registration, inventory, VMs, jobs and restores; \
             403 otherwise). Errors are `{\"error\": <code>, \"detail\": <text>}`.",
        ),
        Agent::Node => (
            "sendense-node",
            "The Sendense node's API (snapshots and copies next to the hypervisor). Everything \
             under /api/v1 but health and proof needs `Authorization: Bearer <token>` (the \
             node's --token-file). Errors are `{\"error\": <code>, \"detail\": <text>}`.",
        ),
    };
    doc["info"] = json!({
        "title": title,
        "description": description,
        "version": env!("CARGO_PKG_VERSION"),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    });
    doc["components"]["securitySchemes"] = json!({
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "The token file's content (hub: admin token or node credential)"}
    });
    doc["security"] = json!([{"bearer": []}]);
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                    add_errors(op, agent);
                }
            }
        }
    }
    doc
}

/// The pattern of `sendense_shared::names::validate_name`: no `..`, not `.`, 1 to 128 of
/// `[A-Za-z0-9._-]`.
pub const NAME_PATTERN: &str = r"^(\.?[A-Za-z0-9_-])+\.?$";

/// The schema of a name checked by `names::validate_name`.
pub fn name_schema() -> Value {
    json!({"type": "string", "pattern": NAME_PATTERN, "maxLength": crate::names::MAX_NAME_LEN})
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn add_errors(op: &mut Value, agent: Agent) {
    let open = op["security"].as_array().is_some_and(|s| {
        s.iter()
            .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
    });
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let in_path = params.iter().any(|p| p["in"] == "path");
    // The hub checks every name in a path as `names::validate_name` does: say so in the
    // schema (ASCII letters, digits, `-`, `_`, `.`; no `..`, not `.`; at most 128 bytes).
    if agent == Agent::Hub
        && let Some(ps) = op.get_mut("parameters").and_then(Value::as_array_mut)
    {
        for p in ps.iter_mut().filter(|p| p["in"] == "path") {
            p["schema"] = name_schema();
        }
    }
    let has_input = op.get("requestBody").is_some() || !params.is_empty();
    let mut add = |status: &str, description: &str| {
        let responses = &mut op["responses"];
        if responses.get(status).is_none() {
            responses[status] = error(description);
        }
    };
    if has_input {
        add(
            "400",
            "`invalid_json` (the body is not JSON) or `invalid_name` (a name that would escape \
             a path or an export); `detail` names the field",
        );
        add(
            "422",
            "`invalid_field`: a value of the wrong shape or refused by validation; `detail` \
             names the field",
        );
    }
    if !open {
        add("401", "`unauthorized`: no bearer token, or not a valid one");
        if agent == Agent::Hub {
            add(
                "403",
                "`forbidden`: a node's credential outside its scope; `detail` names the scope",
            );
        }
    }
    if in_path || has_input {
        add(
            "404",
            "`not_found`: no such object (the path's, or one the request names); `detail` \
             names it",
        );
    }
    add("500", "`internal`: a bug; the cause is in the agent's log");
    add(
        "503",
        "`database` (the database is down or locked), `shutting_down` or `ports_exhausted`: \
         try again later",
    );
}

/// The test of a committed document (`docs/openapi/<agent>.json`): equal to `generated`, or the
/// failure says how to regenerate it. With `SENDENSE_BLESS_OPENAPI=1` it writes the file
/// instead.
pub fn check_committed(generated: &Value, path: &std::path::Path, package: &str) {
    let text = serde_json::to_string_pretty(generated).expect("JSON serialises") + "\n";
    if std::env::var_os("SENDENSE_BLESS_OPENAPI").is_some() {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .expect("create docs/openapi");
        std::fs::write(path, &text).expect("write the document");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != text {
        let line = committed
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the length".to_string(), |n| format!("line {}", n + 1));
        panic!(
            "{} is not what the code generates (first difference at {line}); regenerate it with \
             `SENDENSE_BLESS_OPENAPI=1 cargo nextest run -p {package} openapi`, review the diff \
             and commit it",
            path.display()
        );
    }
}
