//! A fake hub: the parts of the hub's API the console calls, answering from memory. Jobs move
//! one step per `GET /api/v1/backups/{id}` (restores: `GET /api/v1/restores/{id}`, in
//! `restores`; instant recoveries per `GET /api/v1/recoveries/{id}`, in `recoveries`; prune
//! jobs per `GET /api/v1/prune/{id}`, in `policies`) so that `--wait` sees
//! progress without timers. `policies`: policies, runs, points, protection, prunes, space.
//! (Stand-in while the real hub is written in parallel; see `main.rs`.)

pub mod files;
pub mod policies;
pub mod recoveries;
pub mod restores;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{TimeZone, Utc};
use sendense_shared::api::{
    Backup, BackupRequest, BackupType, DatabaseHealth, DatabaseKind, DiskResult, DiskStatus,
    ErrorBody, Health, JobStatus, PortsView, Repository, Restore, RestoreRequest, Vm, VmDisk,
};
use sendense_shared::errors::ErrorCode;
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, watch};

pub const TOKEN: &str = "s3cret-test-token";

/// Writes `text` to `path` as a token file the console accepts: mode 0600 whatever the umask
/// (the shared token reader refuses a file group or others may read).
pub fn write_token_file(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
pub const GIB: u64 = 1024 * 1024 * 1024;

/// How the fake's jobs end, by VM name: `pgtest1` completes, `flaky` fails, `slowvm` runs until
/// cancelled; any other name is an unknown VM.
pub const VMS: [&str; 3] = ["pgtest1", "flaky", "slowvm"];
pub const FLAKY_ERROR: &str = "disk 2001 failed: qemu-nbd exited with status 1: Permission denied";

#[derive(Default)]
pub struct HubState {
    pub backups: Vec<Backup>,
    pub repositories: Vec<Repository>,
    /// Every `POST /api/v1/backups` body, in order.
    pub start_requests: Vec<BackupRequest>,
    pub cancel_requests: Vec<String>,
    pub restores: Vec<Restore>,
    /// Every `POST /api/v1/restores` body, in order.
    pub restore_start_requests: Vec<RestoreRequest>,
    /// Ids of every `POST /api/v1/restores/{id}/cancel`, in order.
    pub restore_cancel_requests: Vec<String>,
    pub recoveries: Vec<sendense_shared::api::Recovery>,
    /// Every `POST /api/v1/recoveries` body, in order (refused ones too).
    pub recovery_start_requests: Vec<sendense_shared::api::RecoveryRequest>,
    /// Ids of every `POST /api/v1/recoveries/{id}/cancel`, in order.
    pub recovery_cancel_requests: Vec<String>,
    /// What `GET /api/v1/vms` answers.
    pub vms: Vec<Vm>,
    pub policies: Vec<sendense_shared::api::Policy>,
    /// Every `POST`/`PUT` policy body, in order (refused ones too).
    pub policy_requests: Vec<sendense_shared::api::PolicyRequest>,
    pub deleted_policies: Vec<String>,
    pub runs: Vec<sendense_shared::api::PolicyRun>,
    /// Points of each VM, newest first, as `GET /api/v1/vms/{name}/points` answers them.
    pub points: std::collections::BTreeMap<String, Vec<sendense_shared::api::PrunePoint>>,
    /// Every `POST /api/v1/backups/{id}/protect|unprotect`: (id, protect).
    pub protect_requests: Vec<(String, bool)>,
    /// Every `POST /api/v1/prune` body, with the `dry_run` query parameter.
    pub prune_requests: Vec<(sendense_shared::api::PruneRequest, bool)>,
    pub prunes: Vec<sendense_shared::api::PruneJob>,
    next_id: u32,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<HubState>>,
    events: broadcast::Sender<String>,
    /// Turns true when the hub stops: open event streams end then.
    stopping: watch::Receiver<bool>,
}

pub struct FakeHub {
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub state: Arc<Mutex<HubState>>,
    /// Each message is sent as one `data:` line on `GET /api/v1/events` (as a comment line
    /// when it starts with `:`).
    pub events: broadcast::Sender<String>,
    shutdown: Option<oneshot::Sender<()>>,
    stop_tx: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn repository(id: &str) -> Repository {
    Repository {
        id: id.into(),
        path: format!("/srv/{id}"),
        free_bytes: 500 * GIB,
        total_bytes: 1000 * GIB,
        verify_interval_secs: None,
        last_verified_at: None,
    }
}

pub fn backup(id: &str, vm: &str, repo: &str, t: BackupType) -> Backup {
    let disk = |key: i64, unit: i32, port: u16| DiskResult {
        disk_key: DiskKey(key),
        unit_number: unit,
        nbd_port: Some(NbdPort(port)),
        nbd_export_name: format!("{vm}-disk-{key}"),
        qcow2_path: format!("/srv/{repo}/{vm}/disk-{key}/{id}.qcow2"),
        qemu_nbd_pid: None,
        status: DiskStatus::Pending,
        bytes_done: 0,
        bytes_total: GIB,
        error_message: None,
        change_id: None,
        checksums_source: None,
    };
    Backup {
        backup_id: BackupId(id.into()),
        vm_context_id: format!("ctx-{vm}"),
        vm_name: vm.into(),
        backup_type: t,
        repository_id: repo.into(),
        status: JobStatus::Pending,
        disk_results: vec![disk(2000, 0, 10100), disk(2001, 1, 10101)],
        nbd_targets_string: String::new(),
        bytes_transferred: 0,
        total_bytes: 2 * GIB,
        created_at: Utc.with_ymd_and_hms(2026, 11, 27, 0, 0, 0).unwrap(),
        started_at: None,
        completed_at: None,
        error_message: None,
        integrity: sendense_shared::api::Integrity::Unverified,
        integrity_detail: None,
        verified_at: None,
        consistency: None,
        protected: false,
        policy_id: None,
        boot_check: None,
        hardware: None,
    }
}

fn set_progress(b: &mut Backup, done: u64, status: DiskStatus) {
    for d in &mut b.disk_results {
        d.bytes_done = done;
        d.status = status;
    }
    b.bytes_transferred = done * b.disk_results.len() as u64;
}

/// Move a job one step along its script.
fn advance(b: &mut Backup) {
    let now = Utc::now();
    match b.status {
        JobStatus::Pending => b.status = JobStatus::Preparing,
        JobStatus::Preparing => {
            b.status = JobStatus::Running;
            b.started_at = Some(now);
            set_progress(b, GIB / 4, DiskStatus::Running);
        }
        JobStatus::Running => {
            let done = b.disk_results[0].bytes_done;
            match b.vm_name.as_str() {
                "slowvm" => set_progress(b, (done + GIB / 100).min(GIB - 1), DiskStatus::Running),
                "flaky" if done >= GIB / 2 => {
                    b.status = JobStatus::Failed;
                    b.completed_at = Some(now);
                    b.error_message = Some(FLAKY_ERROR.into());
                    b.disk_results[1].status = DiskStatus::Failed;
                    b.disk_results[1].error_message =
                        Some("qemu-nbd exited with status 1: Permission denied".into());
                }
                _ if done >= GIB * 3 / 4 => {
                    set_progress(b, GIB, DiskStatus::Completed);
                    b.status = JobStatus::Completed;
                    b.completed_at = Some(now);
                }
                _ => set_progress(b, done + GIB / 4, DiskStatus::Running),
            }
        }
        JobStatus::Cancelling => {
            b.status = JobStatus::Cancelled;
            b.completed_at = Some(now);
            for d in &mut b.disk_results {
                d.status = DiskStatus::Cancelled;
            }
        }
        _ => {}
    }
}

fn error(status: StatusCode, error: ErrorCode, detail: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error,
            detail: detail.into(),
        }),
    )
        .into_response()
}

