//! Who may do what: [`authenticate`] (every `/api/v1` route) finds the [`Principal`] of the
//! bearer token and lets a node's credential reach only the routes of [`NODE_ROUTES`]; the
//! handlers of those routes then check that the object is the node's own ([`own_vm`],
//! [`own_backup`], [`own_restore`], [`own_recovery`], [`own_node`]). A route added later is admin-only until it is
//! listed here, so a new endpoint cannot be opened to nodes by forgetting a check.
//!
//! A refusal is `403 forbidden` whose detail names the scope: `admin` (what only the hub's
//! token may do) or `node:<name>` (what the calling node's credential covers).

use super::ApiError;
use crate::auth::Principal;
use crate::hub::AppState;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sendense_shared::errors::ErrorCode;
use sendense_shared::http::{ErrorAnswer, bearer_of};

/// Where an operator finds a token, named in a 401.
const SOURCE: &str = "the hub's token file, or a node's credential from `sendense-hub node enroll`";

/// The routes a node's credential may call (under `/api/v1`); each handler checks the object
/// is the node's own. Everything else needs the admin token.
pub const NODE_ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/nodes"),
    (Method::GET, "/nodes/{name}"),
    (Method::PUT, "/nodes/{name}/inventory"),
    (Method::POST, "/vms"),
    (Method::GET, "/vms/{vm_name}"),
    (Method::POST, "/backups"),
    (Method::GET, "/backups/{id}"),
    (Method::POST, "/backups/{id}/cancel"),
    (Method::GET, "/backups/{id}/events"),
    (Method::POST, "/backups/{id}/progress"),
    (Method::POST, "/backups/{id}/complete"),
    (Method::POST, "/restores"),
    (Method::GET, "/restores/{id}"),
    (Method::POST, "/restores/{id}/cancel"),
    (Method::GET, "/restores/{id}/events"),
    (Method::POST, "/restores/{id}/progress"),
    (Method::POST, "/restores/{id}/complete"),
    (Method::GET, "/recoveries/{id}"),
    (Method::GET, "/recoveries/{id}/events"),
    (Method::POST, "/recoveries/{id}/progress"),
    (Method::POST, "/recoveries/{id}/complete"),
];

