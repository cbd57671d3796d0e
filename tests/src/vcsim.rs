//! A running vSphere simulator for a test: govmomi's simulator (Debian's
//! `golang-github-vmware-govmomi-dev`) started by the project's launcher (`tests/vcsim/`, Go,
//! built once per target directory) on 127.0.0.1 with TLS, one user, a datastore in a temporary
//! directory and one VM with disks keyed 2000, 2001, ... whose files exist at full size.
//!
//! The launcher makes the simulator behave like vSphere where a backup looks: a snapshot freezes
//! the disk files and the VM moves onto new ones, removal consolidates, changed block tracking
//! gives change ids and answers `QueryChangedDiskAreas` (from 64 KiB block hashes; the simulator
//! itself lacks the call), and `/folder/...` wants the SOAP session cookie. A plain-HTTP control
//! endpoint shows the snapshot tree and the disks' files, resets CBT and destroys the VM.
//!
//! The child runs in its own process group with its stdin piped: closing stdin (in `Drop`, or by
//! the test process dying) ends it; `Drop` also sends SIGTERM to the group, then SIGKILL.
//!
//! Submodules: `launcher` builds the Go launcher once per target directory; `soap` talks to the
//! simulator as a vSphere client would (SOAP calls, login, datastore reads through curl).

use anyhow::{Context, bail};
use serde::Deserialize;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

mod launcher;
mod soap;

pub use launcher::launcher_binary;

/// How a simulator is started.
#[derive(Debug, Clone)]
pub struct VcsimOptions {
    pub vm: String,
    /// Sizes of the VM's disks in bytes (multiples of 64 KiB).
    pub disks: Vec<u64>,
    pub user: String,
    pub password: String,
}

impl Default for VcsimOptions {
    fn default() -> Self {
        VcsimOptions {
            vm: "vm1".to_string(),
            disks: vec![64 << 20, 32 << 20],
            user: "backup@vsphere.local".to_string(),
            password: format!("pw-{}-{}", std::process::id(), nanos()),
        }
    }
}

/// One disk of the test VM as created.
#[derive(Debug, Clone, Deserialize)]
pub struct VcsimDisk {
    pub key: i32,
    pub label: String,
    pub unit_number: i32,
    pub capacity_bytes: u64,
    /// "[LocalDS_0] vm1/vm1.vmdk"
    pub file_name: String,
    /// The flat file on disk (".../vm1/vm1-flat.vmdk").
    pub path_on_disk: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VcsimVm {
    pub name: String,
    /// e.g. "vm-27"
    pub moref: String,
    pub uuid: String,
    pub disks: Vec<VcsimDisk>,
}

/// The launcher's ready file.
#[derive(Debug, Clone, Deserialize)]
struct Ready {
    url: String,
    sdk_url: String,
    user: String,
    cert_pem: PathBuf,
    cert_sha256: String,
    datacenter: String,
    datastore: String,
    datastore_dir: PathBuf,
    vm: VcsimVm,
    control_url: String,
    pid: u32,
}

/// A disk as the control endpoint shows it (of the VM or of a snapshot).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DiskState {
    pub key: i32,
    pub file_name: String,
    pub path_on_disk: PathBuf,
    /// Empty while change tracking is off.
    pub change_id: String,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SnapshotState {
    pub moref: String,
    pub name: String,
    pub description: String,
    /// The disks as the snapshot froze them.
    #[serde(default)]
    pub disks: Vec<DiskState>,
    #[serde(default)]
    pub children: Vec<SnapshotState>,
}

/// The VM as the simulator holds it now.
#[derive(Debug, Clone, Deserialize)]
pub struct VmState {
    pub name: String,
    pub moref: String,
    pub power_state: String,
    pub cbt_enabled: bool,
    pub snapshot_count: usize,
    #[serde(default)]
    pub snapshots: Option<Vec<SnapshotState>>,
    /// The running disks (after a snapshot: the new files that take writes).
    pub disks: Vec<DiskState>,
}

impl VmState {
    /// Every snapshot of the tree, parents before children.
    pub fn all_snapshots(&self) -> Vec<&SnapshotState> {
        fn walk<'a>(s: &'a [SnapshotState], out: &mut Vec<&'a SnapshotState>) {
            for n in s {
                out.push(n);
                walk(&n.children, out);
            }
        }
        let mut out = Vec::new();
        walk(self.snapshots.as_deref().unwrap_or_default(), &mut out);
        out
    }

    pub fn disk(&self, key: i32) -> Option<&DiskState> {
        self.disks.iter().find(|d| d.key == key)
    }
}

/// A running simulator; stopped in `Drop`.
pub struct Vcsim {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// "https://127.0.0.1:PORT" (the SOAP endpoint is `{url}/sdk`).
    pub url: String,
    pub sdk_url: String,
    pub user: String,
    pub password: String,
    /// The server's (self-signed) certificate, PEM: usable as a CA file.
    pub cert_pem: PathBuf,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub cert_sha256: String,
    pub datacenter: String,
    pub datastore: String,
    pub datastore_dir: PathBuf,
    pub vm: VcsimVm,
    /// "http://127.0.0.1:PORT" of the tests' control endpoint.
    pub control_url: String,
    pub log_path: PathBuf,
    password_file: PathBuf,
    pub command_line: String,
    /// Last: removed after the child is gone.
    pub dir: tempfile::TempDir,
}