fn no_backup(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        &format!("no backup {id}"),
    )
}

/// `GET /api/v1/proof?nonce=&node=@admin`, answered as the real hub does with [`TOKEN`].
async fn proof(
    axum::extract::Query(q): axum::extract::Query<sendense_shared::proof::ProofQuery>,
) -> axum::Json<sendense_shared::proof::ProofAnswer> {
    let token = sendense_shared::token::Token::new(TOKEN.to_string());
    axum::Json(sendense_shared::proof::ProofAnswer {
        proofs: vec![sendense_shared::proof::prove(
            &token,
            sendense_shared::proof::Role::Hub,
            q.node.as_deref().unwrap_or_default(),
            &q.nonce,
        )],
    })
}

/// Every `/api/v1` route answers 401 when the bearer token is missing or wrong.
async fn require_token(req: Request, next: Next) -> Response {
    let expected = format!("Bearer {TOKEN}");
    match req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if v == expected => next.run(req).await,
        _ => error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong bearer token",
        ),
    }
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "healthy".into(),
        version: "0.1.0".into(),
        git_commit: "fakehub".into(),
        build_time: "2026-11-27T00:00:00+00:00".into(),
        executable: "/fake/sendense-hub".into(),
        pid: std::process::id(),
        started_at: Utc::now(),
        database: Some(DatabaseHealth {
            kind: DatabaseKind::Sqlite,
            ok: true,
        }),
    })
}

