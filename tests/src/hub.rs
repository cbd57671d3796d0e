//! A running `sendense-hub` for a test: temporary data directory, API on a kernel-chosen port
//! of 127.0.0.1 (read back from the hub's log line, so there is no probe-then-bind race), its
//! own NBD port range, stopped (SIGTERM, then SIGKILL) in `Drop`. Its `node enroll|rotate|revoke`
//! commands run on the same data directory ([`HubProcess::node_command`]); a node of a test is
//! enrolled and gets its own credential ([`HubProcess::node_credential`]).

use anyhow::Context;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test hub is started.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `--listen`; `127.0.0.1:0` (a kernel-chosen port) unless a test must restart the hub on
    /// the address a node already knows.
    pub listen: String,
    /// Data directory (database, repository, token, logs); kept across restarts of a test.
    pub data_dir: PathBuf,
    /// `--nbd-ports FIRST-LAST`; `None` picks 8 free ports.
    pub nbd_ports: Option<(u16, u16)>,
    /// `--database-url`; `None` = SQLite in the data directory.
    pub database_url: Option<String>,
    /// Extra flags.
    pub extra_args: Vec<String>,
    /// Extra environment (e.g. `PATH` with a wrapper in front, to slow a tool down).
    pub env: Vec<(String, String)>,
}

impl HubOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            listen: "127.0.0.1:0".to_string(),
            data_dir: data_dir.into(),
            nbd_ports: None,
            database_url: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A `sendense-hub` child process.
pub struct HubProcess {
    child: Option<Child>,
    pub url: String,
    pub token: String,
    pub opts: HubOptions,
    pub nbd_ports: (u16, u16),
    /// The hub's stderr, captured to a file in the data directory.
    pub stderr_path: PathBuf,
    pub command_line: String,
    /// The binary, for its one-shot commands (`node enroll`).
    pub binary: PathBuf,
}

