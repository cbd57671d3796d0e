//! A real `qemu-system-x86_64` VM for end-to-end tests: qcow2 disks holding known data attached
//! as virtio-blk devices `disk0`, `disk1`, ..., paused (`-S`, TCG, no guest OS), with two QMP
//! sockets: one for the node under test, one for the test itself (guest writes, flushes, looking
//! for what the node left behind), and on request a third one for an observer of the test's
//! choosing. Killed by PID in `Drop`. The one VM of the node, hub and end-to-end tests.
//!
//! With [`VmOptions::guest`] the VM instead boots the real Linux guest of [`crate::guest`]
//! (running, 512 MiB): disk0 is its root, disk1 its data disk, the serial console goes to a
//! file ([`TestVm::wait_serial`]) and the guest agent's virtio port to a unix socket
//! ([`TestVm::qga_socket`]).
//!
//! The test's QMP client is deliberately its own small one (not the node's): the test must see
//! QEMU as it is, not as the node's code believes it is.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A minimal QMP client: one command at a time, events skipped.
pub struct Qmp {
    inner: tokio::sync::Mutex<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(socket: &Path) -> anyhow::Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to QMP {}", socket.display()))?;
        let (r, w) = stream.into_split();
        let qmp = Qmp {
            inner: tokio::sync::Mutex::new((BufReader::new(r), w)),
        };
        {
            let mut g = qmp.inner.lock().await;
            let mut line = String::new();
            g.0.read_line(&mut line).await?;
            anyhow::ensure!(line.contains("QMP"), "not a QMP greeting: {line}");
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command; answers its `return` value or fails with QEMU's error.
    pub async fn execute(&self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut g = self.inner.lock().await;
        let msg = json!({"execute": command, "arguments": arguments});
        g.1.write_all(format!("{msg}\n").as_bytes()).await?;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), g.0.read_line(&mut line))
                .await
                .with_context(|| format!("QMP {command}: no answer in 30 s"))??;
            if n == 0 {
                bail!("QMP {command}: connection closed");
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("QMP {command}: not JSON: {line}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
            // An event: not ours.
        }
    }

    /// `human-monitor-command`, answering HMP's text.
    pub async fn hmp(&self, line: &str) -> anyhow::Result<String> {
        let r = self
            .execute("human-monitor-command", json!({"command-line": line}))
            .await?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }
}

/// What a VM booting the real guest gets on top of its disks.
struct GuestBoot<'a> {
    images: &'a crate::guest::GuestImages,
    serial: &'a Path,
    append: String,
}

/// The guest agent's virtio port `org.qemu.guest_agent.0` on a unix socket QEMU listens on.
fn agent_channel(cmd: &mut Command, socket: &Path) {
    cmd.args(["-device", "virtio-serial", "-chardev"])
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            socket.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
}

/// The command line of a test VM: `-S`, TCG, no guest OS, qcow2 `images` as virtio-blk
/// devices `disk0`, `disk1`, ... (format nodes `fmtN` over file nodes `fileN`), and one QMP
/// server per socket of `qmp` (one client each: the node's, the test's, an observer's). With
/// `guest`: running, booting its kernel, serial console as it says; with `qga` the guest
/// agent's port on that socket.
fn vm_command(
    name: &str,
    images: &[PathBuf],
    qmp: &[&Path],
    guest: Option<&GuestBoot<'_>>,
    qga: Option<&Path>,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-nodefaults"]);
    cmd.args(["-display", "none", "-name", name]);
    match guest {
        None => cmd.args(["-S", "-m", "64"]),
        Some(g) => cmd
            .args(["-m", "512", "-kernel"])
            .arg(&g.images.kernel)
            .arg("-initrd")
            .arg(&g.images.initrd)
            .arg("-append")
            .arg(&g.append)
            .arg("-serial")
            .arg(format!("file:{}", g.serial.display())),
    };
    if let Some(socket) = qga {
        agent_channel(&mut cmd, socket);
    }
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
    for sock in qmp {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
    }
    cmd
}

/// How a [`TestVm`] is started.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// QEMU's `-name`, and the prefix of its files.
    pub name: String,
    /// Where the images, sockets and the QEMU log live; `None`: a temporary directory of the
    /// VM's own, deleted with it.
    pub dir: Option<PathBuf>,
    /// One qcow2 per size (bytes), attached as `disk0`, `disk1`, ... (ignored with `guest`).
    pub sizes: Vec<u64>,
    /// A third QMP socket ([`TestVm::observer_qmp`]) that nobody connects to, for a test that
    /// talks to QEMU through a client of its own choosing (e.g. the node's, to see its errors).
    pub observer_qmp: bool,
    /// The guest agent's virtio port on a socket ([`TestVm::qga_socket`]) even without a guest
    /// (then nothing answers on it); a VM with `guest` always has it.
    pub agent_channel: bool,
    /// Boot the real guest ([`crate::guest`]): disk0 its root, disk1 its data disk.
    pub guest: Option<GuestOptions>,
}

