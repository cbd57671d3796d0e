//! Test helpers: a real QEMU VM with qcow2 disks holding known data, two QMP sockets (one for
//! the node, one for the test), killed by PID in `Drop`.

use agent_node::qmp::{QmpClient, QmpLog};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// Runs a command, panicking with its full command line and output when it fails; its stdout.
pub use sendense_tests::run_stdout as run;

/// `qemu-io -c "write -P <pattern> <offset> <len>"` on an image that no process holds.
pub fn write_image(image: &Path, pattern: u8, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {offset} {len}"),
        ])
        .arg(image));
}

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

/// A QEMU VM (`-S`, TCG) with qcow2 disks attached as virtio-blk devices `disk0`, `disk1`, ...
pub struct TestVm {
    pub dir: tempfile::TempDir,
    pub images: Vec<PathBuf>,
    pub node_qmp: PathBuf,
    pub test_qmp: PathBuf,
    child: Child,
    pub test_client: Option<QmpClient>,
}

impl TestVm {
    /// Creates the disk images (sizes in bytes), lets `prepare` write data into them, starts QEMU.
    pub async fn start(sizes: &[u64], prepare: impl FnOnce(&[PathBuf])) -> TestVm {
        let dir = tempfile::Builder::new()
            .prefix("sdn-")
            .tempdir()
            .expect("tempdir");
        let mut images = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let img = dir.path().join(format!("disk{i}.qcow2"));
            sendense_tests::disks::create_qcow2(&img, *size);
            images.push(img);
        }
        prepare(&images);
        let node_qmp = dir.path().join("node.qmp");
        let test_qmp = dir.path().join("test.qmp");
        let mut cmd = sendense_tests::qemu::vm_command("node-test", &images, &node_qmp, &test_qmp);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        eprintln!("starting {cmd:?}");
        let child = cmd.spawn().expect("spawning qemu-system-x86_64");
        let mut vm = TestVm {
            dir,
            images,
            node_qmp,
            test_qmp,
            child,
            test_client: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("qemu exited early: {status}");
            }
            if vm.node_qmp.exists()
                && vm.test_qmp.exists()
                && let Ok(c) =
                    QmpClient::connect(&vm.test_qmp, "test", Arc::new(QmpLog::new(None))).await
            {
                vm.test_client = Some(c);
                break;
            }
            assert!(Instant::now() < deadline, "QEMU QMP sockets did not appear");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        vm
    }

    pub fn qmp(&self) -> &QmpClient {
        self.test_client.as_ref().expect("test QMP client")
    }

    /// A guest write into disk `i` while the VM runs (through HMP's qemu-io).
    pub async fn guest_write(&self, disk: usize, pattern: u8, offset: u64, len: u64) {
        let line = format!(
            "qemu-io -d /machine/peripheral/disk{disk}/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = self
            .qmp()
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .expect("human-monitor-command");
        // qemu-io prints its result on QEMU's stdout, not in the answer; an error in the
        // command line itself comes back here.
        let text = out.as_str().unwrap_or_default();
        assert!(text.is_empty(), "guest write failed: {text}");
    }

    /// Copies disk `i` as it is now into a raw file: flushes QEMU's caches of the disk, then
    /// reads the image file (`-U`: QEMU holds its lock).
    pub async fn copy_image_now(&self, disk: usize, dest: &Path) {
        let line = format!("qemu-io -d /machine/peripheral/disk{disk}/virtio-backend flush");
        self.qmp()
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .expect("flush through HMP");
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(&self.images[disk])
            .arg(dest));
    }

    /// Names of block nodes, exports and jobs that the node created and that are still there.
    pub async fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or_default();
            if !name.starts_with('#') && !name.starts_with("fmt") && !name.starts_with("file") {
                out.push(format!("node {name}"));
            }
        }
        for e in self
            .qmp()
            .execute("query-block-exports", json!({}))
            .await
            .unwrap()
            .as_array()
            .unwrap()
        {
            out.push(format!("export {}", e["id"]));
        }
        for j in self
            .qmp()
            .execute("query-block-jobs", json!({}))
            .await
            .unwrap()
            .as_array()
            .unwrap()
        {
            out.push(format!("job {}", j["device"]));
        }
        out
    }

    /// Bitmaps on disk `i`'s format node: (name, recording).
    pub async fn bitmaps(&self, disk: usize) -> Vec<(String, bool)> {
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        let fmt = format!("fmt{disk}");
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == Value::String(fmt.clone()))
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| {
                Some((
                    b["name"].as_str()?.to_string(),
                    b["recording"].as_bool().unwrap_or(false),
                ))
            })
            .collect()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.test_client = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

