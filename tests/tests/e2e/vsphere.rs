//! vSphere: backups of a simulated vSphere VM (the harness's [`sendense_tests::vcsim`], itself
//! checked in [`super::vcsim_harness`]) through the real hub and node.

use super::sys::{
    JOB_LIMIT, Jobs, disk, disk_numbers, hub_bin, node_bin, node_options, wait_node_registered,
};
use sendense_tests::disks;
use sendense_tests::hub::{Api, HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess};
use sendense_tests::vcsim::{Vcsim, VcsimOptions};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

const DISK_SIZES: [u64; 2] = [64 * MIB, 32 * MIB];
const KEYS: [i32; 2] = [2000, 2001];
/// Data written into each disk before the first backup: `(offset, length, pattern)`.
const DATA: [&[(u64, u64, u8)]; 2] = [
    &[(0, 8 * MIB, 0x11), (40 * MIB, 8 * MIB, 0x12)],
    &[(4 * MIB, 8 * MIB, 0x21)],
];
/// Copy rate of the throttled tests (per disk): the data of disk 2000 takes about 4 s.
const SLOW_BPS: u64 = 4 * MIB;

/// How the node trusts the simulator.
#[derive(Clone, Copy, PartialEq)]
enum Trust {
    CaFile,
    Pinned,
}

struct VOpts {
    throttle_bps: Option<u64>,
    trust: Trust,
    /// Overrides of the node's `[vsphere]` keys (url, password file) for the error tests.
    url: Option<String>,
    password: Option<String>,
    /// Wait until the hub lists the VM.
    wait_import: bool,
    /// The hub checks a silent node every second and gives it up after 3 s (crash tests).
    quick_node_watch: bool,
}

impl Default for VOpts {
    fn default() -> Self {
        VOpts {
            throttle_bps: None,
            trust: Trust::CaFile,
            url: None,
            password: None,
            wait_import: true,
            quick_node_watch: false,
        }
    }
}

impl VOpts {
    /// A node whose copies are throttled to [`SLOW_BPS`], so that a test can act mid-copy.
    fn slow() -> Self {
        VOpts {
            throttle_bps: Some(SLOW_BPS),
            ..Default::default()
        }
    }
}

/// A simulator, a hub and a node whose only source is the simulator's VM.
struct VSys {
    node: NodeProcess,
    api: Api,
    /// Kept alive for the test (stopped in `Drop`).
    _hub: HubProcess,
    sim: Vcsim,
    vm: String,
    tmp: tempfile::TempDir,
}

impl VSys {
    async fn start(vm: &str, opts: VOpts) -> VSys {
        let tmp = tempfile::Builder::new()
            .prefix("sdvs-")
            .tempdir()
            .expect("temp dir");
        let sim = Vcsim::start(VcsimOptions {
            vm: vm.to_string(),
            disks: DISK_SIZES.to_vec(),
            ..Default::default()
        })
        .expect("start the vSphere simulator");
        let mut hopts = HubOptions::new(tmp.path().join("hub"));
        if opts.quick_node_watch {
            let cfg = tmp.path().join("hub.toml");
            std::fs::write(
                &cfg,
                "node_watch_interval_secs = 1\nnode_lost_after_secs = 3\n",
            )
            .unwrap();
            hopts
                .extra_args
                .extend(["--config".into(), cfg.display().to_string()]);
        }
        let hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
        let api = hub.api();
        let password_file = match &opts.password {
            Some(p) => {
                let f = tmp.path().join("wrong-password");
                std::fs::write(&f, p).unwrap();
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
                f
            }
            None => sim.password_file().to_path_buf(),
        };
        let trust = match opts.trust {
            Trust::CaFile => format!("ca_file = \"{}\"\n", sim.cert_pem.display()),
            Trust::Pinned => format!("thumbprint_sha256 = \"{}\"\n", sim.cert_sha256),
        };
        let vsphere = format!(
            "[vsphere]\nurl = \"{}\"\nuser = \"{}\"\npassword_file = \"{}\"\n{trust}vms = [\"{vm}\"]\n",
            opts.url.as_deref().unwrap_or(&sim.url),
            sim.user,
            password_file.display(),
        );
        let node = NodeProcess::start(
            &node_bin(),
            NodeOptions {
                extra_config: vsphere,
                ..node_options(&hub, tmp.path(), vm, Vec::new(), opts.throttle_bps)
            },
        )
        .expect("start sendense-node");
        let sys = VSys {
            node,
            api,
            _hub: hub,
            sim,
            vm: vm.to_string(),
            tmp,
        };
        if opts.wait_import {
            sys.wait_vm_imported().await;
        }
        sys
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The job calls and hub-side checks shared with the QEMU system.
    fn jobs(&self) -> Jobs<'_> {
        Jobs {
            api: &self.api,
            node: &self.node,
            vm: &self.vm,
            repository: "default",
        }
    }

