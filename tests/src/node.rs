//! A running `sendense-node` for a test — the one launcher of the node, hub and end-to-end
//! tests: API on a kernel-chosen port of 127.0.0.1 (read back from its "node serving" log line)
//! or a given address, a run directory kept across restarts (so the start-up recovery of a
//! restarted node finds its journal), the credential the hub enrolled it with
//! (`HubProcess::node_credential`) or a token of its own, its VMs' QMP sockets, and on request a hub URL, an SSH tunnel, a copy throttle, a `PATH` in front, more
//! flags, environment and config. Killed (SIGKILL, by PID) in `Drop`.

use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The token a node gets when [`NodeOptions::token_file`] is `None` (written to `dir/token`).
pub const TEST_TOKEN: &str = "test-token-123";

/// `--tunnel*` flags: the node's SSH tunnel to a hub's sshd.
#[derive(Debug, Clone)]
pub struct TunnelOptions {
    /// `USER@HOST:PORT` of the sshd.
    pub target: String,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    /// `--tunnel-bind`: the node side's address of the forwards.
    pub bind: String,
    /// `--tunnel-nbd-ports FIRST-LAST`.
    pub nbd_ports: (u16, u16),
    pub hub_api_port: u16,
    pub reverse_port: u16,
}

/// How a test node is started; [`NodeOptions::new`] has the defaults.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Where the config file, the token file (if the harness writes it), the run directory
    /// (`dir/run`, the same after a restart) and the logs live.
    pub dir: PathBuf,
    pub name: String,
    /// `--hub-url`; `None`: no hub (or the tunnel's forward to one).
    pub hub_url: Option<String>,
    /// `--token-file` (e.g. `HubProcess::node_credential`); `None`: [`TEST_TOKEN`] in
    /// `dir/token` (mode 0600).
    pub token_file: Option<PathBuf>,
    /// `(vm_name, qmp_socket)`: `--qmp NAME=SOCKET`.
    pub vms: Vec<(String, PathBuf)>,
    /// `SENDENSE_COPY_THROTTLE_BPS`: each disk's copy reads at most this many bytes a second.
    pub throttle_bps: Option<u64>,
    /// `--listen`; `127.0.0.1:0` (a kernel-chosen port, read back from the log) unless the
    /// address must be known before the start (a tunnel's reverse forward).
    pub listen: String,
    /// Put in front of `PATH` (to gate or slow down a tool the node runs).
    pub path_first: Option<PathBuf>,
    /// More command-line flags.
    pub args: Vec<String>,
    /// More environment variables.
    pub env: Vec<(String, String)>,
    /// TOML appended to the generated config file (e.g. a `[vsphere]` table).
    pub extra_config: String,
    pub tunnel: Option<TunnelOptions>,
}

impl NodeOptions {
    /// A node named `name` in `dir`: no hub, no VM, its own token, a kernel-chosen port.
    pub fn new(dir: impl Into<PathBuf>, name: &str) -> Self {
        NodeOptions {
            dir: dir.into(),
            name: name.to_string(),
            hub_url: None,
            token_file: None,
            vms: Vec::new(),
            throttle_bps: None,
            listen: "127.0.0.1:0".to_string(),
            path_first: None,
            args: Vec::new(),
            env: Vec::new(),
            extra_config: String::new(),
            tunnel: None,
        }
    }
}

/// A `sendense-node` child process; SIGKILLed by PID in `Drop` (with the ssh of its tunnel).
pub struct NodeProcess {
    child: Option<Child>,
    /// `http://HOST:PORT` of its API.
    pub url: String,
    pub token: String,
    pub opts: NodeOptions,
    pub run_dir: PathBuf,
    /// The node's stderr (its log), a new file per start.
    pub stderr_path: PathBuf,
    pub command_line: String,
    binary: PathBuf,
    http: reqwest::Client,
}