/// Middleware: `401` without a known, valid token; `403` for a node's credential on a route
/// that is not a node's; otherwise the request goes on with its [`Principal`] in the
/// extensions. The database is asked on every request (no cache): a revoked credential is
/// refused from the next request on.
pub async fn authenticate(State(hub): State<AppState>, mut req: Request, next: Next) -> Response {
    let given = match bearer_of(req.headers(), SOURCE) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let who = match hub.auth.principal(given).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => return ErrorAnswer::new(ErrorCode::Unauthorized, why).into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Principal::Node(node) = &who {
        let allowed = NODE_ROUTES
            .iter()
            .any(|(m, p)| m == req.method() && route_matches(p, req.uri().path()));
        if !allowed {
            return forbidden(
                "admin",
                format!(
                    "{} {} needs the admin token; node {node:?}'s credential acts only on that \
                     node's registration, inventory, VMs, jobs and restores",
                    req.method(),
                    req.uri().path()
                ),
            )
            .into_response();
        }
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// `pattern` (`/backups/{id}/progress`) matches `path`, with or without the `/api/v1` prefix
/// (the nested router sees it stripped); a `{...}` segment matches one non-empty segment.
fn route_matches(pattern: &str, path: &str) -> bool {
    let path = path.strip_prefix("/api/v1").unwrap_or(path);
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') && a.ends_with('}') && !b.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// `403 forbidden` naming `scope`.
pub fn forbidden(scope: &str, detail: impl std::fmt::Display) -> ApiError {
    ApiError::Forbidden {
        scope: scope.to_string(),
        detail: detail.to_string(),
    }
}

/// Only the admin token.
pub fn admin_only(who: &Principal, what: &str) -> Result<(), ApiError> {
    match who {
        Principal::Admin => Ok(()),
        Principal::Node(n) => Err(forbidden(
            "admin",
            format!("{what} needs the admin token, not node {n:?}'s credential"),
        )),
    }
}

/// A node acts only as itself (its registration, its inventory, VMs it registers).
pub fn own_node(who: &Principal, node: Option<&str>, what: &str) -> Result<(), ApiError> {
    match who {
        Principal::Admin => Ok(()),
        Principal::Node(n) if node == Some(n.as_str()) => Ok(()),
        Principal::Node(n) => Err(forbidden(
            &format!("node:{n}"),
            format!(
                "{what} of {} is not node {n:?}'s; that needs the admin token",
                match node {
                    Some(o) => format!("node {o:?}"),
                    None => "no node".to_string(),
                }
            ),
        )),
    }
}

/// The VM belongs to the calling node (the admin: any VM).
/// The hub name of the VM `name` as the caller means it: a node names its VMs as it knows
/// them, so its `web01` is the hub's `web01.<node>` when another node's VM held `web01` first.
/// The admin names VMs by their hub names.
pub async fn vm_name_for(
    hub: &crate::hub::Hub,
    who: &Principal,
    name: &str,
) -> Result<String, ApiError> {
    match who {
        Principal::Node(n) => Ok(hub.db.hub_vm_name(n, name).await?),
        _ => Ok(name.to_string()),
    }
}

pub async fn own_vm(hub: &crate::hub::Hub, who: &Principal, vm_name: &str) -> Result<(), ApiError> {
    let Principal::Node(n) = who else {
        return Ok(());
    };
    let vm = super::vms::find_vm(hub, vm_name).await?;
    if vm.node.as_deref() == Some(n.as_str()) {
        return Ok(());
    }
    Err(forbidden(
        &format!("node:{n}"),
        format!(
            "VM {vm_name:?} belongs to {}, not to node {n:?}; acting on it needs the admin token",
            vm.node
                .map(|o| format!("node {o:?}"))
                .unwrap_or_else(|| "no node".into())
        ),
    ))
}

/// The backup job is of one of the calling node's VMs.
pub async fn own_backup(hub: &crate::hub::Hub, who: &Principal, id: &str) -> Result<(), ApiError> {
    if let Principal::Node(_) = who {
        let b = hub
            .jobs
            .get(&sendense_shared::ids::BackupId(id.to_string()))
            .await?;
        own_vm(hub, who, &b.vm_name).await?;
    }
    Ok(())
}

/// The restore writes onto the calling node.
pub async fn own_restore(hub: &crate::hub::Hub, who: &Principal, id: &str) -> Result<(), ApiError> {
    if let Principal::Node(n) = who {
        let r = hub.restores.get(id).await?;
        if r.target.node != *n {
            return Err(forbidden(
                &format!("node:{n}"),
                format!(
                    "restore {id} writes onto node {:?}, not node {n:?}; acting on it needs the \
                     admin token",
                    r.target.node
                ),
            ));
        }
    }
    Ok(())
}

/// The recovery runs on the calling node.
pub async fn own_recovery(
    hub: &crate::hub::Hub,
    who: &Principal,
    id: &str,
) -> Result<(), ApiError> {
    if let Principal::Node(n) = who {
        let r = hub.recoveries.get(id).await?;
        if r.node != *n {
            return Err(forbidden(
                &format!("node:{n}"),
                format!(
                    "recovery {id} runs on node {:?}, not node {n:?}; acting on it needs the \
                     admin token",
                    r.node
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::route_matches;

    #[test]
    fn routes_match_by_segment() {
        assert!(route_matches(
            "/backups/{id}/progress",
            "/backups/b1/progress"
        ));
        assert!(route_matches(
            "/backups/{id}/progress",
            "/api/v1/backups/b1/progress"
        ));
        assert!(route_matches("/nodes", "/nodes"));
        assert!(!route_matches("/nodes", "/nodes/"));
        assert!(!route_matches("/backups/{id}", "/backups/"));
        assert!(!route_matches("/backups/{id}", "/backups/b1/verification"));
        assert!(!route_matches("/repositories", "/nodes"));
    }
}