impl Vcsim {
    /// Builds the launcher if needed, starts it and waits (30 s at most) for its ready file.
    pub fn start(opts: VcsimOptions) -> anyhow::Result<Vcsim> {
        let launcher = launcher_binary()?;
        let dir = tempfile::Builder::new().prefix("vcsim-").tempdir()?;
        let password_file = dir.path().join("password");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&password_file)
            .and_then(|mut f| f.write_all(opts.password.as_bytes()))
            .with_context(|| format!("writing {}", password_file.display()))?;
        let ready_path = dir.path().join("ready.json");
        let log_path = dir.path().join("launcher.log");
        let sizes: Vec<String> = opts
            .disks
            .iter()
            .map(|b| format!("{}K", b / 1024))
            .collect();
        let mut cmd = Command::new(&launcher);
        cmd.args(["-listen", "127.0.0.1:0", "-dir"])
            .arg(dir.path().join("datastore"))
            .arg("-ready")
            .arg(&ready_path)
            .args(["-user", &opts.user, "-password-file"])
            .arg(&password_file)
            .args(["-disks", &sizes.join(","), "-vm", &opts.vm]);
        let log = std::fs::File::create(&log_path)?;
        cmd.stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let command_line = crate::describe(&cmd);
        eprintln!("+ {command_line}  (log: {})", log_path.display());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {command_line}"))?;
        let stdin = child.stdin.take();
        let mut sim = Vcsim {
            child: Some(child),
            stdin,
            url: String::new(),
            sdk_url: String::new(),
            user: opts.user.clone(),
            password: opts.password.clone(),
            cert_pem: PathBuf::new(),
            cert_sha256: String::new(),
            datacenter: String::new(),
            datastore: String::new(),
            datastore_dir: PathBuf::new(),
            vm: VcsimVm {
                name: opts.vm.clone(),
                moref: String::new(),
                uuid: String::new(),
                disks: Vec::new(),
            },
            control_url: String::new(),
            log_path,
            password_file,
            command_line,
            dir,
        };
        let ready = sim.wait_ready(&ready_path, Duration::from_secs(30))?;
        sim.url = ready.url;
        sim.sdk_url = ready.sdk_url;
        sim.user = ready.user;
        sim.cert_pem = ready.cert_pem;
        sim.cert_sha256 = ready.cert_sha256;
        sim.datacenter = ready.datacenter;
        sim.datastore = ready.datastore;
        sim.datastore_dir = ready.datastore_dir;
        sim.vm = ready.vm;
        sim.control_url = ready.control_url;
        eprintln!(
            "vcsim pid {} at {} (control {}), VM {} {}",
            ready.pid, sim.url, sim.control_url, sim.vm.name, sim.vm.moref
        );
        Ok(sim)
    }

    fn wait_ready(&mut self, path: &Path, limit: Duration) -> anyhow::Result<Ready> {
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return serde_json::from_str(&text).with_context(|| {
                    format!("parsing the launcher's ready file {}", path.display())
                });
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the vcsim launcher exited with {status} before writing its ready file {}:\n{}",
                    path.display(),
                    self.log()
                );
            }
            if t.elapsed() > limit {
                bail!(
                    "the vcsim launcher did not write its ready file {} within {limit:?}:\n{}",
                    path.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The launcher's output so far.
    pub fn log(&self) -> String {
        crate::read_log(&self.log_path)
    }

    /// The password in a 0600 file, as the node's config wants it.
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// "host:port" of the SOAP server.
    pub fn host_port(&self) -> &str {
        self.url.trim_start_matches("https://")
    }

    /// The VM as the simulator holds it; `None` once it is gone (destroyed).
    pub fn state(&self) -> anyhow::Result<Option<VmState>> {
        let (status, body) = self.control("GET", &format!("/vms/{}", self.vm.name))?;
        match status {
            200 => Ok(Some(serde_json::from_slice(&body).with_context(|| {
                format!("parsing the VM state: {}", String::from_utf8_lossy(&body))
            })?)),
            404 => Ok(None),
            s => bail!(
                "GET /vms/{}: {s} {}",
                self.vm.name,
                String::from_utf8_lossy(&body)
            ),
        }
    }

    fn state_now(&self) -> anyhow::Result<VmState> {
        self.state()?
            .with_context(|| format!("VM {} no longer exists in the simulator", self.vm.name))
    }

    /// The names of every snapshot of the VM (none when the VM is gone).
    pub fn snapshot_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(match self.state()? {
            Some(s) => s.all_snapshots().iter().map(|s| s.name.clone()).collect(),
            None => Vec::new(),
        })
    }

    /// New change tracking ids on every disk: older change ids fault from now on.
    pub fn reset_cbt(&self) -> anyhow::Result<()> {
        let (status, body) = self.control("POST", &format!("/vms/{}/reset-cbt", self.vm.name))?;
        if status != 204 {
            bail!("reset-cbt: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Powers the VM off and deletes it with its files, as an admin would in vCenter.
    pub fn destroy_vm(&self) -> anyhow::Result<()> {
        let (status, body) = self.control("POST", &format!("/vms/{}/destroy", self.vm.name))?;
        if status != 204 {
            bail!("destroy: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Sets disk `key`'s mode (`backing.diskMode`: "persistent", "independent_persistent",
    /// "independent_nonpersistent"), as an admin would in the VM's settings.
    pub fn set_disk_mode(&self, key: i32, mode: &str) -> anyhow::Result<()> {
        let path = format!("/vms/{}/disk-mode?key={key}&mode={mode}", self.vm.name);
        let (status, body) = self.control("POST", &path)?;
        if status != 204 {
            bail!("disk-mode: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Turns changed block tracking on, as an admin would (ReconfigVM_Task through SOAP with
    /// the test's own session), and checks every disk got a change id.
    pub fn enable_change_tracking(&self) -> anyhow::Result<()> {
        let cookie = self.login_cookie(&self.user, &self.password)?;
        let (status, _, body) = self.soap_call(
            Some(&cookie),
            &format!(
                concat!(
                    r#"<ReconfigVM_Task xmlns="urn:vim25"><_this type="VirtualMachine">{}</_this>"#,
                    "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec></ReconfigVM_Task>"
                ),
                self.vm.moref
            ),
        )?;
        if status != 200 {
            bail!("ReconfigVM_Task: {status} {body}");
        }
        let state = self.state_now()?;
        if !state.cbt_enabled || state.disks.iter().any(|d| d.change_id.is_empty()) {
            bail!("change tracking did not come on: {state:?}");
        }
        Ok(())
    }

    /// The processes (pid, command line) whose command line names this simulator's address:
    /// the nbdkit (curl plugin) instances reading its datastore.
    pub fn clients_by_cmdline(&self) -> Vec<(u32, String)> {
        let needle = self.host_port().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(&needle) && crate::pid_alive(pid) && pid != std::process::id() {
                out.push((pid, cmdline.trim().to_string()));
            }
        }
        out
    }

    /// The file that takes the VM's writes to disk `key` now.
    pub fn current_disk_path(&self, key: i32) -> anyhow::Result<PathBuf> {
        let state = self.state_now()?;
        Ok(state
            .disk(key)
            .with_context(|| format!("VM {} has no disk {key}", self.vm.name))?
            .path_on_disk
            .clone())
    }

    /// Writes into the VM's disk `key` as its guest would (into the running file).
    pub fn write_disk(&self, key: i32, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let path = self.current_disk_path(key)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all_at(data, offset).with_context(|| {
            format!(
                "writing {} bytes at {offset} into {}",
                data.len(),
                path.display()
            )
        })?;
        f.sync_data()?;
        Ok(())
    }

    /// Reads the VM's disk `key` as it is now.
    pub fn read_disk(&self, key: i32, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        read_at(&self.current_disk_path(key)?, offset, len)
    }

    /// The whole content of disk `key` now (its full capacity).
    pub fn disk_image(&self, key: i32) -> anyhow::Result<Vec<u8>> {
        let state = self.state_now()?;
        let d = state
            .disk(key)
            .with_context(|| format!("VM {} has no disk {key}", self.vm.name))?;
        read_at(&d.path_on_disk, 0, d.capacity_bytes as usize)
    }

    /// The file a snapshot froze for disk `key`.
    pub fn snapshot_disk_path(&self, snapshot_name: &str, key: i32) -> anyhow::Result<PathBuf> {
        let state = self.state_now()?;
        let snap = state
            .all_snapshots()
            .into_iter()
            .find(|s| s.name == snapshot_name)
            .with_context(|| format!("no snapshot named {snapshot_name:?}"))?;
        Ok(snap
            .disks
            .iter()
            .find(|d| d.key == key)
            .with_context(|| format!("snapshot {snapshot_name:?} has no disk {key}"))?
            .path_on_disk
            .clone())
    }

    /// One request to the control endpoint (HTTP/1.0 over a plain socket, so it works from any
    /// context, including `Drop` and non-async tests).
    fn control(&self, method: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let host = self.control_url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(host)
            .with_context(|| format!("connecting to the vcsim control endpoint {host}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("{method} {path} on the vcsim control endpoint"))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no HTTP header end")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line: {head}"))?;
        Ok((status, raw[split + 4..].to_vec()))
    }

    /// Ends the launcher: stdin closed, SIGTERM to its group, SIGKILL after 5 s.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("vcsim pid {} ignored SIGTERM: SIGKILL", child.id());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_at(path: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {len} bytes at {offset} from {}", path.display()))?;
    Ok(buf)
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