    /// Waits until the hub lists the VM as the node's, with both disks.
    async fn wait_vm_imported(&self) -> Value {
        self.jobs().wait_vm_imported(|d| d.len() == 2).await
    }

    /// A full backup, answered once the node copies it (the snapshot exists).
    async fn full_copying(&self) -> String {
        let (id, _) = self.jobs().backup("full").await;
        self.jobs().wait_node_copying(&id).await;
        id
    }

    /// A backup that must complete and leave nothing behind: its id and its end.
    async fn backup_completes(&self, kind: &str) -> (String, Value) {
        let (id, _) = self.jobs().backup(kind).await;
        let b = self.jobs().wait_completed(&id).await;
        self.assert_clean(&b).await;
        (id, b)
    }

    /// Writes the test's data into both disks.
    fn write_data(&self) {
        for (i, key) in KEYS.iter().enumerate() {
            for (off, len, pat) in DATA[i] {
                self.sim
                    .write_disk(*key, *off, &vec![*pat; *len as usize])
                    .unwrap();
            }
        }
    }

    /// Both disks as they are now, into `<tmp>/<tag>-<key>.raw` (the expected backup content
    /// when a snapshot is taken before anyone writes again).
    fn disks_now(&self, tag: &str) -> Vec<PathBuf> {
        KEYS.iter()
            .map(|key| {
                let p = self.path(&format!("{tag}-{key}.raw"));
                std::fs::write(&p, self.sim.disk_image(*key).unwrap()).unwrap();
                p
            })
            .collect()
    }

    /// Nothing of the job is left, whatever its end: no snapshot in the simulator, no nbdkit
    /// reading its datastore, no nbdkit file in the node's run directory, no hub port or
    /// process held, no partial image of a job that did not complete. The node may still be
    /// releasing: bounded wait.
    async fn assert_clean(&self, backup: &Value) {
        let id = backup["backup_id"].as_str().unwrap_or_default();
        let t = Instant::now();
        loop {
            let snapshots = self.sim.snapshot_names().unwrap();
            let readers = self.sim.clients_by_cmdline();
            let files: Vec<String> = std::fs::read_dir(&self.node.run_dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("nbdkit-"))
                        .collect()
                })
                .unwrap_or_default();
            if snapshots.is_empty() && readers.is_empty() && files.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "backup {id}: not released within 30 s: snapshots {snapshots:?}, processes \
                 {readers:?}, run dir {files:?}\nnode log:\n{}",
                self.node.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.jobs().assert_hub_released(backup).await;
    }
}

fn images(b: &Value) -> Vec<PathBuf> {
    let mut d: Vec<&Value> = b["disk_results"].as_array().unwrap().iter().collect();
    d.sort_by_key(|d| d["disk_key"].as_i64());
    d.iter()
        .map(|d| PathBuf::from(d["qcow2_path"].as_str().unwrap()))
        .collect()
}