/// How the real guest boots.
#[derive(Debug, Clone, Default)]
pub struct GuestOptions {
    /// Boot with `sendense.qga=off`: the guest starts no agent.
    pub agent_off: bool,
}

/// A running QEMU VM.
pub struct TestVm {
    pub name: String,
    pub dir: PathBuf,
    pub images: Vec<PathBuf>,
    /// The socket the node is given (`--qmp NAME=SOCKET`).
    pub node_qmp: PathBuf,
    /// The socket of [`TestVm::qmp`], the test's own client.
    pub test_qmp: PathBuf,
    /// With [`VmOptions::observer_qmp`]: a free QMP socket.
    pub observer_qmp: Option<PathBuf>,
    /// With [`VmOptions::guest`]: the serial console's file and the guest agent's socket.
    pub serial_log: Option<PathBuf>,
    pub qga_socket: Option<PathBuf>,
    child: Option<Child>,
    qmp: Option<Qmp>,
    pub command_line: String,
    /// The directory when the VM owns it (removed after QEMU is killed).
    _tmp: Option<tempfile::TempDir>,
}

impl TestVm {
    /// Creates one qcow2 per size in `dir`, lets `prepare` write data into them (no process
    /// holds them yet), starts QEMU paused and connects the test's QMP client.
    pub async fn start(
        name: &str,
        dir: &Path,
        sizes: &[u64],
        prepare: impl FnOnce(&[PathBuf]),
    ) -> anyhow::Result<TestVm> {
        let opts = VmOptions {
            name: name.to_string(),
            dir: Some(dir.to_path_buf()),
            sizes: sizes.to_vec(),
            ..VmOptions::default()
        };
        TestVm::start_opts(opts, prepare).await
    }

    /// A VM named `vm1` in a temporary directory of its own (a node test's VM); panics when
    /// QEMU does not start.
    pub async fn temp(sizes: &[u64], prepare: impl FnOnce(&[PathBuf])) -> TestVm {
        let opts = VmOptions {
            name: "vm1".to_string(),
            sizes: sizes.to_vec(),
            ..VmOptions::default()
        };
        TestVm::start_opts(opts, prepare).await.expect("start QEMU")
    }

