//! Boot-checked points: a verify job with `boot` starts a point's disks as a throwaway QEMU VM
//! on the hub from overlays and records `boot_ok`/`boot_failed` on the point.
//!
//! Two paused VMs (no guest runs in them: their disks hold the real guest of
//! [`sendense_tests::guest`], one with the group descriptors of its root ext4 zeroed) are backed up by
//! the real node into the real hub. The good point boots (its guest agent answers guest-ping),
//! the broken one fails with the guest's last console lines naming the root mount; after each,
//! no overlay is left and no QEMU of the hub runs. A check cancelled mid-boot, and one whose
//! hub is SIGKILLed mid-boot (QEMU dies with it; the restarted hub removes the overlays and
//! marks the check interrupted), leave nothing either. The source VMs never boot: the points
//! are all the test needs.

use super::sys::{Jobs, hub_bin, node_bin, node_options, terminal};
use sendense_tests::guest::GuestImages;
use sendense_tests::hub::{Api, HubOptions, HubProcess};
use sendense_tests::node::NodeProcess;
use sendense_tests::qemu::TestVm;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bound of one boot check here (a good boot takes about 15 s under TCG).
const CHECK_LIMIT: Duration = Duration::from_secs(150);

/// Replaces the VM's two images with the guest's root (flattened) and data disk; with
/// `break_root`, the root's ext4 superblock (bytes 1024..2048) is zeroed first.
pub(super) fn guest_disks(
    g: &GuestImages,
    scratch: &Path,
    name: &str,
    imgs: &[PathBuf],
    break_root: bool,
) {
    std::fs::create_dir_all(scratch).unwrap();
    let src = g.vm_disks(scratch, name).expect("guest disks");
    let raw = scratch.join(format!("{name}-root.raw"));
    sendense_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&src[0])
            .arg(&raw),
    );
    if break_root {
        // The group descriptor table zeroed: blkid still sees ext4 (the superblock is intact,
        // so the initramfs does not wait 30 s for a root it cannot identify), the kernel
        // refuses to mount it.
        use std::os::unix::fs::FileExt;
        let sb = sendense_tests::run_stdout(Command::new("dumpe2fs").arg("-h").arg(&raw));
        let bs: u64 = sb
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("dumpe2fs names the block size");
        let gdt = if bs == 1024 { 2048 } else { bs };
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&vec![0u8; bs as usize], gdt).unwrap();
    }
    sendense_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&imgs[0]),
    );
    sendense_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "qcow2"])
            .arg(&src[1])
            .arg(&imgs[1]),
    );
}

/// PIDs of processes whose command line names `dir` (the hub's boot-check QEMUs).
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(&needle).then_some((pid, cmd))
        })
        .collect()
}