/// Full then incremental of the 2-disk VM: one snapshot per job (seen in the simulator while
/// the node copies, named after the backup), removed afterwards; the images hold the disks at
/// the snapshot instant (later writes absent); the incremental copies about the changed blocks
/// (QueryChangedDiskAreas against the stored change ids) and its chain top equals the second
/// instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_full_then_incremental_from_one_snapshot_each() {
    let sys = VSys::start("vsvm1", VOpts::slow()).await;
    // Inventory: keys, distinct units, sizes.
    let vm = sys.wait_vm_imported().await;
    assert_eq!(disk_numbers(&vm, "disk_key"), [2000, 2001], "{vm}");
    assert_eq!(disk_numbers(&vm, "unit_number"), [0, 1], "{vm}");
    assert_eq!(disk_numbers(&vm, "size_bytes"), DISK_SIZES, "{vm}");

    sys.sim.enable_change_tracking().unwrap();
    sys.write_data();
    let at_full = sys.disks_now("at-full");

    // 1. Full: exactly one snapshot while the node copies; writes after it are not backed up.
    let id = sys.full_copying().await;
    let state = sys.sim.state().unwrap().unwrap();
    let names: Vec<&str> = state
        .all_snapshots()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names.len(), 1, "one snapshot during the job: {names:?}");
    assert!(
        names[0].contains(&id),
        "snapshot {:?} does not name backup {id}",
        names[0]
    );
    // The change ids the snapshot froze: the hub must store them with the backup's disks.
    let frozen_ids: Vec<String> = state.all_snapshots()[0]
        .disks
        .iter()
        .map(|d| d.change_id.clone())
        .collect();
    assert!(frozen_ids.iter().all(|c| !c.is_empty()), "{state:?}");
    for key in KEYS {
        sys.sim
            .write_disk(key, 0, &vec![0x99; 4 * MIB as usize])
            .unwrap();
        sys.sim
            .write_disk(key, 20 * MIB, &vec![0x98; MIB as usize])
            .unwrap();
    }
    let full = sys.jobs().wait_completed(&id).await;
    sys.assert_clean(&full).await;
    assert_eq!(full["backup_type"], "full", "{full:#}");
    for (i, img) in images(&full).iter().enumerate() {
        assert!(
            disks::raw_equals_qcow2(&at_full[i], img),
            "full backup of disk {} ({}) differs from the disk at the snapshot instant",
            KEYS[i],
            img.display()
        );
    }
    let ver = sys
        .api
        .get_ok(&format!("/api/v1/backups/{id}/verification"))
        .await;
    let mut stored: Vec<(i64, String)> = ver
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["checksum_status"], "passed", "{ver}");
            (
                d["disk_key"].as_i64().unwrap(),
                d["change_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    stored.sort();
    assert_eq!(
        stored.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(),
        frozen_ids,
        "the hub's change ids differ from the snapshot's: {ver}"
    );
    // The writes made during the copy did land in the VM (so their absence means something).
    assert!(sys.sim.read_disk(2000, 0, 16).unwrap() == [0x99; 16]);

    // 2. Incremental: the writes made during the full's copy plus these.
    sys.sim
        .write_disk(2000, 30 * MIB, &vec![0x77; 3 * 64 * 1024])
        .unwrap();
    sys.sim
        .write_disk(2001, 31 * MIB, &vec![0x78; 64 * 1024])
        .unwrap();
    let changed = [4 * MIB + MIB + 3 * 64 * 1024, 4 * MIB + MIB + 64 * 1024];
    let at_incr = sys.disks_now("at-incr");
    let (id2, incr) = sys.backup_completes("incremental").await;
    assert_eq!(incr["backup_type"], "incremental", "{incr:#}");
    let node_view = sys.node.get(&format!("/backup/{id2}")).await.1;
    for (i, key) in KEYS.iter().enumerate() {
        let nd = node_view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["disk_key"] == *key)
            .unwrap_or_else(|| panic!("disk {key} in {node_view}"));
        let written = nd["bytes_written"].as_u64().unwrap();
        assert!(
            written >= changed[i] && written <= changed[i] + MIB,
            "disk {key}: the incremental wrote {written} bytes, {} changed: {nd}",
            changed[i]
        );
    }
    let ver = sys
        .api
        .get_ok(&format!("/api/v1/backups/{id2}/verification"))
        .await;
    for d in ver.as_array().unwrap() {
        assert_eq!(d["parent_backup_id"], json!(id), "{ver}");
        assert_eq!(d["checksum_status"], "passed", "{ver}");
        let i = KEYS.iter().position(|k| d["disk_key"] == *k).unwrap();
        let sent = d["bytes_transferred"].as_u64().unwrap_or(0);
        assert!(
            sent >= changed[i] && sent <= changed[i] + MIB,
            "hub: disk {} got {sent} bytes, {} changed: {ver}",
            KEYS[i],
            changed[i]
        );
    }
    for (i, img) in images(&incr).iter().enumerate() {
        assert!(
            disks::raw_equals_qcow2(&at_incr[i], img),
            "chain top of disk {} ({}) differs from the disk at the second snapshot",
            KEYS[i],
            img.display()
        );
        assert!(
            disks::raw_equals_qcow2(&at_full[i], &images(&full)[i]),
            "the full changed"
        );
    }
    let _ = disk(&incr, 2000);
}

