//! `chain_limit = "synthetic"`: a policy whose chains may hold three points never reads the VM
//! again after the first full. After each run past three points the hub merges the oldest into
//! the next (a synthetic full): every run after the first is an incremental, the chain stays at
//! three points, its base has no backing file, and each point left reads equal to the disk at
//! its instant.

use super::*;

fn digest(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    h.finalize().to_hex().to_string()
}

/// The point's disk 2000 as it reads through its chain.
fn reads(b: &Value, dir: &Path) -> String {
    content(
        Path::new(b["disk_results"][0]["qcow2_path"].as_str().unwrap()),
        dir,
    )
}

/// The guest-visible bytes of a qcow2 image (through its backing chain), hashed.
fn content(img: &Path, dir: &Path) -> String {
    let raw = dir.join("check.raw");
    sendense_tests::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&raw),
    );
    let h = digest(&raw);
    std::fs::remove_file(&raw).unwrap();
    h
}

/// Waits until `synthetic` synthetic-full jobs exist (the hook starts one just after the run
/// is recorded completed) and none is pending or running; answers the list.
async fn prunes_idle(env: &Env, synthetic: usize) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let jobs = env.api.get_ok("/api/v1/prune").await;
        let list = jobs.as_array().unwrap().clone();
        let started = list.iter().filter(|j| j["kind"] == "synthetic").count();
        let ended = |j: &Value| {
            matches!(
                j["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        };
        if started >= synthetic && list.iter().all(ended) {
            return list;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "want {synthetic} synthetic fulls, all ended: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_synthetic_chain_limit_merges_on_the_hub_and_never_reads_the_vm_again() {
    let (env, clock) = clocked_env("2026-06-01T00:00:00Z", |_| {});
    let srcs = env.vm_with_sources("syn", &[2000]).await;
    let mut req = request("synthetic", &["syn"]);
    req["max_chain_length"] = json!(3);
    req["chain_limit"] = json!("synthetic");
    let p = create(&env, &req).await;
    let pid = p["id"].as_str().unwrap().to_string();
    let work = tempfile::tempdir().unwrap();

    let mut instants: std::collections::HashMap<String, String> = Default::default();
    let mut kinds = Vec::new();
    let mut synthetic_jobs = 0;
    for day in 1..=6u64 {
        let planned = format!("2026-06-{day:02}T01:00:00Z");
        set_clock(&clock, &format!("2026-06-{day:02}T01:00:03Z"));
        let run = wait_run(&env, &pid, &format!("running for {planned}"), |r| {
            r["planned_at"] == planned.as_str() && r["backup_id"].is_string()
        })
        .await;
        kinds.push(run["backup_type"].as_str().unwrap().to_string());
        disks::write_pattern(&srcs[0], (8 + day) * MIB, MIB, 0x50 + day as u8);
        instants.insert(
            run["backup_id"].as_str().unwrap().to_string(),
            content(&srcs[0], work.path()),
        );
        complete_run(&env, &pid, &run, &srcs[0]).await;
        // Past three points each run is followed by one synthetic full.
        let jobs = prunes_idle(&env, day.saturating_sub(3) as usize).await;
        let failed: Vec<&Value> = jobs.iter().filter(|j| j["status"] != "completed").collect();
        assert!(failed.is_empty(), "day {day}: {failed:#?}");
        synthetic_jobs = jobs.iter().filter(|j| j["kind"] == "synthetic").count();
        let points: Vec<Value> = env
            .api
            .get_ok("/api/v1/backups")
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["vm_name"] == "syn" && b["status"] == "completed")
            .cloned()
            .collect();
        assert_eq!(
            points.len() as u64,
            day.min(3),
            "day {day}: the chain holds more than max_chain_length points: {points:#?}"
        );
    }
    assert_eq!(
        kinds,
        [
            "full",
            "incremental",
            "incremental",
            "incremental",
            "incremental",
            "incremental"
        ],
        "the VM was read whole again"
    );
    assert_eq!(
        synthetic_jobs, 3,
        "one synthetic full per run past three points"
    );

    let mut points: Vec<Value> = Vec::new();
    for b in env.api.get_ok("/api/v1/backups").await.as_array().unwrap() {
        if b["vm_name"] == "syn" && b["status"] == "completed" {
            let id = b["backup_id"].as_str().unwrap();
            points.push(env.api.get_ok(&format!("/api/v1/backups/{id}")).await);
        }
    }
    points.sort_by_key(|b| b["created_at"].as_str().unwrap().to_string());
    // The oldest point left is the chain's self-contained base now.
    let base = points[0]["disk_results"][0]["qcow2_path"].as_str().unwrap();
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", base])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info:#}");
    for b in &points {
        let id = b["backup_id"].as_str().unwrap();
        assert_eq!(
            reads(b, work.path()),
            instants[id],
            "point {id} does not read its instant"
        );
    }
}
