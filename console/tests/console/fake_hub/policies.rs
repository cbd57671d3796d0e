//! The fake hub's policies, points, protection, prunes and space, answering as the contract
//! (`sendense_shared::api::policies`) says and as the console assumes the real hub does:
//! create 201 with the policy, update 200 with it, delete 204, run-now 202 with the runs it
//! queued (and a `PolicyRun` event for each on the stream), protect/unprotect 200 with the
//! backup, a dry run 200 with the plan, a prune 202 with the job (one step per
//! `GET /api/v1/prune/{id}`; at the end the removed points are gone). Bad input is a 422
//! naming the field, as the hub's validation promises: a schedule that is not five cron
//! fields, an unknown time zone, a policy naming no VM.

use super::{Shared, error};
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{TimeZone, Utc};
use sendense_shared::api::{
    BackupType, HubEvent, JobStatus, KeepReason, Policy, PolicyRequest, PolicyRun, PruneAction,
    PruneJob, PrunePlan, PrunePoint, PruneRequest, RepositorySpace, Retention, RunStatus,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::BackupId;

/// Time zones the fake knows (the real hub knows them all).
const ZONES: [&str; 4] = ["UTC", "Europe/London", "Europe/Berlin", "America/New_York"];

pub(super) fn router() -> Router<Shared> {
    Router::new()
        .route("/api/v1/policies", get(list).post(create))
        .route(
            "/api/v1/policies/{id}",
            get(get_one).put(update).delete(delete),
        )
        .route("/api/v1/policies/{id}/run-now", post(run_now))
        .route("/api/v1/policies/{id}/runs", get(runs))
        .route("/api/v1/vms/{name}/points", get(points))
        .route("/api/v1/backups/{id}/protect", post(protect))
        .route("/api/v1/backups/{id}/unprotect", post(unprotect))
        .route("/api/v1/prune", get(list_prunes).post(prune))
        .route("/api/v1/prune/{id}", get(get_prune))
        .route("/api/v1/repositories/{id}/space", get(space))
}

/// A point of `vm`'s chain, created on day `day` of November 2026.
pub fn point(id: &str, day: u32, kept_by: Option<KeepReason>, action: PruneAction) -> PrunePoint {
    let used = (100 + day as u64) << 20;
    PrunePoint {
        backup_id: BackupId(id.into()),
        backup_type: if day == 1 {
            BackupType::Full
        } else {
            BackupType::Incremental
        },
        created_at: Utc.with_ymd_and_hms(2026, 11, day, 1, 0, 0).unwrap(),
        protected: kept_by == Some(KeepReason::Protected),
        kept_by,
        action,
        bytes_freed: if action == PruneAction::Keep { 0 } else { used },
        bytes_used: used,
    }
}

/// A policy request the fake accepts.
pub fn request(name: &str, vm: &str) -> PolicyRequest {
    PolicyRequest {
        name: name.into(),
        vms: sendense_shared::api::VmSelector {
            names: vec![vm.into()],
            ..Default::default()
        },
        repository_id: "repo-a".into(),
        schedule: "0 1 * * *".into(),
        timezone: "Europe/London".into(),
        backup_rule: Default::default(),
        retention: Retention {
            keep_daily: Some(7),
            ..Default::default()
        },
        max_chain_length: None,
        chain_limit: Default::default(),
        enabled: true,
        priority: 0,
        queue_window_secs: 3600,
        boot_check: None,
    }
}

fn invalid(detail: &str) -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::InvalidField,
        detail,
    )
}

/// `Err(detail)`: the 422's detail, naming the field.
fn validate(req: &PolicyRequest) -> Result<(), String> {
    let fields: Vec<&str> = req.schedule.split_whitespace().collect();
    let cron_ok = fields.len() == 5
        && fields
            .iter()
            .all(|f| f.chars().all(|c| c.is_ascii_digit() || "*/,-".contains(c)));
    if !cron_ok {
        return Err(format!(
            "schedule: {:?} is not a cron expression (five fields: minute hour day-of-month month day-of-week)",
            req.schedule
        ));
    }
    if !ZONES.contains(&req.timezone.as_str()) {
        return Err(format!(
            "timezone: unknown time zone {:?} (an IANA name, e.g. Europe/London)",
            req.timezone
        ));
    }
    if req.vms.names.is_empty() && req.vms.patterns.is_empty() && req.vms.nodes.is_empty() {
        return Err("vms: the policy names no VM (give names, patterns or nodes)".into());
    }
    Ok(())
}