/// A CBT reset between backups (the stored change ids fault): the incremental becomes a full,
/// recorded as such, equal to the disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_cbt_reset_falls_back_to_full() {
    // This one trusts the simulator by its pinned certificate (the others by CA file).
    let sys = VSys::start(
        "vsvm2",
        VOpts {
            trust: Trust::Pinned,
            ..Default::default()
        },
    )
    .await;
    sys.sim.enable_change_tracking().unwrap();
    sys.write_data();
    sys.backup_completes("full").await;

    sys.sim.reset_cbt().unwrap();
    sys.sim
        .write_disk(2000, 50 * MIB, &vec![0x55; 2 * MIB as usize])
        .unwrap();
    let now = sys.disks_now("now");
    let (id2, end) = sys.backup_completes("incremental").await;
    assert_eq!(end["backup_type"], "full", "{end:#}");
    // The event says why: the stored change id no longer works.
    sys.jobs()
        .assert_event(&id2, "incremental_fallback", &["full", "change id"])
        .await;
    for (i, img) in images(&end).iter().enumerate() {
        assert!(
            disks::raw_equals_qcow2(&now[i], img),
            "fallback full of disk {} differs",
            KEYS[i]
        );
    }
    // The chain goes on from the fallback full.
    sys.sim
        .write_disk(2001, MIB, &vec![0x56; MIB as usize])
        .unwrap();
    let now = sys.disks_now("next");
    let (_, next) = sys.backup_completes("incremental").await;
    assert_eq!(next["backup_type"], "incremental", "{next:#}");
    for (i, img) in images(&next).iter().enumerate() {
        assert!(
            disks::raw_equals_qcow2(&now[i], img),
            "incremental of disk {} differs",
            KEYS[i]
        );
    }
}

