//! One system under test: a hub, a node registered with it, and a QEMU VM with two disks
//! holding known data that the node snapshots. Plus the checks every test repeats.

use sendense_tests::hub::{Api, HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess};
use sendense_tests::qemu::TestVm;
use sendense_tests::{bin_path, disks};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
/// Virtual size of each disk.
pub const DISK_SIZE: u64 = 128 * MIB;
/// What is written into disk `i` before the VM starts: `(offset, length, pattern + i)`.
pub const DATA: &[(u64, u64, u8)] = &[
    (0, 16 * MIB, 0x10),
    (40 * MIB, 16 * MIB, 0x20),
    (100 * MIB, 4 * MIB, 0x30),
];
/// Bytes of data per disk.
pub const DATA_BYTES: u64 = 36 * MIB;
/// Bound on every job in these tests (the slowest, throttled, takes a few seconds).
pub const JOB_LIMIT: Duration = Duration::from_secs(120);
/// Copy rate of the throttled tests: the data of a disk takes about 3 s, long enough to act
/// on a copy mid-way without timed sleeps.
pub const SLOW_BPS: u64 = 12 * MIB;

pub fn hub_bin() -> PathBuf {
    let p = bin_path("sendense-hub");
    assert!(
        p.exists(),
        "{} missing: cargo build -p agent-hub -p agent-node --bins",
        p.display()
    );
    p
}

pub fn node_bin() -> PathBuf {
    let p = bin_path("sendense-node");
    assert!(
        p.exists(),
        "{} missing: cargo build -p agent-hub -p agent-node --bins",
        p.display()
    );
    p
}

