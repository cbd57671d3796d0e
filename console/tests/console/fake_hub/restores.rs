//! The fake hub's restores: `GET/POST /api/v1/restores`, `GET /api/v1/restores/{id}` (one
//! step along the script per call, as for backups), `.../cancel` and `.../events`. A restore
//! ends the way a backup of its VM would: `pgtest1` completes, `flaky` fails, `slowvm` runs
//! until cancelled.

use super::{GIB, Shared, error};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sendense_shared::api::{JobStatus, Restore, RestoreRequest, RestoreTarget};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};

pub const RESTORE_FLAKY_ERROR: &str =
    "node-a: writing /restore/flaky.qcow2: No space left on device (os error 28)";

/// A restore of `backup` (a backup of `vm`), pending, of one 1 GiB disk.
pub fn restore(id: &str, backup: &str, vm: &str, node: &str, path: &str) -> Restore {
    Restore {
        restore_id: id.into(),
        backup_id: BackupId(backup.into()),
        vm_name: vm.into(),
        disk_key: DiskKey(2000),
        target: RestoreTarget {
            node: node.into(),
            path: path.into(),
            vm: None,
        },
        status: JobStatus::Pending,
        source_qcow2: format!("/srv/repo-a/{vm}/disk-2000/{backup}.qcow2"),
        nbd_port: None,
        nbd_export_name: format!("restore-{id}"),
        bytes_done: 0,
        bytes_total: GIB,
        created_at: Utc::now(),
        completed_at: None,
        error_message: None,
    }
}

/// Move a restore one step along its script.
fn advance(r: &mut Restore) {
    let now = Utc::now();
    match r.status {
        JobStatus::Pending => r.status = JobStatus::Preparing,
        JobStatus::Preparing => {
            r.status = JobStatus::Running;
            r.nbd_port = Some(NbdPort(10150));
            r.bytes_done = GIB / 4;
        }
        JobStatus::Running => match r.vm_name.as_str() {
            "slowvm" => r.bytes_done = (r.bytes_done + GIB / 100).min(GIB - 1),
            "flaky" if r.bytes_done >= GIB / 2 => {
                r.status = JobStatus::Failed;
                r.completed_at = Some(now);
                r.nbd_port = None;
                r.error_message = Some(RESTORE_FLAKY_ERROR.into());
            }
            _ if r.bytes_done >= GIB * 3 / 4 => {
                r.bytes_done = GIB;
                r.status = JobStatus::Completed;
                r.completed_at = Some(now);
                r.nbd_port = None;
            }
            _ => r.bytes_done += GIB / 4,
        },
        JobStatus::Cancelling => {
            r.status = JobStatus::Cancelled;
            r.completed_at = Some(now);
            r.nbd_port = None;
        }
        _ => {}
    }
}

fn no_restore(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        &format!("no restore {id}"),
    )
}

pub(super) async fn list(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().restores.clone()).into_response()
}

pub(super) async fn get_one(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    match st.restores.iter_mut().find(|r| r.restore_id == id) {
        Some(r) => {
            advance(r);
            Json(r.clone()).into_response()
        }
        None => no_restore(&id),
    }
}

pub(super) async fn start(State(s): State<Shared>, Json(req): Json<RestoreRequest>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.restore_start_requests.push(req.clone());
    let Some(backup) = st.backups.iter().find(|b| b.backup_id == req.backup_id) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no backup {}", req.backup_id),
        );
    };
    if backup.status != JobStatus::Completed {
        return error(
            StatusCode::CONFLICT,
            ErrorCode::NotRestorable,
            &format!(
                "backup {} is {}: only a completed backup can be restored",
                req.backup_id,
                backup.status.as_str()
            ),
        );
    }
    let vm = backup.vm_name.clone();
    st.next_id += 1;
    let id = format!("r-fake{:04}", st.next_id);
    let mut r = restore(
        &id,
        &req.backup_id.0,
        &vm,
        &req.target.node,
        &req.target.path,
    );
    if let Some(k) = req.disk_key {
        r.disk_key = k;
    }
    st.restores.push(r.clone());
    (StatusCode::ACCEPTED, Json(r)).into_response()
}

pub(super) async fn cancel(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.restore_cancel_requests.push(id.clone());
    match st.restores.iter_mut().find(|r| r.restore_id == id) {
        Some(r) if r.status.is_terminal() => error(
            StatusCode::CONFLICT,
            ErrorCode::WrongState,
            &format!("restore {id} is already {}", r.status.as_str()),
        ),
        Some(r) => {
            r.status = JobStatus::Cancelling;
            Json(r.clone()).into_response()
        }
        None => no_restore(&id),
    }
}