impl HubProcess {
    /// Starts the binary and waits until `/health` answers.
    pub fn start(binary: &Path, mut opts: HubOptions) -> anyhow::Result<HubProcess> {
        std::fs::create_dir_all(&opts.data_dir)?;
        let nbd_ports = *opts
            .nbd_ports
            .get_or_insert_with(|| crate::net::free_port_range(8));
        let stderr_path = opts.data_dir.join(format!(
            "hub-stderr-{}.log",
            chrono::Utc::now().format("%H%M%S%.f")
        ));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut cmd = Command::new(binary);
        cmd.arg("--listen")
            .arg(&opts.listen)
            .arg("--data-dir")
            .arg(&opts.data_dir)
            .arg("--nbd-ports")
            .arg(format!("{}-{}", nbd_ports.0, nbd_ports.1));
        if let Some(url) = &opts.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.args(&opts.extra_args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .env_remove("SENDENSE_HUB_CONFIG")
            .env("SENDENSE_HUB_LOG", "info,agent_hub=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let command_line = crate::describe(&cmd);
        eprintln!("+ {command_line}  (stderr: {})", stderr_path.display());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {command_line}"))?;
        let mut hub = HubProcess {
            child: Some(child),
            url: String::new(),
            token: String::new(),
            opts,
            nbd_ports,
            stderr_path,
            command_line,
            binary: binary.to_path_buf(),
        };
        let addr = crate::wait_for_log_value(
            "sendense-hub",
            &mut hub.child,
            &hub.stderr_path,
            "API listening",
            "addr=",
            Duration::from_secs(30),
        )?;
        hub.url = format!("http://{addr}");
        hub.token = std::fs::read_to_string(hub.opts.data_dir.join("token"))
            .context("reading the hub's token file")?
            .trim()
            .to_string();
        eprintln!("hub pid {} at {}", hub.pid(), hub.url);
        Ok(hub)
    }

    /// `sendense-hub node <args>` on this hub's data directory and database: (exit success,
    /// stdout, stderr).
    pub fn node_command(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--data-dir").arg(&self.opts.data_dir);
        if let Some(url) = &self.opts.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.arg("node")
            .args(args)
            .env_remove("SENDENSE_HUB_CONFIG")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        eprintln!("+ {}", crate::describe(&cmd));
        let out = cmd.output().context("running sendense-hub node ...")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The credential file of node `name` (0600), enrolled on first use
    /// (`sendense-hub node enroll NAME --output FILE`), the same file afterwards.
    pub fn node_credential(&self, name: &str) -> anyhow::Result<PathBuf> {
        let file = self.opts.data_dir.join(format!("node-{name}.credential"));
        if !file.exists() {
            let f = file.display().to_string();
            let (ok, _, err) = self.node_command(&["enroll", name, "--output", &f])?;
            anyhow::ensure!(ok, "sendense-hub node enroll {name} failed: {err}");
        }
        Ok(file)
    }

    /// An API client with node `name`'s credential (enrolled on first use).
    pub fn node_api(&self, name: &str) -> anyhow::Result<Api> {
        let file = self.node_credential(name)?;
        Ok(Api {
            base: self.url.clone(),
            token: Some(std::fs::read_to_string(file)?.trim().to_string()),
            http: reqwest::Client::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the hub wrote to stderr so far.
    pub fn stderr(&self) -> String {
        crate::read_log(&self.stderr_path)
    }

    pub fn api(&self) -> Api {
        Api {
            base: self.url.clone(),
            token: Some(self.token.clone()),
            http: reqwest::Client::new(),
        }
    }

    /// SIGKILL, as a crash: nothing of the hub's shutdown runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {}", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 30 s, then SIGKILL; answers the exit status if it stopped.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        eprintln!("+ kill -TERM {pid}");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("sendense-hub pid {pid} ignored SIGTERM for 30 s; SIGKILL");
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small JSON client of the hub's API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    /// `None` sends no Authorization header.
    pub token: Option<String>,
    pub http: reqwest::Client,
}

impl Api {
    pub fn without_token(&self) -> Api {
        Api {
            token: None,
            ..self.clone()
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(60));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn finish(r: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = r.send().await.expect("request to the hub");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::finish(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        Self::finish(self.req(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        Self::finish(self.req(reqwest::Method::PUT, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Self::finish(self.req(reqwest::Method::DELETE, path)).await
    }

    /// POST with a raw body (for malformed JSON).
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        Self::finish(
            self.req(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// GET `path` sent byte for byte over a plain HTTP/1.1 connection: a URL client resolves
    /// dot segments (`/vms/..` becomes `/`), so the server would never see them.
    pub async fn get_verbatim(&self, path: &str) -> (u16, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let base = reqwest::Url::parse(&self.base).expect("the API's base URL");
        let addr = format!(
            "{}:{}",
            base.host_str().expect("a host"),
            base.port_or_known_default().expect("a port")
        );
        let target = format!("{}{path}", base.path().trim_end_matches('/'));
        let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        conn.write_all(req.as_bytes()).await.expect("sending");
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.expect("reading");
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        let v = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
        (status, v)
    }

    /// GET that must answer 200.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (s, v) = self.get(path).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    /// Polls a backup until its status is one of `want` (or `limit` passes); answers it.
    pub async fn wait_status(&self, id: &str, want: &[&str], limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            let b = self.get_ok(&format!("/api/v1/backups/{id}")).await;
            if want.iter().any(|w| b["status"] == *w) {
                return b;
            }
            if t.elapsed() > limit {
                let ev = self.get(&format!("/api/v1/backups/{id}/events")).await.1;
                panic!("backup {id} not in {want:?} after {limit:?}: {b:#}\nevents: {ev:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts what an operator checks on the hub once job `backup` is over, whatever its end:
    /// no qemu-nbd of it alive, no port allocated, no process recorded alive.
    pub async fn assert_nothing_held(&self, backup: &Value) {
        for d in backup["disk_results"].as_array().into_iter().flatten() {
            if let Some(pid) = d["qemu_nbd_pid"].as_u64() {
                assert!(
                    !crate::pid_alive(pid as u32),
                    "qemu-nbd pid {pid} of disk {} still alive",
                    d["disk_key"]
                );
            }
        }
        let ports = self.get_ok("/api/v1/ports").await;
        assert_eq!(ports["allocations"], json!([]), "ports still held: {ports}");
        let procs = self.get_ok("/api/v1/processes").await;
        for p in procs.as_array().unwrap() {
            assert_eq!(p["alive"], json!(false), "process still alive: {p}");
        }
    }

    /// The job's event log as lines `step: message`.
    pub async fn event_lines(&self, id: &str) -> Vec<String> {
        let v = self.get_ok(&format!("/api/v1/backups/{id}/events")).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["step"].as_str().unwrap_or(""),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The qcow2 path of every disk of a backup record (`disk_results`), in the hub's order.
pub fn image_paths(backup: &Value) -> Vec<PathBuf> {
    backup["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["qcow2_path"].as_str().unwrap()))
        .collect()
}

/// The disk result with `disk_key` `key` of a backup record.
pub fn disk_result(backup: &Value, key: i64) -> &Value {
    backup["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk_key"] == key)
        .unwrap_or_else(|| panic!("disk {key} in {backup}"))
}