/// A hub config file that checks on a silent node every second and gives it up after 3 s.
/// Starts a full backup of `vm` and asserts that it completes (the job's events and the node's
/// stderr otherwise): the last step of the tunnel tests, once the tunnel carries the job.
pub async fn full_backup_completes(api: &Api, vm: &str, node: &NodeProcess) -> Value {
    let (s, b) = api
        .post(
            "/api/v1/backups",
            &json!({"vm_name": vm, "repository_id": "default", "backup_type": "full"}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let id = b["backup_id"].as_str().unwrap().to_string();
    let done = api
        .wait_status(&id, &["completed", "failed", "cancelled"], JOB_LIMIT)
        .await;
    assert_eq!(
        done["status"],
        "completed",
        "{done:#}\nevents: {:#?}\nnode: {}",
        api.event_lines(&id).await,
        node.stderr()
    );
    done
}

/// The hub's exports without TLS (`--nbd-tls false`) on TCP (`--nbd-listen tcp`): for tests
/// whose second NBD client (qemu-io at `nbd://127.0.0.1:PORT`) stands for a fault in the write
/// path or the storage.
pub fn plain_nbd(o: &mut HubOptions, _dir: &Path) {
    o.extra_args
        .extend(["--nbd-tls".to_string(), "false".to_string()]);
    o.extra_args
        .extend(["--nbd-listen".to_string(), "tcp".to_string()]);
}

/// The node's `--tunnel-hub-nbd-dir` for a test hub: its default `<data>/nbd`.
pub fn hub_nbd_dir_args(hub: &HubOptions) -> Vec<String> {
    vec![
        "--tunnel-hub-nbd-dir".to_string(),
        hub.data_dir.join("nbd").display().to_string(),
    ]
}

pub fn quick_node_watch(o: &mut HubOptions, dir: &Path) {
    let cfg = dir.join("hub.toml");
    std::fs::write(
        &cfg,
        "node_watch_interval_secs = 1\nnode_lost_after_secs = 3\n",
    )
    .unwrap();
    o.extra_args
        .extend(["--config".into(), cfg.display().to_string()]);
}

/// Adjusts the hub's options; gets the test's temporary directory (for config files, wrappers).
pub type HubTweak = Box<dyn FnOnce(&mut HubOptions, &Path)>;

/// Adjusts the node's options before it starts.
pub type NodeTweak = Box<dyn FnOnce(&mut NodeOptions)>;

/// How a system is started.
#[derive(Default)]
pub struct SysOptions {
    pub throttle_bps: Option<u64>,
    /// Number of NBD ports of the hub (default 8).
    pub ports: Option<u16>,
    /// Change the hub's options (PATH, config file, listen address).
    pub hub: Option<HubTweak>,
    /// Change the node's options (environment, flags).
    pub node: Option<NodeTweak>,
}

pub struct Sys {
    pub hub: HubProcess,
    pub api: Api,
    pub node: NodeProcess,
    pub vm: TestVm,
    pub vm_name: String,
    pub repository: String,
    /// Last: removed after every process above is gone.
    pub tmp: tempfile::TempDir,
}

impl Sys {
    pub async fn start(vm_name: &str, opts: SysOptions) -> Sys {
        let tmp = tempfile::Builder::new()
            .prefix("sde2e-")
            .tempdir()
            .expect("temp dir");
        let mut hopts = HubOptions::new(tmp.path().join("hub"));
        if let Some(n) = opts.ports {
            hopts.nbd_ports = Some(sendense_tests::net::free_port_range(n));
        }
        if let Some(f) = opts.hub {
            f(&mut hopts, tmp.path());
        }
        let hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
        let api = hub.api();
        let vm = TestVm::start(
            vm_name,
            &tmp.path().join("vm"),
            &[DISK_SIZE, DISK_SIZE],
            |imgs| {
                for (i, img) in imgs.iter().enumerate() {
                    for (off, len, pat) in DATA {
                        disks::write_pattern(img, *off, *len, pat + i as u8);
                    }
                }
            },
        )
        .await
        .expect("start QEMU");
        let mut nopts = node_options(
            &hub,
            tmp.path(),
            vm_name,
            vec![(vm_name.to_string(), vm.node_qmp.clone())],
            opts.throttle_bps,
        );
        if let Some(f) = opts.node {
            f(&mut nopts);
        }
        let node = NodeProcess::start(&node_bin(), nopts).expect("start sendense-node");
        let sys = Sys {
            hub,
            api,
            node,
            vm,
            vm_name: vm_name.to_string(),
            repository: "default".into(),
            tmp,
        };
        sys.wait_vm_imported(DISK_SIZE).await;
        sys
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// SIGKILLs the node if it runs, starts it again on the same run directory (its start-up
    /// recovery runs) and waits until the hub knows its new API address.
    pub async fn restart_node(&mut self) {
        self.node.restart().expect("restart node");
        wait_node_registered(&self.api, &self.node).await;
    }

    /// The job calls and hub-side checks shared with the vSphere system.
    pub fn jobs(&self) -> Jobs<'_> {
        Jobs {
            api: &self.api,
            node: &self.node,
            vm: &self.vm_name,
            repository: &self.repository,
        }
    }

    /// Waits until the hub lists the VM as the node's, with both disks of `size` bytes.
    pub async fn wait_vm_imported(&self, size: u64) -> Value {
        self.jobs()
            .wait_vm_imported(|d| d.len() == 2 && d.iter().all(|d| d["size_bytes"] == size))
            .await
    }

    /// Starts a backup that must be accepted; answers its id.
    pub async fn backup(&self, kind: &str) -> (String, Value) {
        self.jobs().backup(kind).await
    }

    /// See [`Jobs::wait_node_copying`].
    pub async fn wait_node_copying(&self, id: &str) -> Value {
        self.jobs().wait_node_copying(id).await
    }

    /// Waits for a terminal status.
    pub async fn wait_end(&self, id: &str) -> Value {
        self.jobs().wait_end(id).await
    }

    /// See [`Jobs::wait_completed`].
    pub async fn wait_completed(&self, id: &str) -> Value {
        self.jobs().wait_completed(id).await
    }

    /// Every disk of the VM as it reads now, into `<tmp>/<tag>-diskN.raw`.
    pub async fn disks_now(&self, tag: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for i in 0..self.vm.images.len() {
            let p = self.path(&format!("{tag}-disk{i}.raw"));
            self.vm.copy_disk_now(i, &p).await;
            out.push(p);
        }
        out
    }

    /// Asserts what an operator checks after a job, whatever its end: no qemu-nbd of it alive,
    /// its ports free (bindable), nothing recorded held, nothing of the snapshot left in QEMU or
    /// in the node's run directory (the node may still be releasing: bounded wait), and when
    /// the job did not complete, no image of it on disk.
    pub async fn assert_clean(&self, backup: &Value) {
        let id = backup["backup_id"].as_str().unwrap();
        self.jobs().assert_hub_released(backup).await;
        let t = Instant::now();
        loop {
            let left = self.vm.leftovers().await;
            let files: Vec<String> = std::fs::read_dir(&self.node.run_dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| {
                            n.starts_with("sdfl-")
                                || n.starts_with("journal-")
                                || n.starts_with("nbd-")
                        })
                        .collect()
                })
                .unwrap_or_default();
            if left.is_empty() && files.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "backup {id}: snapshot not released within 30 s: QEMU has {left:?}, run dir has \
                 {files:?}\nnode log:\n{}",
                self.node.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The event log as `step: message` lines.
    pub async fn events(&self, id: &str) -> Vec<String> {
        self.api.event_lines(id).await
    }

    /// See [`Jobs::assert_event`].
    pub async fn assert_event(&self, id: &str, step: &str, words: &[&str]) {
        self.jobs().assert_event(id, step, words).await
    }

    /// Restores disk `key` of backup `id` into a new image `<tmp>/<name>` on the node through
    /// `POST /api/v1/restores`, waits for its end and answers it (whatever the outcome).
    pub async fn restore(&self, id: &str, key: i64, name: &str) -> (Value, PathBuf) {
        let path = self.path(name);
        let (s, r) = self
            .api
            .post(
                "/api/v1/restores",
                &json!({"backup_id": id, "disk_key": key,
                        "target": {"node": self.node.opts.name, "path": path.display().to_string()}}),
            )
            .await;
        assert_eq!(s, 202, "POST /api/v1/restores: {r}");
        let rid = r["restore_id"].as_str().unwrap().to_string();
        let t = Instant::now();
        loop {
            let r = self.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
            if terminal(&r) {
                return (r, path);
            }
            assert!(t.elapsed() < JOB_LIMIT, "restore {rid} did not end: {r:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A backup of the VM that must complete (the system recovered from whatever happened).
    pub async fn backup_completes(&self, kind: &str) -> Value {
        let (id, _) = self.backup(kind).await;
        let b = self.wait_completed(&id).await;
        self.assert_clean(&b).await;
        b
    }
}

/// The options of the node `node-<vm>` of a test system: under `<tmp>/node`, registered with
/// `hub`, backing up `qmp_vms` (none for a vSphere node).
pub fn node_options(
    hub: &HubProcess,
    tmp: &Path,
    vm: &str,
    qmp_vms: Vec<(String, PathBuf)>,
    throttle_bps: Option<u64>,
) -> NodeOptions {
    NodeOptions {
        hub_url: Some(hub.url.clone()),
        // The node's own credential, enrolled at the hub (never the hub's admin token).
        token_file: Some(
            hub.node_credential(&format!("node-{vm}"))
                .expect("enrolling the node"),
        ),
        vms: qmp_vms,
        throttle_bps,
        ..NodeOptions::new(tmp.join("node"), &format!("node-{vm}"))
    }
}

/// A hub and a node that backs a VM up, borrowed from a test system ([`Sys`] with a QEMU VM, or
/// the vSphere one): the job calls and checks that do not depend on where the VM runs.
pub struct Jobs<'a> {
    pub api: &'a Api,
    pub node: &'a NodeProcess,
    pub vm: &'a str,
    pub repository: &'a str,
}

impl Jobs<'_> {
    /// Waits until the hub lists the VM as the node's, with disks that `disks_ok` accepts.
    pub async fn wait_vm_imported(&self, disks_ok: impl Fn(&[Value]) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let (s, v) = self.api.get(&format!("/api/v1/vms/{}", self.vm)).await;
            if s == 200
                && v["node"] == json!(self.node.opts.name)
                && v["disks"].as_array().is_some_and(|d| disks_ok(d))
            {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "VM {} not imported from the node within 30 s: {s} {v}\nnode log:\n{}",
                self.vm,
                self.node.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn start_backup(&self, kind: &str) -> (u16, Value) {
        self.api
            .post(
                "/api/v1/backups",
                &json!({"vm_name": self.vm, "repository_id": self.repository, "backup_type": kind}),
            )
            .await
    }

    /// Starts a backup that must be accepted; answers its id and the hub's answer.
    pub async fn backup(&self, kind: &str) -> (String, Value) {
        let (s, b) = self.start_backup(kind).await;
        assert_eq!(s, 202, "POST /api/v1/backups ({kind}): {b}");
        (b["backup_id"].as_str().expect("backup_id").to_string(), b)
    }

    /// Waits until the node copies: its job is `running` (the snapshot is taken) and some
    /// bytes were read on every disk.
    pub async fn wait_node_copying(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let (s, v) = self.node.get(&format!("/backup/{id}")).await;
            if s == 200
                && v["status"] == "running"
                && v["disks"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["bytes_read"].as_u64() > Some(0)))
            {
                return v;
            }
            let hub = self.api.get_ok(&format!("/api/v1/backups/{id}")).await;
            assert!(
                t.elapsed() < Duration::from_secs(60) && !terminal(&hub),
                "node never copied backup {id}: node {s} {v}\nhub {hub:#}\nevents {:#?}\nnode log:\n{}",
                self.api.event_lines(id).await,
                self.node.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a terminal status.
    pub async fn wait_end(&self, id: &str) -> Value {
        self.api
            .wait_status(id, &["completed", "failed", "cancelled"], JOB_LIMIT)
            .await
    }

    /// Waits for `completed`, with the events and the node's log in the message when it ends
    /// otherwise.
    pub async fn wait_completed(&self, id: &str) -> Value {
        let b = self.wait_end(id).await;
        assert_eq!(
            b["status"],
            "completed",
            "backup {id}: {b:#}\nevents: {:#?}\nnode log:\n{}",
            self.api.event_lines(id).await,
            self.node.stderr()
        );
        b
    }

    /// Asserts an event whose step is `step` and whose line contains every one of `words`.
    pub async fn assert_event(&self, id: &str, step: &str, words: &[&str]) {
        let ev = self.api.event_lines(id).await;
        assert!(
            ev.iter().any(|e| e.starts_with(&format!("{step}:"))
                && words
                    .iter()
                    .all(|w| e.to_lowercase().contains(&w.to_lowercase()))),
            "backup {id}: no event {step} mentioning {words:?}:\n{ev:#?}"
        );
    }

    /// The hub's half of "nothing left" after a job, whatever its end: nothing held
    /// ([`Api::assert_nothing_held`]), its ports free (bindable), and when the job did not
    /// complete, no image of it on disk.
    pub async fn assert_hub_released(&self, backup: &Value) {
        self.api.assert_nothing_held(backup).await;
        for d in backup["disk_results"].as_array().into_iter().flatten() {
            if let Some(port) = d["nbd_port"].as_u64() {
                assert!(
                    std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok(),
                    "port {port} of disk {} still bound",
                    d["disk_key"]
                );
            }
            if backup["status"] != "completed" {
                let p = Path::new(d["qcow2_path"].as_str().unwrap());
                assert!(!p.exists(), "partial image {} left behind", p.display());
            }
        }
    }
}

pub fn terminal(b: &Value) -> bool {
    ["completed", "failed", "cancelled"]
        .iter()
        .any(|s| b["status"] == *s)
}

pub use sendense_tests::hub::{disk_result as disk, image_paths};

/// One number of every disk of a VM as the hub lists it (`disk_key`, `unit_number`,
/// `size_bytes`), in the hub's order.
pub fn disk_numbers(vm: &Value, field: &str) -> Vec<u64> {
    vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} of a disk in {vm}"))
        })
        .collect()
}

/// Waits until the hub knows the node's (new) API address, as after a restart.
pub async fn wait_node_registered(api: &Api, node: &NodeProcess) {
    let t = Instant::now();
    loop {
        let (s, n) = api.get(&format!("/api/v1/nodes/{}", node.opts.name)).await;
        if s == 200 && n["api_url"] == json!(node.url) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "restarted node not registered again: {s} {n}\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