/// Cancel mid-copy, then a node SIGKILLed mid-copy and started again: each time the snapshot is
/// removed and nothing is left; a backup afterwards completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_cancel_and_node_crash_mid_copy_remove_the_snapshot() {
    let mut sys = VSys::start(
        "vsvm3",
        VOpts {
            quick_node_watch: true,
            ..VOpts::slow()
        },
    )
    .await;
    sys.sim.enable_change_tracking().unwrap();
    sys.write_data();

    let id = sys.full_copying().await;
    assert_eq!(sys.sim.snapshot_names().unwrap().len(), 1);
    let (s, c) = sys
        .api
        .post(&format!("/api/v1/backups/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "cancel: {c}");
    let b = sys.api.wait_status(&id, &["cancelled"], JOB_LIMIT).await;
    sys.assert_clean(&b).await;

    let id = sys.full_copying().await;
    assert_eq!(sys.sim.snapshot_names().unwrap().len(), 1);
    sys.node.kill9();
    let b = sys.jobs().wait_end(&id).await;
    assert_eq!(b["status"], "failed", "{b:#}");
    sys.jobs()
        .assert_event(&id, "node_lost", &["node", sys.node.opts.name.as_str()])
        .await;
    // The dead node left its snapshot; started again, it removes it (its journal says so).
    assert_eq!(
        sys.sim.snapshot_names().unwrap().len(),
        1,
        "the snapshot went away without the node"
    );
    sys.node.restart().expect("restart node");
    sys.assert_clean(&b).await;
    wait_node_registered(&sys.api, &sys.node).await;
    sys.backup_completes("full").await;
}

/// The VM deleted in vCenter while the node copies: the job fails naming the VM; nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_vm_destroyed_mid_job_fails_naming_the_vm() {
    let sys = VSys::start("vsvm4", VOpts::slow()).await;
    sys.write_data();
    let id = sys.full_copying().await;
    sys.sim.destroy_vm().unwrap();
    let b = sys.jobs().wait_end(&id).await;
    assert_eq!(b["status"], "failed", "{b:#}");
    let msg = b["error_message"].as_str().unwrap_or_default();
    // Named as the VM (not only inside an export name), with the cause.
    let lower = msg.replace("vsvm4-disk-", "").to_lowercase();
    assert!(
        lower.contains("vsvm4")
            && [
                "no longer exist",
                "not found",
                "gone",
                "deleted",
                "disappeared",
                "managedobjectnotfound"
            ]
            .iter()
            .any(|w| lower.contains(w)),
        "the error does not say that VM vsvm4 is gone: {msg}\nevents: {:#?}",
        sys.api.event_lines(&id).await
    );
    sys.assert_clean(&b).await;
}

impl VSys {
    /// A system whose node cannot use vSphere (`opts` breaks it; the VM never reaches the hub),
    /// once the node's inventory answers so: the answer's body, asserted a 502.
    async fn start_refused(vm: &str, opts: VOpts) -> (VSys, String) {
        let sys = VSys::start(
            vm,
            VOpts {
                wait_import: false,
                ..opts
            },
        )
        .await;
        let t = Instant::now();
        loop {
            let (s, v) = sys.node.get("/inventory").await;
            if s != 200 {
                assert_eq!(s, 502, "{v}");
                return (sys, v.to_string());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the node's inventory stays 200 with a vCenter it cannot use: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that the hub refuses a backup of the VM it never got (404).
    async fn assert_no_backup_starts(&self) {
        let (s, b) = self.jobs().start_backup("full").await;
        assert_eq!(s, 404, "{b}");
    }
}

/// A wrong password: the node says so (naming the user and the URL, never the password) in its
/// inventory answer and its log; the VM never reaches the hub, so no backup starts; nothing is
/// left in the simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_wrong_password_is_named() {
    let wrong = "not-the-password-4242";
    let (sys, body) = VSys::start_refused(
        "vsvm5",
        VOpts {
            password: Some(wrong.into()),
            ..Default::default()
        },
    )
    .await;
    for word in ["InvalidLogin", sys.sim.user.as_str(), sys.sim.url.as_str()] {
        assert!(
            body.contains(word),
            "the inventory error does not name {word:?}: {body}"
        );
    }
    let log = sys.node.stderr();
    assert!(log.contains("InvalidLogin"), "node log:\n{log}");
    assert!(
        !log.contains(wrong) && !body.contains(wrong),
        "the password leaked"
    );
    sys.assert_no_backup_starts().await;
    assert!(sys.sim.snapshot_names().unwrap().is_empty());
    assert!(sys.sim.clients_by_cmdline().is_empty());
}

/// A vCenter nobody listens at: the node names the URL and that it cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_unreachable_vcenter_is_named() {
    // A port that was free a moment ago and that nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let (sys, body) = VSys::start_refused(
        "vsvm6",
        VOpts {
            url: Some(url.clone()),
            ..Default::default()
        },
    )
    .await;
    assert!(body.contains(&url), "the error does not name {url}: {body}");
    let lower = body.to_lowercase();
    assert!(
        ["connect", "unreachable", "refused"]
            .iter()
            .any(|w| lower.contains(w)),
        "the error does not say the vCenter cannot be reached: {body}"
    );
    assert!(
        sys.node.stderr().contains(&url),
        "node log:\n{}",
        sys.node.stderr()
    );
    sys.assert_no_backup_starts().await;
}
