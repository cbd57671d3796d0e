//! Test helpers of the node tests: images with known data, qemu-nbd backup targets, the
//! recording hub. The VM ([`TestVm`]), the exports ([`QemuNbd`]) and the node process come from
//! the shared harness (`sendense_tests`).

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// Runs a command, panicking with its full command line and output when it fails; its stdout.
pub use sendense_tests::run_stdout as run;

/// The node's run directory holds nothing but its QMP log: every snapshot file, socket and
/// journal entry of a job is gone.
pub fn assert_run_dir_empty(run_dir: &Path) {
    let files: Vec<_> = std::fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "qmp.log")
        .collect();
    assert!(files.is_empty(), "run dir holds {files:?}");
}

/// Byte-for-byte comparison of two images (any formats qemu-img reads, NBD URIs included).
pub fn images_equal(a: &str, b: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", a, b])
        .output()
        .expect("qemu-img compare");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {a} {b}: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub use sendense_tests::qemu::TestVm;

/// Reads an NBD URI (e.g. a snapshot export) into a raw file.
pub fn read_export(uri: &str, dest: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(uri)
        .arg(dest));
}

/// QMP commands of `log` with the given name.
pub fn commands<'a>(log: &'a [Value], name: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["execute"] == name).collect()
}

pub use sendense_tests::nbd::QemuNbd;

/// Creates `image` (`size` bytes, or on top of `backing`) and serves it on 127.0.0.1 the way
/// the hub serves a backup target.
pub async fn nbd_target(
    image: PathBuf,
    size: u64,
    backing: Option<&Path>,
    export: &str,
) -> QemuNbd {
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        create.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    create.arg(&image);
    if backing.is_none() {
        create.arg(size.to_string());
    }
    run(&mut create);
    QemuNbd::builder(&image, export)
        .args(&["--discard=unmap", "--detect-zeroes=unmap"])
        .start_async()
        .await
}

/// What the node posted to the (recording) hub endpoint.
#[derive(Debug, Clone)]
pub struct HubCall {
    pub path: String,
    pub auth: Option<String>,
    pub body: Value,
}

/// An HTTP endpoint with the hub's node-facing routes that records every call, so a test can
/// check what the node reported. Answers 200 `{}` unless `fail_first` says otherwise.
pub struct HubRecorder {
    pub url: String,
    pub calls: Arc<std::sync::Mutex<Vec<HubCall>>>,
    /// How many calls are answered 503 before the recorder starts accepting.
    pub fail_first: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HubRecorder {
    pub async fn start() -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode, Uri};
        type Shared = (
            Arc<std::sync::Mutex<Vec<HubCall>>>,
            Arc<std::sync::atomic::AtomicUsize>,
        );
        async fn record(
            State((calls, fail)): State<Shared>,
            uri: Uri,
            headers: HeaderMap,
            body: String,
        ) -> (StatusCode, axum::Json<Value>) {
            use std::sync::atomic::Ordering;
            if fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
            }
            calls.lock().unwrap().push(HubCall {
                path: uri.path().to_string(),
                auth: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body: serde_json::from_str(&body).unwrap_or(Value::Null),
            });
            (StatusCode::OK, axum::Json(json!({})))
        }
        let calls: Arc<std::sync::Mutex<Vec<HubCall>>> = Arc::default();
        let fail = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        /// The hub's proof (the node proves every connection before it reports): made with
        /// the test token, which every node of these tests holds.
        async fn proof(
            axum::extract::Query(q): axum::extract::Query<sendense_shared::proof::ProofQuery>,
        ) -> axum::Json<sendense_shared::proof::ProofAnswer> {
            axum::Json(sendense_shared::proof::ProofAnswer {
                proofs: vec![sendense_shared::proof::prove(
                    &TOKEN.to_string().into(),
                    sendense_shared::proof::Role::Hub,
                    q.node.as_deref().unwrap_or_default(),
                    &q.nonce,
                )],
            })
        }
        let app = axum::Router::new()
            .route(sendense_shared::proof::PATH, axum::routing::get(proof))
            .fallback(axum::routing::post(record))
            .with_state((calls.clone(), fail.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        HubRecorder {
            url,
            calls,
            fail_first: fail,
            task,
        }
    }

    /// Waits until at least one call to a path ending in `suffix` arrived.
    pub async fn wait_for(&self, suffix: &str, secs: u64) -> Vec<HubCall> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let calls = self.calls_to(suffix);
            if !calls.is_empty() {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "no call to *{suffix} within {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn calls_to(&self, suffix: &str) -> Vec<HubCall> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path.ends_with(suffix))
            .cloned()
            .collect()
    }
}

impl Drop for HubRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Not every test binary that includes this file starts the node.
#[allow(unused_imports)]
pub use sendense_tests::{
    disks::write_pattern,
    net::free_port,
    node::{NodeOptions, NodeProcess, TEST_TOKEN as TOKEN},
};

/// This crate's `sendense-node`.
pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_sendense-node");

/// A node test's node: `node1` in `dir` (run dir `dir/run`, the same after a restart), VM
/// `vm1` on `vm_qmp` if given, reporting to `hub` if given.
pub fn node_opts(dir: &Path, vm_qmp: Option<&Path>, hub: Option<&str>) -> NodeOptions {
    NodeOptions {
        hub_url: hub.map(str::to_string),
        vms: vm_qmp
            .map(|q| ("vm1".to_string(), q.to_path_buf()))
            .into_iter()
            .collect(),
        ..NodeOptions::new(dir, "node1")
    }
}

/// Starts this crate's node binary as `opts` says; panics with its log when it does not serve.
pub fn start_node(opts: NodeOptions) -> NodeProcess {
    NodeProcess::start(Path::new(NODE_BIN), opts).expect("start sendense-node")
}
