//! The hub SIGKILLed at each named moment of a prune (the documented test knob
//! `SENDENSE_HUB_TEST_PRUNE_PAUSE` stops it there): while it is dead every remaining point
//! reads equal to its instant; the next start finishes the step in progress, and after it the
//! points still read their instants and the repository holds only their files.

use super::*;
use std::collections::BTreeSet;

/// What a scenario keeps: the chain and the points that survive.
struct Scenario {
    chain: Chain,
    kept: BTreeSet<String>,
    retention: Value,
}

/// p0 full, p1..p3 incrementals; keep-last 2: p1 and p0 are merged into p2 (one merge step
/// committing two layers into the full).
async fn merge_scenario(env: &Env) -> Scenario {
    let mut c = Chain::new(env, "cm").await;
    c.point(env, "full", 8, 0x20).await;
    c.point(env, "incremental", 9, 0x21).await;
    c.point(env, "incremental", 8, 0x22).await;
    c.point(env, "incremental", 10, 0x23).await;
    let kept = [3, 2].iter().map(|&i| c.id(i)).collect();
    Scenario {
        chain: c,
        kept,
        retention: json!({"keep_last": 2}),
    }
}

/// p0 full, p1 (protected), p2, p3; keep-last 1: p3 is rebased onto p1 past p2 (first step),
/// then p0 merged into p1.
async fn rebase_scenario(env: &Env) -> Scenario {
    let mut c = Chain::new(env, "cr").await;
    c.point(env, "full", 8, 0x30).await;
    c.point(env, "incremental", 9, 0x31).await;
    c.point(env, "incremental", 9, 0x32).await;
    c.point(env, "incremental", 10, 0x33).await;
    let (s, b) = env
        .api
        .post(&format!("/api/v1/backups/{}/protect", c.id(1)), &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let kept = [3, 1].iter().map(|&i| c.id(i)).collect();
    Scenario {
        chain: c,
        kept,
        retention: json!({"keep_last": 1}),
    }
}

/// The points' images before the prune (the catalog is not there while the hub is dead).
async fn images(env: &Env, c: &Chain) -> Vec<(String, PathBuf, String)> {
    let mut out = Vec::new();
    for (id, hash) in &c.points {
        out.push((id.clone(), image(env, id).await, hash.clone()));
    }
    out
}

async fn killed_at(moment: &str, merge: bool) {
    let mut env = Env::start_with(|o| {
        o.env
            .push(("SENDENSE_HUB_TEST_PRUNE_PAUSE".into(), moment.into()));
        // 4 MiB/s: two 1 MiB layers plus metadata take a while, so `during-copy` is mid-copy.
        o.env.push((
            "SENDENSE_HUB_TEST_PRUNE_RATE".into(),
            (1u64 << 20).to_string(),
        ));
    });
    let s = if merge {
        merge_scenario(&env).await
    } else {
        rebase_scenario(&env).await
    };
    let before = images(&env, &s.chain).await;
    let (st, job) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": s.chain.vm, "retention": s.retention}),
        )
        .await;
    assert_eq!(st, 202, "{job}");
    let id = job["prune_id"].as_str().unwrap().to_string();
    let marker = env.hub.opts.data_dir.join("prune-paused");
    let t = Instant::now();
    while std::fs::read_to_string(&marker).ok().as_deref() != Some(moment) {
        assert!(
            t.elapsed() < PRUNE_LIMIT,
            "the prune never paused at {moment}: {}",
            env.hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if moment == "during-copy" {
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    env.hub.kill9();
    // Dead hub: every point that stays reads its instant (at its path before the prune, which
    // is its path after it too: a merge renames the base over the child).
    for (pid, img, hash) in &before {
        if s.kept.contains(pid) {
            assert_eq!(
                &whole_hash(img),
                hash,
                "{moment}: kept point {pid} with the hub dead"
            );
        }
    }
    // Restart without the pause: the start-up finishes the step in progress.
    env.hub
        .opts
        .env
        .retain(|(k, _)| !k.starts_with("SENDENSE_HUB_TEST_PRUNE"));
    env.start_again();
    let j = env.api.get_ok(&format!("/api/v1/prune/{id}")).await;
    if merge {
        assert_eq!(j["status"], "completed", "{moment}: {j:#}");
        assert_remaining(&env, &s.chain, &s.kept).await;
    } else {
        // The rebase (step 1) was finished at start-up; the merge (step 2) never began.
        assert_eq!(j["status"], "failed", "{moment}: {j:#}");
        let why = j["error_message"].as_str().unwrap();
        assert!(why.contains("1 step(s) not run"), "{why}");
        let mid: BTreeSet<String> = s.kept.iter().cloned().chain([s.chain.id(0)]).collect();
        assert_remaining(&env, &s.chain, &mid).await;
        let p3 = disks::info(&image(&env, &s.chain.id(3)).await);
        assert_eq!(p3["backing-filename"], format!("{}.qcow2", s.chain.id(1)));
        // Pruning again finishes the job.
        let (st, job) = env
            .api
            .post(
                "/api/v1/prune",
                &json!({"vm_name": s.chain.vm, "retention": s.retention}),
            )
            .await;
        assert_eq!(st, 202, "{job}");
        let done = wait_prune(&env, job["prune_id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done:#}");
        assert_remaining(&env, &s.chain, &s.kept).await;
    }
    // No qemu-img of the prune is left running.
    let repo = env.hub.opts.data_dir.join("repo");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        assert!(
            !(cmd.starts_with("qemu-img") && cmd.contains(repo.to_str().unwrap())),
            "left running: {cmd}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_killed_before_the_copy() {
    killed_at("before-copy", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_killed_during_the_copy() {
    killed_at("during-copy", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_killed_after_the_copy() {
    killed_at("after-copy", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_killed_after_the_rename() {
    killed_at("after-rename", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_killed_before_the_deletes() {
    killed_at("before-delete", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebase_killed_before_the_copy() {
    killed_at("before-copy", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebase_killed_during_the_copy() {
    killed_at("during-copy", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebase_killed_before_the_deletes() {
    killed_at("before-delete", false).await;
}

/// Cancel acts between steps, never inside one: cancelled while the rebase (step 1 of 2) is
/// paused, the rebase still finishes once let go, the merge (step 2) never starts, the job ends
/// `cancelled` naming the step it stopped before, every point left reads its instant, and a new
/// prune finishes the work.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_between_steps_and_leaves_every_point_readable() {
    let env = Env::start_with(|o| {
        o.env
            .push(("SENDENSE_HUB_TEST_PRUNE_PAUSE".into(), "before-copy".into()));
    });
    let s = rebase_scenario(&env).await;
    let (st, job) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": s.chain.vm, "retention": s.retention}),
        )
        .await;
    assert_eq!(st, 202, "{job}");
    assert_eq!(job["steps_total"], 2, "{job:#}");
    let id = job["prune_id"].as_str().unwrap().to_string();
    let marker = env.hub.opts.data_dir.join("prune-paused");
    let t = Instant::now();
    while !marker.exists() {
        assert!(
            t.elapsed() < PRUNE_LIMIT,
            "the prune never paused: {}",
            env.hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, c) = env
        .api
        .post(&format!("/api/v1/prune/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(st, 202, "{c}");
    assert_eq!(c["status"], "cancelling", "{c:#}");
    std::fs::remove_file(&marker).unwrap();
    let end = wait_prune(&env, &id).await;
    assert_eq!(end["status"], "cancelled", "{end:#}");
    assert_eq!(end["steps_done"], 1, "{end:#}");
    let why = end["error_message"].as_str().unwrap_or_default();
    assert!(why.contains("cancelled before step 2 of 2"), "{why}");
    // The rebase is done (p3 on p1), the merge is not (p0 still there under p1).
    let mid: BTreeSet<String> = s.kept.iter().cloned().chain([s.chain.id(0)]).collect();
    assert_remaining(&env, &s.chain, &mid).await;
    let p3 = disks::info(&image(&env, &s.chain.id(3)).await);
    assert_eq!(p3["backing-filename"], format!("{}.qcow2", s.chain.id(1)));
    // A new prune does the rest (the knob still pauses at each step's before-copy: its marker
    // is removed as soon as it appears).
    let (st, job) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": s.chain.vm, "retention": s.retention}),
        )
        .await;
    assert_eq!(st, 202, "{job}");
    let id2 = job["prune_id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let _ = std::fs::remove_file(&marker);
        let j = env.api.get_ok(&format!("/api/v1/prune/{id2}")).await;
        if matches!(
            j["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            assert_eq!(j["status"], "completed", "{j:#}");
            break;
        }
        assert!(t.elapsed() < PRUNE_LIMIT, "{j:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_remaining(&env, &s.chain, &s.kept).await;
}