/// Nothing of any boot check is left: no entry under the boot-check root, no QEMU naming it.
fn assert_nothing_left(root: &Path, what: &str) {
    let t = Instant::now();
    loop {
        let entries: Vec<_> = std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let procs = processes_under(root);
        if entries.is_empty() && procs.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: left behind: files {entries:?}, processes {procs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn start_verify(api: &Api, point: &str, boot: Value) -> String {
    let (s, v) = api
        .post("/api/v1/verify", &json!({"backup_id": point, "boot": boot}))
        .await;
    assert_eq!(s, 202, "POST /api/v1/verify: {v}");
    v["verify_id"].as_str().unwrap().to_string()
}

async fn wait_verify(api: &Api, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = api.get_ok(&format!("/api/v1/verify/{id}")).await;
        if terminal(&v) {
            return v;
        }
        assert!(t.elapsed() < CHECK_LIMIT, "verify {id} did not end: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the point's check is `booting` with QEMU's PID shown; answers the PID.
async fn wait_booting(api: &Api, point: &str) -> u32 {
    let t = Instant::now();
    loop {
        let b = api.get_ok(&format!("/api/v1/backups/{point}")).await;
        if b["boot_check"]["status"] == "booting"
            && let Some(pid) = b["boot_check"]["qemu_pid"].as_u64()
        {
            return pid as u32;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never booting: {b:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_check_passes_a_good_point_and_fails_a_broken_root_with_its_console() {
    let t0 = Instant::now();
    let g = GuestImages::get().expect("guest images (scripts/setup.sh)");
    let tmp = tempfile::Builder::new()
        .prefix("sdboot-")
        .tempdir()
        .unwrap();
    let hopts = HubOptions::new(tmp.path().join("hub"));
    let mut hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
    let api = hub.api();
    let root = tmp.path().join("hub/boot-checks");
    let scratch = tmp.path().join("scratch");
    let good = TestVm::start("bcgood", &tmp.path().join("vm"), &[1 << 20, 1 << 20], |i| {
        guest_disks(&g, &scratch, "bcgood", i, false)
    })
    .await
    .unwrap();
    let bad = TestVm::start("bcbad", &tmp.path().join("vm"), &[1 << 20, 1 << 20], |i| {
        guest_disks(&g, &scratch, "bcbad", i, true)
    })
    .await
    .unwrap();
    let nopts = node_options(
        &hub,
        tmp.path(),
        "bcgood",
        vec![
            ("bcgood".into(), good.node_qmp.clone()),
            ("bcbad".into(), bad.node_qmp.clone()),
        ],
        None,
    );
    let node = NodeProcess::start(&node_bin(), nopts).expect("start sendense-node");
    let jobs = |vm: &'static str| Jobs {
        api: &api,
        node: &node,
        vm,
        repository: "default",
    };
    let mut points = Vec::new();
    for vm in ["bcgood", "bcbad"] {
        jobs(vm).wait_vm_imported(|d| d.len() == 2).await;
        points.push(jobs(vm).backup("full").await.0);
    }
    for (vm, p) in ["bcgood", "bcbad"].into_iter().zip(&points) {
        jobs(vm).wait_completed(p).await;
    }
    eprintln!("points made in {:.1} s", t0.elapsed().as_secs_f64());
    let boot = json!({
        "kernel": g.kernel.display().to_string(),
        "initrd": g.initrd.display().to_string(),
        "memory_mib": 512,
        "timeout_secs": 120,
    });

    // A field that cannot work is refused, named.
    let (s, v) = api
        .post(
            "/api/v1/verify",
            &json!({"backup_id": points[0], "boot": {"kernel": "vmlinuz"}}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("boot.kernel"), "{v}");

    // Both points at once: the good one boots, the broken one does not. The broken one's check
    // is started and followed by the CLI, which exits 3 naming the point and the cause.
    let t = Instant::now();
    let good_check = start_verify(&api, &points[0], boot.clone()).await;
    let mut cli = Command::new(sendense_tests::bin_path("sendense-console"));
    cli.arg("--hub")
        .arg(&hub.url)
        .arg("--token-file")
        .arg(hub.opts.data_dir.join("token"))
        .args([
            "verify",
            "--backup",
            &points[1][..8],
            "--boot",
            "--boot-kernel",
        ])
        .arg(&g.kernel)
        .arg("--boot-initrd")
        .arg(&g.initrd)
        .args(["--boot-memory", "512", "--boot-timeout", "120", "--wait"])
        .env("HOME", tmp.path())
        .env_remove("SENDENSE_TOKEN");
    let cli = tokio::task::spawn_blocking(move || cli.output().unwrap());
    let v = wait_verify(&api, &good_check).await;
    assert_eq!(v["status"], "completed", "{v:#}");
    let out = cli.await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "verify --boot --wait of the broken point: {err}"
    );
    assert!(
        err.contains(&format!("point {} did not boot (boot_failed)", points[1]))
            && err.contains("QEMU exited"),
        "the CLI names the point and the cause: {err}"
    );
    eprintln!("two boot checks in {:.1} s", t.elapsed().as_secs_f64());
    let ok = api.get_ok(&format!("/api/v1/backups/{}", points[0])).await;
    let failed = api.get_ok(&format!("/api/v1/backups/{}", points[1])).await;
    let (ok, failed) = (&ok["boot_check"], &failed["boot_check"]);
    eprintln!("good point: {ok:#}\nbroken point: {failed:#}");
    assert_eq!(ok["status"], "boot_ok", "{ok:#}");
    assert!(
        ok["detail"]
            .as_str()
            .unwrap()
            .contains("guest agent answered"),
        "{ok:#}"
    );
    assert!(
        ok["boot_ms"].as_u64().is_some() && ok.get("qemu_pid").is_none(),
        "{ok:#}"
    );
    assert_eq!(failed["status"], "boot_failed", "{failed:#}");
    let tail: Vec<&str> = failed["console_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        tail.len() <= 40 && tail.iter().any(|l| l.contains("Failed to mount /dev/vda")),
        "the console's last lines name the root mount: {tail:#?}"
    );
    assert!(
        failed["detail"].as_str().unwrap().contains("QEMU exited"),
        "{failed:#}"
    );
    let ev = api.event_lines(&points[1]).await;
    assert!(
        ev.iter()
            .any(|l| l.starts_with("boot_failed:") && l.contains("Failed to mount")),
        "{ev:#?}"
    );
    assert_nothing_left(&root, "after the two checks");
    // The point itself was not written: it still reads back equal to its checksums.
    let v = wait_verify(&api, &start_verify(&api, &points[0], Value::Null).await).await;
    assert_eq!(v["status"], "completed", "{v:#}");
    assert!(v["corrupt"].as_array().unwrap().is_empty(), "{v:#}");

    // Cancelled mid-boot: QEMU stopped, overlays gone, the check interrupted.
    let id = start_verify(&api, &points[0], boot.clone()).await;
    let pid = wait_booting(&api, &points[0]).await;
    let (s, v) = api
        .post(&format!("/api/v1/verify/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let v = wait_verify(&api, &id).await;
    assert_eq!(v["status"], "cancelled", "{v:#}");
    assert!(
        !sendense_tests::pid_alive(pid),
        "QEMU {pid} outlived the cancel"
    );
    let b = api.get_ok(&format!("/api/v1/backups/{}", points[0])).await;
    assert_eq!(b["boot_check"]["status"], "interrupted", "{b:#}");
    assert_nothing_left(&root, "after the cancel");

    // A policy that requires a boot check: each run's new point is booted before the
    // retention prune. The good VM's point boots and its prune follows; the broken VM's new
    // point does not boot, so its prune is skipped (every older point kept) and an event on
    // the point says why.
    let (s, pol) = api
        .post(
            "/api/v1/policies",
            &json!({"name": "boot-gated", "vms": {"names": ["bcgood", "bcbad"]},
                    "repository_id": "default", "schedule": "0 3 * * *",
                    "retention": {"keep_last": 1}, "boot_check": boot}),
        )
        .await;
    assert_eq!(s, 201, "{pol}");
    assert_eq!(pol["boot_check"]["timeout_secs"], 120, "{pol}");
    let (s, bad_pol) = api
        .post(
            "/api/v1/policies",
            &json!({"name": "bad-boot", "vms": {"names": ["nobody"]},
                    "repository_id": "default", "schedule": "0 3 * * *",
                    "boot_check": {"timeout_secs": 1}}),
        )
        .await;
    assert_eq!(s, 422, "{bad_pol}");
    assert!(
        bad_pol["detail"]
            .as_str()
            .unwrap()
            .starts_with("boot_check.timeout_secs"),
        "{bad_pol}"
    );
    let id = pol["id"].as_str().unwrap();
    let (s, runs) = api
        .post(&format!("/api/v1/policies/{id}/run-now"), &json!({}))
        .await;
    assert_eq!(s, 202, "{runs}");
    let t = Instant::now();
    let (good_new, bad_new) = loop {
        let runs = api
            .get_ok(&format!("/api/v1/policies/{id}/runs?limit=10"))
            .await;
        let point = |vm: &str| {
            runs.as_array()
                .into_iter()
                .flatten()
                .find(|r| r["vm_name"] == vm && r["status"] == "completed")
                .and_then(|r| r["backup_id"].as_str().map(str::to_string))
        };
        if let (Some(g), Some(b)) = (point("bcgood"), point("bcbad")) {
            break (g, b);
        }
        assert!(t.elapsed() < CHECK_LIMIT, "the policy's runs: {runs:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let t = Instant::now();
    loop {
        let prunes = api.get_ok("/api/v1/prune").await;
        let of = |vm: &str| {
            prunes
                .as_array()
                .into_iter()
                .flatten()
                .filter(|j| j["vm_name"] == vm)
                .count()
        };
        assert!(of("bcgood") <= 1, "{prunes:#}");
        let bad_ev = api.event_lines(&bad_new).await;
        let skipped = bad_ev.iter().find(|l| l.starts_with("retention_skipped:"));
        let good_ended = prunes
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["vm_name"] == "bcgood" && j["status"] == "completed");
        if let (true, Some(skipped)) = (good_ended, skipped) {
            assert!(
                skipped.contains("did not boot") && skipped.contains("every older point is kept"),
                "{skipped}"
            );
            assert_eq!(of("bcbad"), 0, "the broken VM was pruned: {prunes:#}");
            break;
        }
        assert!(
            t.elapsed() < CHECK_LIMIT * 2,
            "prunes {prunes:#}\nevents of the broken point {bad_ev:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let g = api.get_ok(&format!("/api/v1/backups/{good_new}")).await;
    assert_eq!(g["boot_check"]["status"], "boot_ok", "{g:#}");
    let b = api.get_ok(&format!("/api/v1/backups/{bad_new}")).await;
    assert_eq!(b["boot_check"]["status"], "boot_failed", "{b:#}");
    let (s, old_bad) = api.get(&format!("/api/v1/backups/{}", points[1])).await;
    assert_eq!(s, 200, "the broken VM's older point is kept: {old_bad}");
    assert_nothing_left(&root, "after the policy's boot checks");

    // The hub SIGKILLed mid-boot: QEMU dies with it; the restarted hub removes the overlays.
    start_verify(&api, &good_new, boot.clone()).await;
    let pid = wait_booting(&api, &good_new).await;
    assert_eq!(
        std::fs::read_dir(&root).unwrap().flatten().count(),
        1,
        "one work directory while booting"
    );
    hub.kill9();
    let t = Instant::now();
    while sendense_tests::pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "QEMU {pid} outlived the hub"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opts = hub.opts.clone();
    drop(hub);
    let hub = HubProcess::start(&hub_bin(), opts).expect("restart sendense-hub");
    let api = hub.api();
    let b = api.get_ok(&format!("/api/v1/backups/{good_new}")).await;
    let c = &b["boot_check"];
    assert_eq!(c["status"], "interrupted", "{c:#}");
    assert!(
        c["detail"].as_str().unwrap().contains("overlays"),
        "says what it removed: {c:#}"
    );
    assert_nothing_left(&root, "after the hub's restart");

    eprintln!("test wall time {:.1} s", t0.elapsed().as_secs_f64());
    drop(node);
}
