//! A running `sendense-node` for a test: API on a kernel-chosen port of 127.0.0.1 (read back
//! from its "node serving" log line), a run directory kept across restarts (so the start-up
//! recovery of a restarted node finds its journal), the hub's token file, and its VMs' QMP
//! sockets. Killed (SIGKILL) in `Drop`.

use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How a test node is started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Where the config file, the run directory and the logs live.
    pub dir: PathBuf,
    pub name: String,
    pub hub_url: Option<String>,
    pub token_file: PathBuf,
    /// `(vm_name, qmp_socket)`.
    pub vms: Vec<(String, PathBuf)>,
    /// `SENDENSE_COPY_THROTTLE_BPS`: each disk's copy reads at most this many bytes a second.
    pub throttle_bps: Option<u64>,
}

/// A `sendense-node` child process.
pub struct NodeProcess {
    child: Option<Child>,
    pub url: String,
    pub token: String,
    pub opts: NodeOptions,
    /// TOML appended to the generated config file (e.g. a `[vsphere]` table); kept for restarts.
    pub extra_config: String,
    pub run_dir: PathBuf,
    pub stderr_path: PathBuf,
    pub command_line: String,
    http: reqwest::Client,
}

impl NodeProcess {
    /// Starts the binary and waits until it serves.
    pub fn start(binary: &Path, opts: NodeOptions) -> anyhow::Result<NodeProcess> {
        NodeProcess::start_with_config(binary, opts, "")
    }

    /// Like [`NodeProcess::start`], with `extra_config` (TOML tables) appended to the config file.
    pub fn start_with_config(
        binary: &Path,
        opts: NodeOptions,
        extra_config: &str,
    ) -> anyhow::Result<NodeProcess> {
        std::fs::create_dir_all(&opts.dir)?;
        let run_dir = opts.dir.join("run");
        let config = opts.dir.join("node.toml");
        std::fs::write(
            &config,
            format!("run_dir = \"{}\"\n{extra_config}", run_dir.display()),
        )?;
        let stderr_path = opts.dir.join(format!(
            "node-stderr-{}.log",
            chrono::Utc::now().format("%H%M%S%.f")
        ));
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--name", &opts.name])
            .arg("--token-file")
            .arg(&opts.token_file);
        if let Some(h) = &opts.hub_url {
            cmd.args(["--hub-url", h]);
        }
        for (vm, sock) in &opts.vms {
            cmd.arg("--qmp").arg(format!("{vm}={}", sock.display()));
        }
        cmd.env_remove("SENDENSE_NODE_CONFIG")
            .env_remove("SENDENSE_NODE_QMP")
            .env("RUST_LOG", "info,agent_node=debug")
            .env("NO_COLOR", "1");
        match opts.throttle_bps {
            Some(b) => cmd.env(THROTTLE_ENV, b.to_string()),
            None => cmd.env_remove(THROTTLE_ENV),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?);
        let command_line = crate::describe(&cmd);
        eprintln!(
            "+ {}{command_line}  (stderr: {})",
            opts.throttle_bps
                .map(|b| format!("{}={b} ", THROTTLE_ENV))
                .unwrap_or_default(),
            stderr_path.display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {command_line}"))?;
        let token = std::fs::read_to_string(&opts.token_file)
            .context("reading the token file")?
            .trim()
            .to_string();
        let mut node = NodeProcess {
            child: Some(child),
            url: String::new(),
            token,
            opts,
            extra_config: extra_config.to_string(),
            run_dir,
            stderr_path,
            command_line,
            http: reqwest::Client::new(),
        };
        node.url = crate::wait_for_log_value(
            "sendense-node",
            &mut node.child,
            &node.stderr_path,
            "node serving",
            "api_url=",
            Duration::from_secs(30),
        )?;
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

    /// The node's API (`/api/v1`, with the token) through the hub's client.
    pub fn api(&self) -> crate::hub::Api {
        crate::hub::Api {
            base: format!("{}/api/v1", self.url),
            token: Some(self.token.clone()),
            http: self.http.clone(),
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {} (sendense-node)", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `within`, then SIGKILL; answers the exit status if it stopped by
    /// itself in time.
    pub fn terminate(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        eprintln!("+ kill -TERM {pid} (sendense-node)");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = std::time::Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("sendense-node pid {pid} ignored SIGTERM for {within:?}; SIGKILL");
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// SIGKILL, then the same command again (same run directory: recovery runs).
    pub fn restart(&mut self, binary: &Path) -> anyhow::Result<()> {
        self.kill9();
        let again = NodeProcess::start_with_config(binary, self.opts.clone(), &self.extra_config)?;
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