impl NodeProcess {
    /// Starts the binary and waits until it serves (its "node serving" log line).
    pub fn start(binary: &Path, mut opts: NodeOptions) -> anyhow::Result<NodeProcess> {
        std::fs::create_dir_all(&opts.dir)?;
        // With a tunnel the node logs the hub side's reverse forward as its URL, not where it
        // listens: the test must know the port beforehand (kept for restarts).
        if opts.tunnel.is_some() && opts.listen.ends_with(":0") {
            opts.listen = format!("127.0.0.1:{}", crate::net::free_port());
        }
        let run_dir = opts.dir.join("run");
        let config = opts.dir.join("node.toml");
        std::fs::write(
            &config,
            format!("run_dir = \"{}\"\n{}", run_dir.display(), opts.extra_config),
        )?;
        let token_file = match &opts.token_file {
            Some(f) => f.clone(),
            None => {
                let f = opts.dir.join("token");
                std::fs::write(&f, format!("{TEST_TOKEN}\n"))?;
                // The node refuses a token file group or others may read.
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                f
            }
        };
        let stderr_path = opts.dir.join(format!(
            "node-stderr-{}.log",
            chrono::Utc::now().format("%H%M%S%.f")
        ));
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", &opts.listen, "--name", &opts.name])
            .arg("--token-file")
            .arg(&token_file);
        if let Some(h) = &opts.hub_url {
            cmd.args(["--hub-url", h]);
        }
        for (vm, sock) in &opts.vms {
            cmd.arg("--qmp").arg(format!("{vm}={}", sock.display()));
        }
        if let Some(t) = &opts.tunnel {
            cmd.args(["--tunnel", &t.target])
                .arg("--tunnel-identity")
                .arg(&t.identity)
                .arg("--tunnel-known-hosts")
                .arg(&t.known_hosts)
                .args(["--tunnel-bind", &t.bind])
                .arg("--tunnel-nbd-ports")
                .arg(format!("{}-{}", t.nbd_ports.0, t.nbd_ports.1))
                .args(["--tunnel-hub-api-port", &t.hub_api_port.to_string()])
                .args(["--tunnel-reverse-port", &t.reverse_port.to_string()]);
        }
        cmd.args(&opts.args);
        // Nothing of the caller's environment configures the node under test.
        cmd.env_remove("SENDENSE_NODE_CONFIG")
            .env_remove("SENDENSE_NODE_QMP")
            .env_remove("SENDENSE_HUB_URL")
            .env("RUST_LOG", "info,agent_node=debug")
            .env("NO_COLOR", "1");
        match opts.throttle_bps {
            Some(b) => cmd.env(THROTTLE_ENV, b.to_string()),
            None => cmd.env_remove(THROTTLE_ENV),
        };
        let mut shown_env = String::new();
        if let Some(p) = &opts.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", p.display()));
            shown_env.push_str(&format!("PATH={}:$PATH ", p.display()));
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
            shown_env.push_str(&format!("{k}={v} "));
        }
        if let Some(b) = opts.throttle_bps {
            shown_env.push_str(&format!("{THROTTLE_ENV}={b} "));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?);
        let command_line = crate::describe(&cmd);
        eprintln!(
            "+ {shown_env}{command_line}  (stderr: {})",
            stderr_path.display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {command_line}"))?;
        let token = std::fs::read_to_string(&token_file)
            .context("reading the token file")?
            .trim()
            .to_string();
        let mut node = NodeProcess {
            child: Some(child),
            url: String::new(),
            token,
            opts,
            run_dir,
            stderr_path,
            command_line,
            binary: binary.to_path_buf(),
            http: reqwest::Client::new(),
        };
        let logged = crate::wait_for_log_value(
            "sendense-node",
            &mut node.child,
            &node.stderr_path,
            "node serving",
            "api_url=",
            Duration::from_secs(30),
        )?;
        node.url = if node.opts.tunnel.is_some() {
            format!("http://{}", node.opts.listen)
        } else {
            logged
        };
        eprintln!("node pid {} at {}", node.pid(), node.url);
        Ok(node)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        crate::read_log(&self.stderr_path)
    }

    /// The QMP commands the node sent, from `<run_dir>/qmp.log` (one JSON object a line).
    pub fn qmp_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.run_dir.join("qmp.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// GET `/api/v1{path}` with the token: (status, JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.api().get(path).await
    }

    /// POST `/api/v1{path}` with the token and a JSON body: (status, JSON).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.api().post(path, &body).await
    }

    /// The node's API (`/api/v1`, with the token) through the hub's client.
    pub fn api(&self) -> crate::hub::Api {
        crate::hub::Api {
            base: format!("{}/api/v1", self.url),
            token: Some(self.token.clone()),
            http: self.http.clone(),
        }
    }

    /// Polls `GET path` until it answers 200 with a body `pred` holds on; panics after `secs`
    /// or when the node exits, with the last answer and the node's log.
    pub async fn wait_for(&self, path: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline && self.alive(),
                "{path} did not reach the expected state within {secs} s (node alive: {}); \
                 last {status} {body}\nnode log:\n{}",
                self.alive(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// [`NodeProcess::wait_for`] on backup `id`.
    pub async fn wait_job(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(&format!("/backup/{id}"), secs, pred).await
    }

    /// [`NodeProcess::wait_for`] on restore `id`.
    pub async fn wait_restore(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(&format!("/restore/{id}"), secs, pred).await
    }

    /// Whether the process still runs (not exited, not killed by the test).
    pub fn alive(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|c| crate::pid_alive(c.id()))
    }

    /// The ssh children of the node (its tunnel's).
    pub fn ssh_children(&self) -> Vec<u32> {
        crate::children(self.pid())
            .into_iter()
            .filter(|p| {
                sendense_shared::child::read_cmdline(*p)
                    .is_some_and(|c| c.first().is_some_and(|a| a.ends_with("ssh")))
            })
            .collect()
    }

    /// SIGKILL, as a crash (the tunnel's ssh, in a process group of its own, with it).
    pub fn kill9(&mut self) {
        if self.child.is_none() {
            return;
        }
        if self.opts.tunnel.is_some() {
            for pid in self.ssh_children() {
                eprintln!("+ kill -KILL {pid} (ssh of sendense-node)");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {} (sendense-node)", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `within`, then SIGKILL; answers the exit status if it stopped by
    /// itself in time.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref()?.id() as i32);
        eprintln!("+ kill -TERM {pid} (sendense-node)");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(Ok(Some(s))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("sendense-node pid {pid} ignored SIGTERM for {within:?}; SIGKILL");
        self.kill9();
        None
    }

    /// SIGKILL, then the same command again (same run directory: recovery runs).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        let again = NodeProcess::start(&self.binary, self.opts.clone())?;
        *self = again;
        Ok(())
    }
}

/// The node's copy throttle variable (`agent_node::copy::THROTTLE_ENV`; the harness does not
/// link the node).
const THROTTLE_ENV: &str = "SENDENSE_COPY_THROTTLE_BPS";

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