    /// [`TestVm::start`] as `opts` says.
    pub async fn start_opts(
        opts: VmOptions,
        prepare: impl FnOnce(&[PathBuf]),
    ) -> anyhow::Result<TestVm> {
        let name = opts.name.as_str();
        let (dir, tmp) = match &opts.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("sdvm-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&dir)?;
        let guest = match &opts.guest {
            Some(g) => Some((crate::guest::GuestImages::get()?, g.clone())),
            None => None,
        };
        let mut images = Vec::new();
        match &guest {
            Some((g, _)) => images = g.vm_disks(&dir, name)?,
            None => {
                for (i, size) in opts.sizes.iter().enumerate() {
                    let img = dir.join(format!("{name}-disk{i}.qcow2"));
                    crate::disks::create_qcow2(&img, *size);
                    images.push(img);
                }
            }
        }
        prepare(&images);
        let serial_log = guest
            .as_ref()
            .map(|_| dir.join(format!("{name}-serial.log")));
        let qga_socket =
            (guest.is_some() || opts.agent_channel).then(|| dir.join(format!("{name}-qga.sock")));
        let node_qmp = dir.join(format!("{name}-node.qmp"));
        let test_qmp = dir.join(format!("{name}-test.qmp"));
        let observer_qmp = opts
            .observer_qmp
            .then(|| dir.join(format!("{name}-observer.qmp")));
        let mut sockets = vec![node_qmp.as_path(), test_qmp.as_path()];
        sockets.extend(observer_qmp.as_deref());
        let boot = guest.as_ref().map(|(g, o)| GuestBoot {
            images: g,
            serial: serial_log.as_deref().expect("serial log"),
            append: format!(
                "console=ttyS0 root=/dev/vda rw quiet loglevel=1 panic=-1{}",
                if o.agent_off { " sendense.qga=off" } else { "" }
            ),
        });
        let mut cmd = vm_command(
            name,
            &images,
            &sockets,
            boot.as_ref(),
            qga_socket.as_deref(),
        );
        let log = std::fs::File::create(dir.join(format!("{name}-qemu.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let command_line = crate::describe(&cmd);
        eprintln!("+ {command_line}");
        let child = cmd.spawn().context("spawning qemu-system-x86_64")?;
        let mut vm = TestVm {
            name: name.to_string(),
            dir,
            images,
            node_qmp,
            test_qmp,
            observer_qmp,
            serial_log,
            qga_socket,
            child: Some(child),
            qmp: None,
            command_line,
            _tmp: tmp,
        };
        let t = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = vm.child.as_mut().map(|c| c.try_wait()) {
                bail!("qemu exited early: {status}");
            }
            let sockets_up = vm.node_qmp.exists()
                && vm.test_qmp.exists()
                && vm.observer_qmp.as_ref().is_none_or(|p| p.exists());
            if sockets_up && let Ok(q) = Qmp::connect(&vm.test_qmp).await {
                vm.qmp = Some(q);
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("QEMU's QMP sockets did not appear within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("qemu pid {} for VM {name}", vm.pid());
        Ok(vm)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The serial console's text so far (a guest VM; empty before the guest printed).
    pub fn serial(&self) -> String {
        self.serial_log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the serial console shows the line `line` (a guest VM), at most `within`;
    /// the error quotes the console's end.
    pub async fn wait_serial(&self, line: &str, within: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let text = self.serial();
            if text.lines().any(|l| l.trim() == line) {
                return Ok(());
            }
            if !crate::pid_alive(self.pid()) {
                bail!("qemu exited before the guest printed {line:?}");
            }
            if t.elapsed() > within {
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                bail!(
                    "the guest did not print {line:?} within {} s; its console ends: {:?}",
                    within.as_secs(),
                    tail.into_iter().rev().collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn qmp(&self) -> &Qmp {
        self.qmp.as_ref().expect("test QMP client")
    }

    /// A guest write into disk `disk` while the VM runs: HMP's `qemu-io` on the device's
    /// block backend (the path QEMU needs for a device's backend).
    pub async fn guest_write(&self, disk: usize, pattern: u8, offset: u64, len: u64) {
        let line = format!(
            "qemu-io -d /machine/peripheral/disk{disk}/virtio-backend \"write -P {pattern:#04x} {offset} {len}\""
        );
        let out = self.qmp().hmp(&line).await.expect("guest write");
        // qemu-io prints its result on QEMU's stdout, not in the answer; an error in the
        // command line itself comes back here.
        assert!(out.is_empty(), "guest write failed: {out}");
    }

    /// Disk `disk` as it reads now, into a raw file: QEMU flushes its caches of the disk, then
    /// the image is read with `-U` (QEMU holds its lock).
    pub async fn copy_disk_now(&self, disk: usize, dest: &Path) {
        let line = format!("qemu-io -d /machine/peripheral/disk{disk}/virtio-backend flush");
        self.qmp().hmp(&line).await.expect("flush through HMP");
        crate::run(
            Command::new("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(&self.images[disk])
                .arg(dest),
        );
    }

    /// What the node created in QEMU and did not remove: block nodes other than the VM's own
    /// (`fileN`, `fmtN`, QEMU's `#` ones), block exports, block jobs.
    pub async fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .expect("query-named-block-nodes");
        for n in nodes.as_array().into_iter().flatten() {
            let name = n["node-name"].as_str().unwrap_or_default();
            if !name.starts_with('#') && !name.starts_with("fmt") && !name.starts_with("file") {
                out.push(format!("block node {name}"));
            }
        }
        let exports = self
            .qmp()
            .execute("query-block-exports", json!({}))
            .await
            .expect("query-block-exports");
        for e in exports.as_array().into_iter().flatten() {
            out.push(format!("export {}", e["id"]));
        }
        let jobs = self
            .qmp()
            .execute("query-block-jobs", json!({}))
            .await
            .expect("query-block-jobs");
        for j in jobs.as_array().into_iter().flatten() {
            out.push(format!("block job {}", j["device"]));
        }
        out
    }

    /// Bitmaps on disk `disk`'s format node: (name, recording).
    pub async fn bitmaps(&self, disk: usize) -> Vec<(String, bool)> {
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .expect("query-named-block-nodes");
        let fmt = format!("fmt{disk}");
        nodes
            .as_array()
            .into_iter()
            .flatten()
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

    /// Resizes disk `disk` (QMP `block_resize` of its format node), as an operator growing a disk.
    pub async fn resize(&self, disk: usize, size: u64) {
        self.qmp()
            .execute(
                "block_resize",
                json!({"node-name": format!("fmt{disk}"), "size": size}),
            )
            .await
            .expect("block_resize");
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            eprintln!("+ kill -KILL {} (qemu)", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