pub use sendense_tests::net::free_port;

/// A real qemu-nbd serving one qcow2 target on 127.0.0.1, killed by PID in `Drop`.
pub struct NbdTarget {
    pub image: PathBuf,
    pub port: u16,
    pub export: String,
    child: Option<Child>,
}

impl NbdTarget {
    /// Creates `image` (`size` bytes, or on top of `backing`) and serves it.
    pub async fn start(image: PathBuf, size: u64, backing: Option<&Path>, export: &str) -> Self {
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
        let port = free_port();
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "qcow2", "-x", export, "-b", "127.0.0.1"])
            .arg("-p")
            .arg(port.to_string())
            .args([
                "-t",
                "--shared=8",
                "--discard=unmap",
                "--detect-zeroes=unmap",
            ])
            .arg(&image)
            .stdin(Stdio::null());
        eprintln!("starting {cmd:?}");
        let child = cmd.spawn().expect("spawning qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NbdTarget {
            image,
            port,
            export: export.to_string(),
            child: Some(child),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.export)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
        }
    }

    /// Freezes the server (SIGSTOP): a copy into it waits, which holds the job in flight.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGKILL, like a crashed qemu-nbd.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server so the image can be read.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.resume_pid(&c);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn resume_pid(&self, c: &Child) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        self.stop();
    }
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
        let app = axum::Router::new()
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

pub const TOKEN: &str = "test-token-123";

/// The real `sendense-node` binary on a free port, killed by PID in `Drop`.
pub struct NodeProc {
    pub url: String,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

impl NodeProc {
    /// Starts the node for `vm` (name `vm1`) with its run dir in `dir`.
    pub async fn start(dir: &Path, vm_qmp: &Path, hub: Option<&str>) -> Self {
        Self::start_with_path(dir, vm_qmp, hub, None, &[]).await
    }

    /// Like [`NodeProc::start`], with `path_first` put in front of `PATH` (to gate a tool) and
    /// more VMs (`--qmp NAME=SOCKET`).
    pub async fn start_with_path(
        dir: &Path,
        vm_qmp: &Path,
        hub: Option<&str>,
        path_first: Option<&Path>,
        extra_vms: &[(&str, &Path)],
    ) -> Self {
        let run_dir = dir.join("node-run");
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        // The node refuses a token file group or others may read.
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let config = dir.join("node.toml");
        std::fs::write(&config, format!("run_dir = \"{}\"\n", run_dir.display())).unwrap();
        let port = free_port();
        let log = dir.join(format!("node-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendense-node"));
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--name", "node1"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--qmp")
            .arg(format!("vm1={}", vm_qmp.display()));
        for (name, sock) in extra_vms {
            cmd.arg("--qmp").arg(format!("{name}={}", sock.display()));
        }
        if let Some(h) = hub {
            cmd.args(["--hub-url", h]);
        }
        if let Some(p) = path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", p.display()));
        }
        cmd.env("RUST_LOG", "info,agent_node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        eprintln!("starting {cmd:?} (log {})", log.display());
        let child = cmd.spawn().expect("spawning sendense-node");
        let node = NodeProc {
            url: format!("http://127.0.0.1:{port}"),
            run_dir,
            log,
            child: Some(child),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = node.http.get(node.api("/health")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node did not answer /api/v1/health; log:\n{}",
                node.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }

    /// GET with the token: (status, JSON body).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.api(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with the token: (status, JSON body).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.api(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the job until `pred` holds on its state (panics after `secs`).
    pub async fn wait_job(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, body) = self.get(&format!("/backup/{id}")).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not reach the expected state; last {status} {body}\nnode log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, then waits up to `secs` for the exit; returns whether it exited.
    pub async fn terminate(&mut self, secs: u64) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}
