//! Verification that cannot be fooled: whole-disk checksums from the writer, the whole chain
//! read back read-only after the writable export stopped cleanly, hub-computed checksums for a
//! writer without them.

use super::env::*;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const CELL: u64 = 4 * MIB;

fn sidecar(image: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sums", image.display()))
}

fn qemu_io_uri(uri: &str, cmd: &str) {
    sendense_tests::run(std::process::Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]));
}

pub fn complete_body(key: i64, grid: Value) -> Value {
    json!({"status": "completed", "disks": [{"disk_key": key, "status": "completed", "grid": grid}]})
}

async fn complete_failed(env: &Env, id: &str, body: &Value) -> Value {
    let (s, v) = env
        .api
        .post(&format!("/api/v1/backups/{id}/complete"), body)
        .await;
    assert_eq!(s, 202, "{v}");
    let done = env
        .api
        .wait_status(id, &["completed", "failed"], JOB_LIMIT)
        .await;
    assert_eq!(done["status"], "failed", "{done:#}");
    env.assert_nothing_held(&done).await;
    for p in image_paths(&done) {
        assert!(!p.exists(), "{} left behind", p.display());
        assert!(
            !sidecar(&p).exists(),
            "{} left behind",
            sidecar(&p).display()
        );
    }
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_with_a_grid_is_verified_and_garbage_in_a_hole_fails_it() {
    let env = Env::start();
    let (srcs, id, done) = env.gridded_full("gridvm").await;
    assert_eq!(done["integrity"], "verified", "{done:#}");
    assert!(done["verified_at"].is_string(), "{done:#}");
    assert_eq!(disk(&done, 2000)["checksums_source"], "writer", "{done:#}");
    let img = &image_paths(&done)[0];
    let mode = std::fs::metadata(sidecar(img))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "sidecar mode");
    let events = env.api.event_lines(&id).await;
    for step in [
        "checksums_stored",
        "qemu_nbd_stopped",
        "image_verified",
        "image_checked",
    ] {
        assert!(
            events.iter().any(|e| e.starts_with(step)),
            "no {step}: {events:#?}"
        );
    }

    // The writer skipped the hole at 20 MiB; something else wrote there before the end.
    let (id, b) = env.backup("gridvm", "full").await;
    let uri = &targets(&b)[0].1;
    disks::nbdcopy_into(&srcs[0], uri);
    qemu_io_uri(uri, "write -P 0x5a 20971520 4096");
    let done = complete_failed(&env, &id, &complete_body(2000, grid_of(&srcs[0], CELL))).await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains("disk 2000: verification failed: the image chain differs from the writer's whole-disk checksums in 1 cell(s): cell 5 (offset 20971520, 4194304 bytes)"),
        "{msg}"
    );
    assert_eq!(done["integrity"], "unverified", "{done:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_an_unchanged_area_of_an_incremental_fails_it() {
    let env = Env::start();
    let (srcs, _, _) = env.gridded_full("incvm").await;

    // The VM writes 1 MiB at 30 MiB (cell 7); the incremental copies just that.
    disks::write_pattern(&srcs[0], 30 * MIB, MIB, 0x77);
    let (id, b) = env.backup("incvm", "incremental").await;
    let uri = &targets(&b)[0].1;
    qemu_io_uri(uri, "write -P 0x77 31457280 1048576");
    // ... and garbage lands at 40 MiB, an area the incremental did not touch.
    qemu_io_uri(uri, "write -P 0x5a 41943040 65536");
    let full = grid_of(&srcs[0], CELL);
    let changed: Vec<Value> = full["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["index"] == 7)
        .cloned()
        .collect();
    assert_eq!(changed.len(), 1);
    let grid =
        json!({"cell_size": CELL, "disk_size": DISK_SIZE, "cells": changed, "zero_cells": []});
    let done = complete_failed(&env, &id, &complete_body(2000, grid)).await;
    let msg = done["error_message"].as_str().unwrap();
    assert!(
        msg.contains("in 1 cell(s): cell 10 (offset 41943040, 4194304 bytes)"),
        "{msg}"
    );
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("checksums_stored")
            && e.contains("15 inherited from the parent point")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writable_qemu_nbd_that_needs_sigkill_fails_its_disk_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, "[qemu_nbd]\nstop_grace = \"1s\"\n").unwrap();
    let env = Env::start_with(|o| {
        o.extra_args
            .extend(["--config".into(), cfg.display().to_string()]);
    });
    let srcs = env.vm_with_sources("hungvm", &[2000]).await;
    let (id, b) = env.backup("hungvm", "full").await;
    disks::nbdcopy_into(&srcs[0], &targets(&b)[0].1);
    let pid = disk(&b, 2000)["qemu_nbd_pid"].as_u64().unwrap() as i32;
    // A qemu-nbd that no longer answers: SIGTERM cannot end it, only the SIGKILL after the grace.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let done = complete_failed(&env, &id, &complete_body(2000, grid_of(&srcs[0], CELL))).await;
    let msg = done["error_message"].as_str().unwrap();
    let want = format!("qemu-nbd of disk 2000 (pid {pid}, port ");
    assert!(
        msg.contains(&want) && msg.contains("did not stop cleanly: killed by SIGKILL"),
        "{msg}"
    );
    let d = disk(&done, 2000);
    assert_eq!(d["status"], "failed", "{done:#}");
    assert!(
        d["error_message"]
            .as_str()
            .unwrap()
            .contains("did not stop cleanly"),
        "{done:#}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu-nbd {pid} still there"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_without_checksums_gets_hub_computed_ones_and_says_so() {
    let env = Env::start();
    let (_, id, done) = env.hub_alone_full("plainvm").await;
    assert_eq!(done["integrity"], "hub_computed", "{done:#}");
    assert!(
        done["integrity_detail"]
            .as_str()
            .unwrap()
            .contains("disk 2000: the writer sent no whole-disk checksums; the hub computed them"),
        "{done:#}"
    );
    assert_eq!(disk(&done, 2000)["checksums_source"], "hub", "{done:#}");
    let img = &image_paths(&done)[0];
    assert!(sidecar(img).exists());
    let events = env.api.event_lines(&id).await;
    assert!(
        events.iter().any(|e| e.starts_with("checksums_computed")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grid_that_does_not_fit_the_disk_is_refused_naming_the_field() {
    let env = Env::start();
    env.vm_with_sources("badgrid", &[2000]).await;
    let (id, _) = env.backup("badgrid", "full").await;
    let grid = json!({"cell_size": CELL, "disk_size": DISK_SIZE, "cells": [], "zero_cells": [{"first": 0, "count": 3}]});
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &complete_body(2000, grid),
        )
        .await;
    assert_refused_naming(s, &v, "disks[0].grid");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("a full point must list every cell; cell 3 is missing"),
        "{v}"
    );
    let b = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(b["status"], "running", "the writer may retry: {b}");
}

/// The hub SIGKILLed while it finalizes: the truth was stored before the completion was
/// acknowledged, so the restarted hub's reconciler proves the image and completes the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_hub_killed_during_finalize_completes_the_job_on_restart() {
    let mut env = Env::start();
    let src = big_vm(&env, "finkill", 1 << 30, 512 * MIB).await;
    let (id, b) = env.backup("finkill", "full").await;
    disks::nbdcopy_into(&src, &targets(&b)[0].1);
    let (s, v) = env
        .api
        .post(
            &format!("/api/v1/backups/{id}/complete"),
            &complete_body(2000, grid_of(&src, CELL)),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    env.hub.kill9();
    env.start_again();
    let done = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    let events = env.api.event_lines(&id).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{events:#?}");
    assert_eq!(done["integrity"], "verified", "{done:#}");
    assert!(
        events.iter().any(|e| e.starts_with("reconciler_job")
            && e.contains(
                "was finalizing when the hub stopped; completed: all 1 disk(s) read back equal"
            )),
        "{events:#?}"
    );
    let img = &image_paths(&done)[0];
    assert!(
        disks::images_equal(img, &src),
        "image differs from the source"
    );
    env.assert_nothing_held(&done).await;
}
