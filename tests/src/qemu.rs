//! A real QEMU VM for end-to-end tests: paused (`-S`, TCG), qcow2 disks attached as virtio-blk
//! devices `disk0`, `disk1`, ..., one QMP socket for the node and one for the test. Killed by
//! PID in `Drop`.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestVm {
    pub images: Vec<PathBuf>,
    pub node_qmp: PathBuf,
    pub test_qmp: PathBuf,
    child: Child,
}

impl TestVm {
    /// Starts QEMU over existing qcow2 images in `dir`.
    pub fn start(dir: &Path, images: Vec<PathBuf>) -> TestVm {
        let node_qmp = dir.join("node.qmp");
        let test_qmp = dir.join("test.qmp");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
        ]);
        for (i, img) in images.iter().enumerate() {
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name=file{i}",
                img.display()
            ));
            cmd.arg("-blockdev")
                .arg(format!("driver=qcow2,file=file{i},node-name=fmt{i}"));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,id=disk{i},drive=fmt{i}"));
        }
        for q in [&node_qmp, &test_qmp] {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", q.display()));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        eprintln!("+ {}", crate::describe(&cmd));
        let mut child = cmd.spawn().expect("spawning qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(node_qmp.exists() && test_qmp.exists()) {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("qemu exited early: {s}");
            }
            assert!(Instant::now() < deadline, "QEMU QMP sockets did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        TestVm {
            images,
            node_qmp,
            test_qmp,
            child,
        }
    }

    /// One QMP command on the test's socket; answers its `return`.
    pub fn qmp(&self, command: &str, arguments: Value) -> Value {
        let s = UnixStream::connect(&self.test_qmp).expect("test QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("QMP greeting");
        let mut send = |v: Value| -> Value {
            writeln!(w, "{v}").unwrap();
            loop {
                let mut l = String::new();
                r.read_line(&mut l).expect("QMP answer");
                let v: Value = serde_json::from_str(&l).expect("QMP JSON");
                if v.get("return").is_some() {
                    return v["return"].clone();
                }
                assert!(v.get("error").is_none(), "QMP error: {v}");
            }
        };
        send(json!({"execute": "qmp_capabilities"}));
        send(json!({"execute": command, "arguments": arguments}))
    }

    /// A guest write into disk `i` (HMP's qemu-io through QMP).
    pub fn guest_write(&self, disk: usize, pattern: u8, offset: u64, len: u64) {
        let line = format!(
            "qemu-io -d /machine/peripheral/disk{disk}/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = self.qmp("human-monitor-command", json!({"command-line": line}));
        assert_eq!(
            out.as_str().unwrap_or_default(),
            "",
            "guest write failed: {out}"
        );
    }

    /// Disk `i` as the guest sees it now, into a raw file (flushed first; `-U`: QEMU holds it).
    pub fn copy_disk_now(&self, disk: usize, dest: &Path) {
        let line = format!("qemu-io -d /machine/peripheral/disk{disk}/virtio-backend flush");
        self.qmp("human-monitor-command", json!({"command-line": line}));
        crate::run(
            Command::new("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(&self.images[disk])
                .arg(dest),
        );
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        eprintln!("+ kill -KILL {}", self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `sendense-node` binary, stopped (SIGTERM, then SIGKILL) in `Drop`.
pub struct NodeProcess {
    pub url: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts the node `name` serving `vm=qmp` on a free port, reporting to `hub_url`.
    pub fn start(
        dir: &Path,
        name: &str,
        vm: &str,
        qmp: &Path,
        hub_url: &str,
        token_file: &Path,
    ) -> NodeProcess {
        Self::start_with_env(dir, name, vm, qmp, hub_url, token_file, &[])
    }

    /// Like [`NodeProcess::start`] with extra environment (e.g. `SENDENSE_COPY_THROTTLE_BPS`).
    pub fn start_with_env(
        dir: &Path,
        name: &str,
        vm: &str,
        qmp: &Path,
        hub_url: &str,
        token_file: &Path,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let run_dir = dir.join(format!("{name}-run"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, format!("run_dir = \"{}\"\n", run_dir.display())).unwrap();
        let (port, _) = crate::net::free_port_range(1);
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(crate::bin_path("sendense-node"));
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--name", name])
            .arg("--token-file")
            .arg(token_file)
            .arg("--qmp")
            .arg(format!("{vm}={}", qmp.display()))
            .args(["--hub-url", hub_url])
            .env("RUST_LOG", "info,agent_node=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        eprintln!("+ {}  (log {})", crate::describe(&cmd), log.display());
        let child = cmd
            .spawn()
            .expect("spawning sendense-node (built? cargo build --workspace --bins)");
        NodeProcess {
            url: format!("http://127.0.0.1:{port}"),
            log,
            child: Some(child),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {}", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