async fn list_backups(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().backups.clone()).into_response()
}

async fn get_backup(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    match st.backups.iter_mut().find(|b| b.backup_id.0 == id) {
        Some(b) => {
            advance(b);
            Json(b.clone()).into_response()
        }
        None => no_backup(&id),
    }
}

async fn start_backup(State(s): State<Shared>, Json(req): Json<BackupRequest>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.start_requests.push(req.clone());
    if !VMS.contains(&req.vm_name.as_str()) {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!(
                "no VM named {:?} is registered; GET /api/v1/vms lists them",
                req.vm_name
            ),
        );
    }
    if !st.repositories.iter().any(|r| r.id == req.repository_id) {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no repository {:?}", req.repository_id),
        );
    }
    st.next_id += 1;
    let id = format!("b-fake{:04}", st.next_id);
    let b = backup(&id, &req.vm_name, &req.repository_id, req.backup_type);
    st.backups.push(b.clone());
    (StatusCode::ACCEPTED, Json(b)).into_response()
}

async fn cancel_backup(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let mut st = s.state.lock().unwrap();
    st.cancel_requests.push(id.clone());
    match st.backups.iter_mut().find(|b| b.backup_id.0 == id) {
        Some(b) if b.status.is_terminal() => error(
            StatusCode::CONFLICT,
            ErrorCode::WrongState,
            &format!("backup {id} is already {}", b.status.as_str()),
        ),
        Some(b) => {
            b.status = JobStatus::Cancelling;
            Json(b.clone()).into_response()
        }
        None => no_backup(&id),
    }
}

async fn repositories(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().repositories.clone()).into_response()
}

async fn vms(State(s): State<Shared>) -> Response {
    Json(s.state.lock().unwrap().vms.clone()).into_response()
}

/// A registered VM with two 1 GiB disks.
pub fn vm(name: &str) -> Vm {
    let disk = |key: i64, unit: i32| VmDisk {
        disk_key: DiskKey(key),
        unit_number: unit,
        size_bytes: GIB,
        label: format!("virtio-disk{unit}"),
        controller: None,
        backing_file: None,
        thin_provisioned: None,
    };
    Vm {
        vm_context_id: format!("ctx-{name}"),
        vm_name: name.into(),
        node: None,
        disks: vec![disk(2000, 0), disk(2001, 1)],
        last_backup_id: None,
        last_backup_at: None,
        driver: None,
        change_tracking: None,
        node_vm_name: None,
    }
}

async fn empty_list() -> Response {
    Json(Vec::<()>::new()).into_response()
}

