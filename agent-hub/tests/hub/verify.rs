//! Verify jobs: completed points re-read against their stored checksums; a byte flipped on
//! disk in a data cluster marks the point and its incrementals corrupt and makes the next
//! backup a full; cancel; bad requests; the scheduler driven by its clock.

use super::env::*;
use super::integrity::complete_body;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

mod schedule;

const CELL: u64 = 4 * MIB;

fn qemu_io_uri(uri: &str, cmd: &str) {
    sendense_tests::run(std::process::Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]));
}

/// Host offset in the QCOW2 file of the guest offset `at` (`qemu-img map`).
fn host_offset(image: &Path, at: u64) -> u64 {
    let map: Value = serde_json::from_str(&sendense_tests::run_stdout(
        std::process::Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(image),
    ))
    .unwrap();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (start..start + len).contains(&at) && e["data"] == true {
            return e["offset"].as_u64().unwrap() + (at - start);
        }
    }
    panic!(
        "guest offset {at} has no data cluster in {}",
        image.display()
    );
}

/// Flips every bit of the byte at host offset `at` of `file`, on disk.
fn flip_byte(file: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

async fn start_verify(env: &Env, body: Value) -> String {
    let (s, v) = env.api.post("/api/v1/verify", &body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["trigger"], "manual", "{v}");
    v["verify_id"].as_str().unwrap().to_string()
}

/// Polls a verify job until it is over; answers it.
async fn wait_verify(env: &Env, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = env.api.get_ok(&format!("/api/v1/verify/{id}")).await;
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            t.elapsed() < JOB_LIMIT * 4,
            "verify {id} still going: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn verify_event_lines(env: &Env, id: &str) -> Vec<String> {
    let v = env.api.get_ok(&format!("/api/v1/verify/{id}/events")).await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["job_id"], id, "{e}");
            format!(
                "{} {}: {}",
                e["backup_id"].as_str().unwrap(),
                e["step"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect()
}

async fn backup(env: &Env, id: &str) -> Value {
    env.api.get_ok(&format!("/api/v1/backups/{id}")).await
}

/// A full of `vm` (sources as `vm_with_sources` makes them), then an incremental after 1 MiB
/// written at 30 MiB (cell 7); both verified.
async fn full_and_incremental(env: &Env, vm: &str) -> (String, String, std::path::PathBuf) {
    let (srcs, full, done) = env.gridded_full(vm).await;
    assert_eq!(done["integrity"], "verified", "{done:#}");
    disks::write_pattern(&srcs[0], 30 * MIB, MIB, 0x77);
    let (inc, b) = env.backup(vm, "incremental").await;
    assert_eq!(b["backup_type"], "incremental", "{b}");
    qemu_io_uri(&targets(&b)[0].1, "write -P 0x77 31457280 1048576");
    let grid = grid_of(&srcs[0], CELL);
    let changed: Vec<Value> = grid["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["index"] == 7)
        .cloned()
        .collect();
    let grid =
        json!({"cell_size": CELL, "disk_size": DISK_SIZE, "cells": changed, "zero_cells": []});
    let done = env.complete_ok(&inc, &complete_body(2000, grid)).await;
    assert_eq!(done["integrity"], "verified", "{done:#}");
    let img = image_paths(&backup(env, &full).await)[0].clone();
    (full, inc, img)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_byte_flipped_on_disk_marks_the_point_and_its_incremental_corrupt_and_the_next_backup_is_a_full()
 {
    let env = Env::start();
    let (full, inc, full_img) = full_and_incremental(&env, "vfy").await;
    let before = backup(&env, &full).await["verified_at"].clone();

    // Clean: both read, both stay verified, verified_at moves.
    let id = start_verify(&env, json!({"vm_name": "vfy"})).await;
    let v = wait_verify(&env, &id).await;
    assert_eq!(v["status"], "completed", "{v:#}");
    assert_eq!(v["scope"], "vm:vfy", "{v:#}");
    assert_eq!(
        (v["points_total"].as_u64(), v["points_done"].as_u64()),
        (Some(2), Some(2)),
        "{v:#}"
    );
    assert_eq!(v["corrupt"], json!([]), "{v:#}");
    assert!(v["bytes_read"].as_u64().unwrap() >= 4 * MIB, "{v:#}");
    let b = backup(&env, &full).await;
    assert_eq!(b["integrity"], "verified", "{b:#}");
    assert_ne!(b["verified_at"], before, "verified_at moved: {b:#}");
    let lines = verify_event_lines(&env, &id).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{full} point_verified"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("verify_completed") && l.contains("GiB/min")),
        "{lines:#?}"
    );

    // One byte of the full's first data cluster (guest offset 100000, cell 0) flipped on disk.
    flip_byte(&full_img, host_offset(&full_img, 100_000));
    let id = start_verify(&env, json!({"vm_name": "vfy"})).await;
    let v = wait_verify(&env, &id).await;
    assert_eq!(v["status"], "completed", "{v:#}");
    assert_eq!(v["corrupt"], json!([full]), "{v:#}");
    let b = backup(&env, &full).await;
    assert_eq!(b["integrity"], "corrupt", "{b:#}");
    let detail = b["integrity_detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("verify job {id}"))
            && detail.contains("disk 2000: the image chain differs from the stored checksums in 1 cell(s): cell 0 (offset 0, 4194304 bytes)"),
        "{detail}"
    );
    let b = backup(&env, &inc).await;
    assert_eq!(b["integrity"], "corrupt", "{b:#}");
    assert_eq!(
        b["integrity_detail"],
        format!("depends on corrupt point {full} (verify job {id})"),
        "{b:#}"
    );
    let lines = verify_event_lines(&env, &id).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{full} verify_mismatch"))
                && l.contains("cell 0 (offset 0, 4194304 bytes)")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{inc} dependency_corrupt"))),
        "{lines:#?}"
    );
    let evs = env
        .api
        .get_ok(&format!("/api/v1/backups/{full}/events"))
        .await;
    assert!(
        evs.as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "verify_mismatch"
                && e["level"] == "error"
                && e["job_id"] == id.as_str()),
        "{evs:#}"
    );
    // A corrupt point is not read again.
    let (s, v) = env
        .api
        .post("/api/v1/verify", &json!({"backup_id": full}))
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["points_total"], 0, "{v}");

    // The next backup asked as an incremental is a full, saying why.
    let (next, b) = env.backup("vfy", "incremental").await;
    assert_eq!(b["backup_type"], "full", "{b:#}");
    let events = env.api.event_lines(&next).await;
    assert!(
        events.iter().any(|e| e.starts_with("incremental_fallback")
            && e.contains(&format!("the chain is corrupt: point {inc}"))
            && e.contains(&format!("depends on corrupt point {full}"))),
        "{events:#?}"
    );
    env.cancel_and_check(&next).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_read_keeps_hub_computed_and_a_sidecar_not_the_catalogs_is_corrupt() {
    let env = Env::start();
    let (_, id, done) = env.hub_alone_full("hcvm").await;
    assert_eq!(done["integrity"], "hub_computed", "{done:#}");
    let vid = start_verify(&env, json!({"backup_id": id})).await;
    let v = wait_verify(&env, &vid).await;
    assert_eq!(
        (v["status"].as_str(), v["points_done"].as_u64()),
        (Some("completed"), Some(1)),
        "{v:#}"
    );
    let b = backup(&env, &id).await;
    assert_eq!(b["integrity"], "hub_computed", "not upgraded: {b:#}");
    assert_ne!(b["verified_at"], done["verified_at"], "{b:#}");

    // The sidecar rewritten (even into a valid one of other checksums) is not the catalog's.
    let img = &image_paths(&b)[0];
    let sums = std::path::PathBuf::from(format!("{}.sums", img.display()));
    let mut bytes = std::fs::read(&sums).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&sums, &bytes).unwrap();
    let vid = start_verify(&env, json!({"backup_id": id})).await;
    let v = wait_verify(&env, &vid).await;
    assert_eq!(v["corrupt"], json!([id]), "{v:#}");
    let b = backup(&env, &id).await;
    let detail = b["integrity_detail"].as_str().unwrap();
    assert!(
        detail.contains("disk 2000: its stored checksums cannot be trusted")
            && detail.contains("the catalog recorded"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_verify_requests_are_refused_naming_the_field() {
    let env = Env::start();
    let api = &env.api;
    let (s, v) = api.post("/api/v1/verify", &json!({})).await;
    assert_refused_naming(
        s,
        &v,
        "backup_id, vm_name, repository_id: exactly one is required, 0 given",
    );
    let (s, v) = api
        .post("/api/v1/verify", &json!({"backup_id": "x", "vm_name": "y"}))
        .await;
    assert_refused_naming(s, &v, "2 given (backup_id, vm_name)");
    let (s, v) = api.post("/api/v1/verify", &json!({"vm_name": 7})).await;
    assert_refused_naming(s, &v, "vm_name");
    for (body, what) in [
        (json!({"backup_id": "nope"}), "backup 'nope'"),
        (json!({"vm_name": "nope"}), "nope"),
        (json!({"repository_id": "nope"}), "repository 'nope'"),
    ] {
        let (s, v) = api.post("/api/v1/verify", &body).await;
        assert_eq!(s, 404, "{body}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(what), "{v}");
    }
    let (s, v) = api.get("/api/v1/verify/nope").await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api.post("/api/v1/verify/nope/cancel", &json!({})).await;
    assert_eq!(s, 404, "{v}");

    // The repository's interval: refused below a minute, unknown repository 404, else stored.
    let put = |path: &str, body: Value| {
        let r = api
            .http
            .put(format!("{}{path}", api.base))
            .bearer_auth(api.token.clone().unwrap())
            .json(&body);
        async move {
            let resp = r.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = put(
        "/api/v1/repositories/default",
        json!({"verify_interval_secs": 10}),
    )
    .await;
    assert_refused_naming(s, &v, "verify_interval_secs");
    let (s, v) = put(
        "/api/v1/repositories/nope",
        json!({"verify_interval_secs": 3600}),
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = put(
        "/api/v1/repositories/default",
        json!({"verify_interval_secs": 3600}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["verify_interval_secs"], 3600, "{v}");
    let list = api.get_ok("/api/v1/repositories").await;
    assert_eq!(list[0]["verify_interval_secs"], 3600, "{list}");
    let (s, v) = put(
        "/api/v1/repositories/default",
        json!({"verify_interval_secs": null}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("verify_interval_secs").is_none(), "{v}");
    // Under the data directory, the default repository root.
    let dir = env.hub.opts.data_dir.join("repo2");
    let (s, v) = api
        .post(
            "/api/v1/repositories",
            &json!({"id": "r2", "path": dir, "verify_interval_secs": 86400}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["verify_interval_secs"], 86400, "{v}");
}

/// A point of `size` bytes of data (pattern written into a qcow2 source), completed and verified.
async fn big_point(env: &Env, vm: &str, size: u64) -> String {
    let src = env.path(&format!("{vm}-src.qcow2"));
    disks::create_qcow2(&src, size);
    // qemu-io writes at most 2 GiB - 512 at once.
    for at in (0..size).step_by((1024 * MIB) as usize) {
        disks::write_pattern(&src, at, (1024 * MIB).min(size - at), 0x5c);
    }
    // Not all one pattern: every cell's checksum is distinct in its first bytes.
    for i in (0..size).step_by((64 * MIB) as usize) {
        disks::write_pattern(&src, i, 4096, (i / MIB) as u8);
    }
    let (s, v) = env
        .api
        .post(
            "/api/v1/vms",
            &json!({"vm_name": vm, "node": null, "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": size, "label": "big"}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (id, b) = env.backup(vm, "full").await;
    disks::nbdcopy_into(&src, &targets(&b)[0].1);
    let done = env
        .complete_ok(&id, &complete_body(2000, grid_of(&src, CELL)))
        .await;
    assert_eq!(done["integrity"], "verified", "{done:#}");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_mid_verify_ends_it_cancelled_and_leaves_the_point_as_it_was() {
    let env = Env::start();
    let id = big_point(&env, "bigvm", 1024 * MIB).await;
    let before = backup(&env, &id).await;
    let vid = start_verify(&env, json!({"backup_id": id})).await;
    let t = Instant::now();
    loop {
        let v = env.api.get_ok(&format!("/api/v1/verify/{vid}")).await;
        if v["status"] == "running" {
            break;
        }
        assert_eq!(v["status"], "pending", "{v:#}");
        assert!(t.elapsed() < JOB_LIMIT, "{v:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, v) = env
        .api
        .post(&format!("/api/v1/verify/{vid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let v = wait_verify(&env, &vid).await;
    assert_eq!(v["status"], "cancelled", "{v:#}");
    assert_eq!(v["points_done"], 0, "{v:#}");
    assert!(v["bytes_read"].as_u64().unwrap() < 1024 * MIB, "{v:#}");
    let b = backup(&env, &id).await;
    assert_eq!(b["integrity"], "verified", "{b:#}");
    assert_eq!(b["verified_at"], before["verified_at"], "{b:#}");
    let lines = verify_event_lines(&env, &vid).await;
    assert!(
        lines.iter().any(|l| l.contains("verify_cancelled")),
        "{lines:#?}"
    );
    let (s, v) = env
        .api
        .post(&format!("/api/v1/verify/{vid}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 409, "a finished job: {v}");
}

/// Throughput of a verify job on 2 GiB of data: `cargo nextest run -p agent-hub --run-ignored
/// only verify_throughput --no-capture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: 2 GiB written, copied and read back"]
async fn verify_throughput() {
    let env = Env::start();
    let gib: u64 = std::env::var("VERIFY_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let id = big_point(&env, "tputvm", gib * 1024 * MIB).await;
    let img = image_paths(&backup(&env, &id).await)[0].clone();
    for pass in [
        "cold (image evicted from the page cache)",
        "warm (image in the page cache)",
    ] {
        if pass.starts_with("cold") {
            evict(&img);
        }
        let cpu0 = cpu_secs(env.hub.pid());
        let vid = start_verify(&env, json!({"backup_id": id})).await;
        let v = wait_verify(&env, &vid).await;
        let cpu = cpu_secs(env.hub.pid()) - cpu0;
        assert_eq!(v["status"], "completed", "{v:#}");
        let lines = verify_event_lines(&env, &vid).await;
        let summary = lines
            .iter()
            .find(|l| l.contains("verify_completed"))
            .unwrap();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap();
        eprintln!(
            "THROUGHPUT {pass}: {summary}; CPU of the hub and its read-only qemu-nbd: {cpu:.1} s; \
             loadavg {}",
            load.trim()
        );
    }
}

/// Drops the image's pages from the page cache, so the read-back reads the disk.
fn evict(file: &Path) {
    let f = std::fs::File::open(file).unwrap();
    f.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// User + system CPU seconds of `pid` and of its children it waited for (the read-only
/// qemu-nbd of each read-back).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14-17 of proc(5) (utime, stime, cutime, cstime) are 11-14 after the name.
    let ticks: f64 = f[11..15].iter().map(|v| v.parse::<f64>().unwrap()).sum();
    ticks / 100.0
}

/// Makes a completed point look as a hub older than whole-disk checksums left it: `legacy`, no
/// sidecar (edited in the hub's SQLite database, as the 0004 migration leaves such points).
async fn make_legacy(env: &Env, id: &str, image: &Path) {
    let db = env.tmp.path().join("data").join("hub.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE backup_jobs SET integrity = 'legacy', integrity_detail = NULL WHERE backup_id = ?",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE backup_disks SET manifest_path = NULL, manifest_blake3 = NULL, \
         checksums_source = NULL WHERE backup_id = ?",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    std::fs::remove_file(format!("{}.sums", image.display())).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_point_gets_hub_computed_checksums_that_later_verify_jobs_compare_with() {
    let env = Env::start();
    let (_, id, done) = env.gridded_full("oldvm").await;
    let img = image_paths(&done)[0].clone();
    make_legacy(&env, &id, &img).await;
    assert_eq!(backup(&env, &id).await["integrity"], "legacy");

    let vid = start_verify(&env, json!({"repository_id": "default"})).await;
    let v = wait_verify(&env, &vid).await;
    assert_eq!(
        (v["status"].as_str(), v["points_done"].as_u64()),
        (Some("completed"), Some(1)),
        "{v:#}"
    );
    let b = backup(&env, &id).await;
    assert_eq!(b["integrity"], "hub_computed", "{b:#}");
    assert!(
        b["integrity_detail"].as_str().unwrap().contains(&format!(
            "disk 2000: verify job {vid} computed its checksums (16 cells) from the image, the point having none (legacy)"
        )),
        "{b:#}"
    );
    assert_eq!(disk(&b, 2000)["checksums_source"], "hub", "{b:#}");
    assert!(Path::new(&format!("{}.sums", img.display())).exists());
    let lines = verify_event_lines(&env, &vid).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{id} checksums_computed"))),
        "{lines:#?}"
    );

    // From now on the stored checksums catch a flipped byte.
    flip_byte(&img, host_offset(&img, 5 * MIB + 8192));
    let vid = start_verify(&env, json!({"repository_id": "default"})).await;
    let v = wait_verify(&env, &vid).await;
    assert_eq!(v["corrupt"], json!([id]), "{v:#}");
    let b = backup(&env, &id).await;
    assert!(
        b["integrity_detail"]
            .as_str()
            .unwrap()
            .contains("cell 1 (offset 4194304, 4194304 bytes)"),
        "{b:#}"
    );
}
