//! The real `sendense-node` binary on a free port, and how to start it.

use super::free_port;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-123";

/// How to start the node; `NodeOpts::default()` is a node with no VM and no hub.
#[derive(Default)]
pub struct NodeOpts<'a> {
    /// `--qmp vm1=SOCKET`.
    pub vm_qmp: Option<&'a Path>,
    pub hub: Option<&'a str>,
    /// Put in front of `PATH` (to gate a tool).
    pub path_first: Option<&'a Path>,
    /// More VMs (`--qmp NAME=SOCKET`).
    pub extra_vms: &'a [(&'a str, &'a Path)],
    /// More command-line arguments.
    pub args: Vec<String>,
    /// More environment variables (e.g. the copy throttle).
    pub env: Vec<(String, String)>,
}

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
        Self::start_opts(
            dir,
            NodeOpts {
                vm_qmp: Some(vm_qmp),
                hub,
                ..NodeOpts::default()
            },
        )
        .await
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
        Self::start_opts(
            dir,
            NodeOpts {
                vm_qmp: Some(vm_qmp),
                hub,
                path_first,
                extra_vms,
                ..NodeOpts::default()
            },
        )
        .await
    }

    /// The node as `opts` says; its run dir is `dir/node-run` (the same again after a restart).
    pub async fn start_opts(dir: &Path, opts: NodeOpts<'_>) -> Self {
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
            .arg(&token_file);
        if let Some(q) = opts.vm_qmp {
            cmd.arg("--qmp").arg(format!("vm1={}", q.display()));
        }
        for (name, sock) in opts.extra_vms {
            cmd.arg("--qmp").arg(format!("{name}={}", sock.display()));
        }
        if let Some(h) = opts.hub {
            cmd.args(["--hub-url", h]);
        }
        if let Some(p) = opts.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", p.display()));
        }
        cmd.args(&opts.args);
        for (k, v) in &opts.env {
            cmd.env(k, v);
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
        self.wait_for(&format!("/backup/{id}"), secs, pred).await
    }

    /// Polls the restore until `pred` holds on its state (panics after `secs`).
    pub async fn wait_restore(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(&format!("/restore/{id}"), secs, pred).await
    }

    /// Polls `GET path` until it answers 200 with a body `pred` holds on (panics after `secs`).
    pub async fn wait_for(&self, path: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not reach the expected state; last {status} {body}\nnode log:\n{}",
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