async fn ports() -> Response {
    Json(PortsView {
        range: [10100, 10200],
        allocations: vec![],
        squatted: vec![],
    })
    .into_response()
}

async fn event_stream(State(s): State<Shared>) -> Response {
    let rx = s.events.subscribe();
    let stream =
        futures_util::stream::unfold((rx, s.stopping.clone()), |(mut rx, mut stop)| async move {
            loop {
                let next = tokio::select! {
                    msg = rx.recv() => Some(msg),
                    _ = stop.wait_for(|v| *v) => None,
                };
                match next {
                    Some(Ok(msg)) => {
                        // A message starting with `:` goes out as a comment line, as the
                        // hub's "lagged" notice does.
                        let chunk = if msg.starts_with(':') {
                            Bytes::from(format!("{msg}\n\n"))
                        } else {
                            Bytes::from(format!("data: {msg}\n\n"))
                        };
                        return Some((Ok::<_, Infallible>(chunk), (rx, stop)));
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Some(Err(broadcast::error::RecvError::Closed)) | None => return None,
                }
            }
        });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

impl FakeHub {
    /// A fake hub on a free loopback port with the given repositories.
    pub async fn start(repos: &[&str]) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = HubState {
            repositories: repos.iter().map(|r| repository(r)).collect(),
            ..Default::default()
        };
        Self::serve(listener, Arc::new(Mutex::new(state)))
    }

    /// Serve `state` on `listener` (also used to bring a stopped hub back on its port).
    pub fn serve(listener: TcpListener, state: Arc<Mutex<HubState>>) -> FakeHub {
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(64);
        let (stop_tx, stopping) = watch::channel(false);
        let shared = Shared {
            state: state.clone(),
            events: events.clone(),
            stopping,
        };
        let app = Router::new()
            .route("/api/v1/backups", get(list_backups).post(start_backup))
            .route("/api/v1/backups/{id}", get(get_backup))
            .route("/api/v1/backups/{id}/cancel", post(cancel_backup))
            .route("/api/v1/backups/{id}/events", get(empty_list))
            .route("/api/v1/backups/{id}/files/archive", get(files::archive))
            .route(
                "/api/v1/restores",
                get(restores::list).post(restores::start),
            )
            .route("/api/v1/restores/{id}", get(restores::get_one))
            .route("/api/v1/restores/{id}/cancel", post(restores::cancel))
            .route("/api/v1/restores/{id}/events", get(empty_list))
            .route(
                "/api/v1/recoveries",
                get(recoveries::list).post(recoveries::start),
            )
            .route("/api/v1/recoveries/{id}", get(recoveries::get_one))
            .route("/api/v1/recoveries/{id}/cancel", post(recoveries::cancel))
            .route("/api/v1/repositories", get(repositories))
            .route("/api/v1/vms", get(vms))
            .route("/api/v1/processes", get(empty_list))
            .route("/api/v1/nodes", get(empty_list))
            .route("/api/v1/verify", get(empty_list))
            .route("/api/v1/tunnel", get(empty_list))
            .route("/api/v1/ports", get(ports))
            .route("/api/v1/events", get(event_stream))
            .merge(policies::router())
            .route_layer(axum::middleware::from_fn(require_token))
            .route("/health", get(health))
            // As the real hub: it proves it holds the admin token before the console sends it.
            .route(sendense_shared::proof::PATH, get(proof))
            .with_state(shared);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        FakeHub {
            url: format!("http://{addr}"),
            addr,
            state,
            events,
            shutdown: Some(tx),
            stop_tx,
            task: Some(task),
        }
    }

    /// Stop answering: open streams end and the port is closed.
    pub async fn stop(mut self) -> (std::net::SocketAddr, Arc<Mutex<HubState>>) {
        self.halt();
        if let Some(task) = self.task.take() {
            // Graceful: streams end on `stopping`, then the listener closes.
            let _ = task.await;
        }
        (self.addr, self.state.clone())
    }

    fn halt(&mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.halt();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
