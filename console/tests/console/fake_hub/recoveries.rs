//! The fake hub's instant recoveries: `GET/POST /api/v1/recoveries`, `GET
//! /api/v1/recoveries/{id}` (one step along the script per call, as for backups) and
//! `.../cancel`. A recovery ends the way a backup of its point's VM would: `pgtest1` gets
//! every disk home, `flaky` fails (QEMU exits), `slowvm` streams until cancelled. Ids are
//! UUIDs, as the hub's, so short ids are resolved against them.

use super::{GIB, Shared, error};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sendense_shared::api::{JobStatus, Recovery, RecoveryDisk, RecoveryRequest};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::NbdPort;

pub const RECOVERY_FLAKY_ERROR: &str = "node-a: QEMU of flaky-rec exited with status 1: qemu-system-x86_64: Could not open '/dev/kvm': Permission denied";
/// The nodes the fake knows.
pub const NODES: [&str; 2] = ["node-a", "node-b"];
const MIB: u64 = 1024 * 1024;

/// Move a recovery one step along its script.
fn advance(r: &mut Recovery) {
    let now = Utc::now();
    let release = |r: &mut Recovery| {
        for d in &mut r.disks {
            d.nbd_port = None;
            d.qemu_nbd_pid = None;
            d.rate_bps = 0;
        }
    };
    match r.status {
        JobStatus::Pending => r.status = JobStatus::Preparing,
        JobStatus::Preparing => {
            r.status = JobStatus::Running;
            r.vm_state = Some("running".into());
            r.qemu_pid = Some(4242);
            r.vm_started_at = Some(now);
            for (i, d) in r.disks.iter_mut().enumerate() {
                d.nbd_port = Some(NbdPort(10140 + i as u16));
                d.qemu_nbd_pid = Some(51300 + i as u32);
                d.overlay = Some(format!(
                    "/srv/recovery/{}/disk-{}.qcow2",
                    r.vm_name, d.disk_key
                ));
                d.bytes_done = GIB / 4;
                d.rate_bps = 256 * MIB;
                d.stream = "running".into();
            }
        }
        JobStatus::Running => {
            let done = r.disks[0].bytes_done;
            match r.source_vm.as_str() {
                "slowvm" => {
                    for d in &mut r.disks {
                        d.bytes_done = (done + GIB / 100).min(GIB - 1);
                        d.rate_bps = 10 * MIB;
                    }
                }
                "flaky" if done >= GIB / 2 => {
                    r.status = JobStatus::Failed;
                    r.completed_at = Some(now);
                    r.vm_state = None;
                    r.error_message = Some(RECOVERY_FLAKY_ERROR.into());
                    release(r);
                }
                _ if done >= GIB * 3 / 4 => {
                    for d in &mut r.disks {
                        d.bytes_done = GIB;
                        d.stream = "finished".into();
                    }
                    release(r);
                    r.status = JobStatus::Completed;
                    r.completed_at = Some(now);
                }
                _ => {
                    for d in &mut r.disks {
                        d.bytes_done += GIB / 4;
                    }
                }
            }
        }
        JobStatus::Cancelling => {
            r.status = JobStatus::Cancelled;
            r.completed_at = Some(now);
            r.vm_state = None;
            release(r);
        }
        _ => {}
    }
}

fn no_recovery(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        &format!("no recovery {id}"),
    )
}

pub(super) async fn list(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().recoveries.clone()).into_response()
}

pub(super) async fn get_one(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    match st.recoveries.iter_mut().find(|r| r.recovery_id == id) {
        Some(r) => {
            advance(r);
            Json(r.clone()).into_response()
        }
        None => no_recovery(&id),
    }
}

pub(super) async fn start(State(s): State<Shared>, Json(req): Json<RecoveryRequest>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.recovery_start_requests.push(req.clone());
    let Some(backup) = st.backups.iter().find(|b| b.backup_id == req.backup_id) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("backup_id: no backup {}", req.backup_id),
        );
    };
    if backup.status != JobStatus::Completed {
        return error(
            StatusCode::CONFLICT,
            ErrorCode::NotRestorable,
            &format!(
                "backup_id: backup {} is {}: only a completed point can be recovered",
                req.backup_id,
                backup.status.as_str()
            ),
        );
    }
    if !NODES.contains(&req.node.as_str()) {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("node: no node named {:?} is registered", req.node),
        );
    }
    if req.vm_name.is_empty() || req.vm_name.contains(['/', ' ']) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidField,
            &format!(
                "vm_name: {:?} is not a VM name (letters, digits, '.', '_', '-')",
                req.vm_name
            ),
        );
    }
    let mut disks: Vec<RecoveryDisk> = Vec::new();
    for d in &backup.disk_results {
        if req
            .disks
            .as_ref()
            .is_some_and(|want| !want.contains(&d.disk_key))
        {
            continue;
        }
        disks.push(RecoveryDisk {
            disk_key: d.disk_key,
            source_qcow2: d.qcow2_path.clone(),
            nbd_port: None,
            nbd_export_name: format!("recovery-{}", d.disk_key),
            qemu_nbd_pid: None,
            overlay: None,
            bytes_done: 0,
            bytes_total: GIB,
            rate_bps: 0,
            stream: "pending".into(),
        });
    }
    let source_vm = backup.vm_name.clone();
    st.next_id += 1;
    let n = st.next_id;
    let r = Recovery {
        recovery_id: format!("7ec{n:05x}-0000-4000-8000-{n:012x}"),
        backup_id: req.backup_id.clone(),
        source_vm,
        node: req.node.clone(),
        vm_name: req.vm_name.clone(),
        status: JobStatus::Pending,
        disks,
        vm_state: None,
        qemu_pid: None,
        qmp_socket: None,
        serial_log: None,
        stalled: None,
        created_at: Utc::now(),
        vm_started_at: None,
        completed_at: None,
        error_message: None,
    };
    st.recoveries.push(r.clone());
    (StatusCode::ACCEPTED, Json(r)).into_response()
}

pub(super) async fn cancel(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.recovery_cancel_requests.push(id.clone());
    match st.recoveries.iter_mut().find(|r| r.recovery_id == id) {
        Some(r) if r.status.is_terminal() => error(
            StatusCode::CONFLICT,
            ErrorCode::WrongState,
            &format!("recovery {id} is already {}", r.status.as_str()),
        ),
        Some(r) => {
            r.status = JobStatus::Cancelling;
            Json(r.clone()).into_response()
        }
        None => no_recovery(&id),
    }
}