fn no_policy(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        &format!("no policy {id}"),
    )
}

fn stored(id: String, req: PolicyRequest) -> Policy {
    let now = Utc::now();
    Policy {
        id,
        name: req.name,
        vms: req.vms,
        repository_id: req.repository_id,
        schedule: req.schedule,
        timezone: req.timezone,
        backup_rule: req.backup_rule,
        retention: req.retention,
        max_chain_length: req.max_chain_length,
        chain_limit: req.chain_limit,
        enabled: req.enabled,
        priority: req.priority,
        queue_window_secs: req.queue_window_secs,
        boot_check: req.boot_check,
        created_at: now,
        updated_at: now,
        next_run: req
            .enabled
            .then(|| Utc.with_ymd_and_hms(2026, 11, 28, 1, 0, 0).unwrap()),
        last_run: None,
        queued: 0,
    }
}

async fn list(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().policies.clone()).into_response()
}

async fn get_one(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let st = s.state.lock().unwrap();
    match st.policies.iter().find(|p| p.id == id) {
        Some(p) => Json(p.clone()).into_response(),
        None => no_policy(&id),
    }
}

async fn create(State(s): State<Shared>, Json(req): Json<PolicyRequest>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.policy_requests.push(req.clone());
    if let Err(detail) = validate(&req) {
        return invalid(&detail);
    }
    st.next_id += 1;
    let p = stored(format!("pol-fake{:04}", st.next_id), req);
    st.policies.push(p.clone());
    (StatusCode::CREATED, Json(p)).into_response()
}

async fn update(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Json(req): Json<PolicyRequest>,
) -> Response {
    let mut st = s.state.lock().unwrap();
    st.policy_requests.push(req.clone());
    if let Err(detail) = validate(&req) {
        return invalid(&detail);
    }
    let Some(slot) = st.policies.iter_mut().find(|p| p.id == id) else {
        return no_policy(&id);
    };
    let created = slot.created_at;
    *slot = Policy {
        created_at: created,
        ..stored(id, req)
    };
    Json(slot.clone()).into_response()
}

async fn delete(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    let before = st.policies.len();
    st.policies.retain(|p| p.id != id);
    if st.policies.len() == before {
        return no_policy(&id);
    }
    st.deleted_policies.push(id);
    StatusCode::NO_CONTENT.into_response()
}

async fn run_now(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    let Some(p) = st.policies.iter().find(|p| p.id == id).cloned() else {
        return no_policy(&id);
    };
    let now = Utc::now();
    let mut queued = Vec::new();
    for vm in &p.vms.names {
        st.next_id += 1;
        let run = PolicyRun {
            run_id: format!("run-fake{:04}", st.next_id),
            policy_id: p.id.clone(),
            vm_name: vm.clone(),
            planned_at: now,
            late: false,
            manual: true,
            status: RunStatus::Queued,
            backup_type: Some(BackupType::Incremental),
            backup_id: None,
            queued_at: now,
            started_at: None,
            ended_at: None,
            reason: Some("waiting for a free NBD port".into()),
        };
        st.runs.push(run.clone());
        queued.push(run);
    }
    if let Some(slot) = st.policies.iter_mut().find(|q| q.id == id) {
        slot.queued += queued.len() as u32;
        slot.last_run = queued.last().cloned();
    }
    for run in &queued {
        let msg = serde_json::to_string(&HubEvent::PolicyRun { run: run.clone() }).unwrap();
        let _ = s.events.send(msg);
    }
    (StatusCode::ACCEPTED, Json(queued)).into_response()
}

