//! A real `qemu-nbd` serving one image for a test: the export a copy reads from or writes into
//! (a hub-side target, a backup point, a source). One builder covers every caller: TCP on a
//! free 127.0.0.1 port (or a given host and port) or a unix socket, read-only or writable, the
//! image's format, more flags; started synchronously ([`QemuNbdBuilder::start`]) or from async
//! code ([`QemuNbdBuilder::start_async`]), ready once a connect succeeds. The full command line
//! is printed; `Drop` SIGKILLs the process by its PID and reaps it.
//!
//! Defaults are what the hub's exports use: `--persistent --shared=8` (several connections,
//! multi-conn advertised), qcow2.

use sendense_shared::nbd::NbdAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the export listens.
#[derive(Debug, Clone)]
enum Listen {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// How to start a [`QemuNbd`]; from [`QemuNbd::builder`].
#[derive(Debug, Clone)]
pub struct QemuNbdBuilder {
    image: PathBuf,
    export: String,
    format: String,
    listen: Listen,
    read_only: bool,
    args: Vec<String>,
}

impl QemuNbdBuilder {
    /// `--format` (qcow2 unless told).
    pub fn format(mut self, format: &str) -> Self {
        self.format = format.to_string();
        self
    }

    /// TCP on `host:port` (the default is 127.0.0.1 and a free port).
    pub fn tcp_on(mut self, host: &str, port: u16) -> Self {
        self.listen = Listen::Tcp {
            host: host.to_string(),
            port,
        };
        self
    }

    /// A unix socket at `path` instead of TCP.
    pub fn unix(mut self, path: impl Into<PathBuf>) -> Self {
        self.listen = Listen::Unix(path.into());
        self
    }

    /// `--read-only`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// More flags, put before the image path (`--bitmap=...`, `--discard=unmap`, ...).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--format={}", self.format))
            .args(["--persistent", "--shared=8"])
            .arg(format!("--export-name={}", self.export));
        match &self.listen {
            Listen::Tcp { host, port } => {
                cmd.arg(format!("--bind={host}"))
                    .arg(format!("--port={port}"));
            }
            Listen::Unix(path) => {
                cmd.arg(format!("--socket={}", path.display()));
            }
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        cmd.args(&self.args)
            .arg(&self.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    fn spawn(self) -> QemuNbd {
        let mut cmd = self.command();
        let command_line = crate::describe(&cmd);
        eprintln!("+ {command_line}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command_line}: {e}"));
        let addr = match &self.listen {
            Listen::Tcp { host, port } => NbdAddr::Tcp {
                host: host.clone(),
                port: *port,
                export: self.export.clone(),
            },
            Listen::Unix(path) => NbdAddr::Unix {
                path: path.clone(),
                export: self.export.clone(),
            },
        };
        QemuNbd {
            child: Some(child),
            addr,
            image: self.image,
            export: self.export,
            command_line,
        }
    }

    /// Starts qemu-nbd and waits (blocking, up to 10 s) until it accepts connections.
    pub fn start(self) -> QemuNbd {
        let mut nbd = self.spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nbd.check_ready(deadline) {
            std::thread::sleep(Duration::from_millis(20));
        }
        nbd
    }

    /// [`QemuNbdBuilder::start`] for async code: the waits do not block the runtime's thread.
    pub async fn start_async(self) -> QemuNbd {
        let mut nbd = self.spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nbd.check_ready(deadline) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nbd
    }
}

/// A running `qemu-nbd`; SIGKILLed by PID and reaped in `Drop`.
pub struct QemuNbd {
    child: Option<Child>,
    /// Where it serves, as the NBD client takes it.
    pub addr: NbdAddr,
    pub image: PathBuf,
    pub export: String,
    pub command_line: String,
}

impl QemuNbd {
    /// A builder for `image` served as `export` (qcow2, TCP on 127.0.0.1 and a free port).
    pub fn builder(image: impl AsRef<Path>, export: &str) -> QemuNbdBuilder {
        QemuNbdBuilder {
            image: image.as_ref().to_path_buf(),
            export: export.to_string(),
            format: "qcow2".to_string(),
            listen: Listen::Tcp {
                host: "127.0.0.1".to_string(),
                port: crate::net::free_port(),
            },
            read_only: false,
            args: Vec::new(),
        }
    }

    /// Whether it accepts connections now; panics once it exited or `deadline` passed.
    fn check_ready(&mut self, deadline: Instant) -> bool {
        let ready = match &self.addr {
            NbdAddr::Tcp { host, port, .. } => {
                std::net::TcpStream::connect((host.as_str(), *port)).is_ok()
            }
            NbdAddr::Unix { path, .. } => std::os::unix::net::UnixStream::connect(path).is_ok(),
        };
        if ready {
            return true;
        }
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("{} exited early: {status}", self.command_line);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen within 10 s",
            self.command_line
        );
        false
    }

    /// The NBD URI (`nbd://host:port/export` or `nbd+unix:///export?socket=PATH`).
    pub fn uri(&self) -> String {
        match &self.addr {
            NbdAddr::Tcp { host, port, export } => format!("nbd://{host}:{port}/{export}"),
            NbdAddr::Unix { path, export } => {
                format!("nbd+unix:///{export}?socket={}", path.display())
            }
        }
    }

    /// The TCP port (panics for a unix socket).
    pub fn port(&self) -> u16 {
        match &self.addr {
            NbdAddr::Tcp { port, .. } => *port,
            NbdAddr::Unix { path, .. } => panic!("qemu-nbd serves {}, not TCP", path.display()),
        }
    }

    /// The TCP host (panics for a unix socket).
    pub fn host(&self) -> &str {
        match &self.addr {
            NbdAddr::Tcp { host, .. } => host,
            NbdAddr::Unix { path, .. } => panic!("qemu-nbd serves {}, not TCP", path.display()),
        }
    }

    /// The PID (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Freezes the server (SIGSTOP): a copy into it waits, which holds a job in flight.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`QemuNbd::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGKILL, like a crashed qemu-nbd; reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {} (qemu-nbd)", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server so the image can be read: resumed if paused, SIGTERM (qemu-nbd flushes
    /// and closes the image), up to 5 s, then SIGKILL; reaped.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        eprintln!("+ kill -TERM {pid} (qemu-nbd)");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("qemu-nbd {pid} ignored SIGTERM for 5 s; SIGKILL");
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}