async fn runs(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let st = s.state.lock().unwrap();
    if !st.policies.iter().any(|p| p.id == id) {
        return no_policy(&id);
    }
    let runs: Vec<&PolicyRun> = st.runs.iter().filter(|r| r.policy_id == id).collect();
    Json(runs).into_response()
}

async fn points(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    let st = s.state.lock().unwrap();
    match st.points.get(&name) {
        Some(p) => Json(p.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no VM named {name:?}"),
        ),
    }
}

fn set_protected(s: &Shared, id: &str, on: bool) -> Response {
    let mut st = s.state.lock().unwrap();
    st.protect_requests.push((id.to_string(), on));
    let Some(b) = st.backups.iter_mut().find(|b| b.backup_id.0 == id) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no backup {id}"),
        );
    };
    b.protected = on;
    let b = b.clone();
    if let Some(points) = st.points.get_mut(&b.vm_name) {
        for p in points.iter_mut().filter(|p| p.backup_id == b.backup_id) {
            p.protected = on;
            if on {
                p.kept_by = Some(KeepReason::Protected);
                p.action = PruneAction::Keep;
                p.bytes_freed = 0;
            }
        }
    }
    Json(b).into_response()
}

async fn protect(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    set_protected(&s, &id, true)
}

async fn unprotect(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    set_protected(&s, &id, false)
}

#[derive(serde::Deserialize)]
struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

async fn prune(
    State(s): State<Shared>,
    Query(q): Query<DryRun>,
    Json(req): Json<PruneRequest>,
) -> Response {
    let mut st = s.state.lock().unwrap();
    st.prune_requests.push((req.clone(), q.dry_run));
    let Some(points) = st.points.get(&req.vm_name).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no VM named {:?}", req.vm_name),
        );
    };
    let plan = PrunePlan {
        vm_name: req.vm_name.clone(),
        retention: Retention {
            keep_daily: Some(7),
            ..Default::default()
        },
        bytes_freed: points.iter().map(|p| p.bytes_freed).sum(),
        points,
    };
    if q.dry_run || req.dry_run {
        return Json(plan).into_response();
    }
    st.next_id += 1;
    let steps = plan
        .points
        .iter()
        .filter(|p| p.action != PruneAction::Keep)
        .count() as u32;
    let job = PruneJob {
        prune_id: format!("p-fake{:04}", st.next_id),
        vm_name: req.vm_name,
        kind: "prune".into(),
        status: JobStatus::Pending,
        plan,
        steps_total: steps,
        steps_done: 0,
        bytes_total: 0,
        bytes_done: 0,
        error_message: None,
        created_at: Utc::now(),
        started_at: None,
        completed_at: None,
    };
    st.prunes.push(job.clone());
    (StatusCode::ACCEPTED, Json(job)).into_response()
}

async fn list_prunes(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().prunes.clone()).into_response()
}

async fn get_prune(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut guard = s.state.lock().unwrap();
    let st = &mut *guard;
    let Some(j) = st.prunes.iter_mut().find(|j| j.prune_id == id) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no prune job {id}"),
        );
    };
    match j.status {
        JobStatus::Pending => {
            j.status = JobStatus::Running;
            j.started_at = Some(Utc::now());
        }
        JobStatus::Running if j.steps_done < j.steps_total => j.steps_done += 1,
        JobStatus::Running => {
            j.status = JobStatus::Completed;
            j.completed_at = Some(Utc::now());
            if let Some(points) = st.points.get_mut(&j.vm_name) {
                points.retain(|p| p.action == PruneAction::Keep);
            }
        }
        _ => {}
    }
    Json(j.clone()).into_response()
}

async fn space(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let st = s.state.lock().unwrap();
    let Some(r) = st.repositories.iter().find(|r| r.id == id) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no repository {id:?}"),
        );
    };
    Json(RepositorySpace {
        repository_id: r.id.clone(),
        total_bytes: r.total_bytes,
        free_bytes: r.free_bytes,
        used_bytes: r.total_bytes - r.free_bytes,
        vms: vec![],
        growth_bytes_per_day: (2u64 << 30) as f64,
        full_in_days: Some(250.0),
    })
    .into_response()
}
