//! Backup policies on the real hub: the API's refusals (each naming its field), the admission
//! queue against a full port range, one late run after downtime, and the backup types a policy
//! chooses over a simulated week. Time comes from the hub's test clock file; backups are
//! written hub-alone (nbdcopy into the exports, then the completion report).

use super::env::*;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod late;
mod queue;
mod synthetic;
mod week;

/// Writes the hub's test clock (temp file and rename: the hub never reads half a file).
pub fn set_clock(file: &Path, at: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{at}\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// A hub whose time is `clock` (set to `at`), ticking its scheduler every second.
pub fn clocked_env(
    at: &str,
    adjust: impl FnOnce(&mut sendense_tests::hub::HubOptions),
) -> (Env, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let clock = dir.join("now");
    set_clock(&clock, at);
    let c = clock.display().to_string();
    let env = Env::start_with(|o| {
        o.extra_args.extend([
            "--test-clock-file".to_string(),
            c,
            "--policy-check-interval-secs".to_string(),
            "1".to_string(),
        ]);
        adjust(o);
    });
    (env, clock)
}

/// A valid request for the given VM names.
pub fn request(name: &str, vms: &[&str]) -> Value {
    json!({"name": name, "vms": {"names": vms}, "repository_id": "default",
        "schedule": "0 1 * * *", "timezone": "UTC"})
}

pub async fn create(env: &Env, body: &Value) -> Value {
    let (s, p) = env.api.post("/api/v1/policies", body).await;
    assert_eq!(s, 201, "{p}");
    p
}

pub async fn runs(env: &Env, policy: &str) -> Vec<Value> {
    env.api
        .get_ok(&format!("/api/v1/policies/{policy}/runs"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

/// Polls the policy's runs until `pred` holds for one (the newest such); answers it.
pub async fn wait_run(env: &Env, policy: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let list = runs(env, policy).await;
        if let Some(r) = list.iter().find(|r| pred(r)) {
            return r.clone();
        }
        if t.elapsed() > JOB_LIMIT {
            panic!("policy {policy}: no run {what} after {JOB_LIMIT:?}: {list:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes the running run's backup from `src` and completes it; answers the completed run.
pub async fn complete_run(env: &Env, policy: &str, run: &Value, src: &Path) -> Value {
    let id = run["backup_id"]
        .as_str()
        .expect("a running run has a backup")
        .to_string();
    let b = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    disks::nbdcopy_into(src, &targets(&b)[0].1);
    env.complete_ok(
        &id,
        &json!({"status": "completed", "disks": [{"disk_key": 2000, "status": "completed"}]}),
    )
    .await;
    let run_id = run["run_id"].clone();
    wait_run(env, policy, "completed", |r| {
        r["run_id"] == run_id && r["status"] == "completed"
    })
    .await
}

fn refused(s: u16, v: &Value, field: &str) {
    assert_refused_naming(s, v, field);
}

#[tokio::test]
async fn every_bad_policy_is_refused_naming_its_field() {
    let env = Env::start();
    env.vm_with_sources("web-01", &[2000]).await;
    env.vm_with_sources("db-01", &[2000]).await;
    let api = &env.api;
    let post = |body: Value| async move { api.post("/api/v1/policies", &body).await };
    let with = |k: &str, v: Value| {
        let mut b = request("p", &["web-01"]);
        b[k] = v;
        b
    };

    let (s, v) = post(with("schedule", json!("0 25 * * *"))).await;
    refused(s, &v, "schedule");
    let (s, v) = post(with("schedule", json!("every night"))).await;
    refused(s, &v, "schedule");
    let (s, v) = post(with("timezone", json!("Mars/Olympus"))).await;
    refused(s, &v, "timezone");
    let (s, v) = post(with("vms", json!({}))).await;
    refused(s, &v, "vms");
    let (s, v) = post(with("vms", json!({"names": ["no-such-vm"]}))).await;
    refused(s, &v, "vms.names[0]");
    let (s, v) = post(with("vms", json!({"nodes": ["no-such-node"]}))).await;
    refused(s, &v, "vms.nodes[0]");
    let (s, v) = post(with("vms", json!({"patterns": ["web-[0-9"]}))).await;
    refused(s, &v, "vms.patterns[0]");
    let (s, v) = post(with("repository_id", json!("nowhere"))).await;
    refused(s, &v, "repository_id");
    let (s, v) = post(with("backup_rule", json!({"weekly_full_on": "someday"}))).await;
    refused(s, &v, "backup_rule.weekly_full_on");
    let (s, v) = post(with("backup_rule", json!({"full_every_days": 0}))).await;
    refused(s, &v, "backup_rule.full_every_days");
    let (s, v) = post(with("max_chain_length", json!(0))).await;
    refused(s, &v, "max_chain_length");
    let (s, v) = post(with("retention", json!({"keep_daily": 0, "keep_last": 0}))).await;
    refused(s, &v, "retention");
    let (s, v) = post(with("retention", json!({"keep_daily": -1}))).await;
    refused(s, &v, "retention.keep_daily");
    let (s, v) = post(with("queue_window_secs", json!(-5))).await;
    refused(s, &v, "queue_window_secs");
    let (s, v) = post(with("name", json!(""))).await;
    refused(s, &v, "name");

    // Good ones; all rules absent is "no pruning".
    let a = create(&env, &request("nightly", &["web-01"])).await;
    assert_eq!(a["enabled"], true, "{a}");
    assert!(a["next_run"].as_str().is_some(), "{a}");
    let id = a["id"].as_str().unwrap();
    let (s, v) = post(request("nightly", &["db-01"])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("already_exists")),
        "{v}"
    );
    // One VM named by two policies: 409 naming the other.
    let (s, v) = post(request("other", &["web-01"])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("already_exists")),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("nightly"), "{v}");
    assert!(v["detail"].as_str().unwrap().contains(id), "{v}");
    // Overlap through a pattern is allowed (resolved when the slot runs).
    create(
        &env,
        &json!({"name": "all-web", "vms": {"patterns": ["web-*"]},
        "repository_id": "default", "schedule": "30 2 * * 0", "timezone": "Europe/London",
        "retention": {"keep_daily": 7, "keep_weekly": 0}}),
    )
    .await;

    // Update, list, runs, delete.
    let mut upd = request("nightly", &["web-01", "db-01"]);
    upd["enabled"] = json!(false);
    let (s, v) = api.put(&format!("/api/v1/policies/{id}"), &upd).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enabled"], false, "{v}");
    assert!(
        v.get("next_run").is_none(),
        "a disabled policy has no next run: {v}"
    );
    let mut bad = upd.clone();
    bad["timezone"] = json!("Nowhere/Land");
    let (s, v) = api.put(&format!("/api/v1/policies/{id}"), &bad).await;
    refused(s, &v, "timezone");
    let list = api.get_ok("/api/v1/policies").await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let (s, v) = api
        .get(&format!("/api/v1/policies/{id}/runs?limit=abc"))
        .await;
    refused(s, &v, "limit");
    let (s, v) = api.get("/api/v1/policies/no-such-policy").await;
    assert_eq!(s, 404, "{v}");

    // Admin scope: a node's credential is refused naming it.
    let node = env.hub.node_api("n1").unwrap();
    let (s, v) = node.get("/api/v1/policies").await;
    assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("scope admin"), "{v}");

    let (s, _) = api.delete(&format!("/api/v1/policies/{id}")).await;
    assert_eq!(s, 204);
    let (s, _) = api.get(&format!("/api/v1/policies/{id}")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn run_now_queues_each_vm_and_a_vm_two_patterns_reach_goes_to_the_higher_priority() {
    let env = Env::start();
    let srcs = env.vm_with_sources("web-01", &[2000]).await;
    env.vm_with_sources("db-01", &[2000]).await;
    let pattern = |name: &str, glob: &str, prio: i32| {
        json!({"name": name, "vms": {"patterns": [glob]}, "repository_id": "default",
            "schedule": "0 1 * * *", "priority": prio})
    };
    let low = create(&env, &pattern("everything", "*", 1)).await;
    let high = create(&env, &pattern("web", "web-*", 5)).await;
    let (lid, hid) = (low["id"].as_str().unwrap(), high["id"].as_str().unwrap());

    let (s, v) = env
        .api
        .post(&format!("/api/v1/policies/{lid}/run-now"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let by_vm = |v: &Value, vm: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["vm_name"] == vm)
            .cloned()
            .unwrap()
    };
    let web = by_vm(&v, "web-01");
    assert_eq!(web["status"], "skipped", "{v}");
    assert_eq!(web["manual"], true, "{v}");
    let why = web["reason"].as_str().unwrap();
    assert!(
        why.contains("\"web\"") && why.contains(hid),
        "names the winner: {why}"
    );
    assert_eq!(by_vm(&v, "db-01")["status"], "queued", "{v}");

    // db-01's run of the other policy: its job cancelled, the run says how it ended.
    let db_run = wait_run(&env, lid, "db-01 running", |r| {
        r["vm_name"] == "db-01" && r["backup_id"].is_string()
    })
    .await;
    env.cancel_and_check(db_run["backup_id"].as_str().unwrap())
        .await;
    let failed = wait_run(&env, lid, "failed", |r| {
        r["vm_name"] == "db-01" && r["status"] == "failed"
    })
    .await;
    assert!(
        failed["reason"].as_str().unwrap().contains("cancelled"),
        "{failed}"
    );

    // The winner backs web-01 up; its run follows the job to its end.
    let (s, v) = env
        .api
        .post(&format!("/api/v1/policies/{hid}/run-now"), &json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let run = wait_run(&env, hid, "running", |r| r["backup_id"].is_string()).await;
    complete_run(&env, hid, &run, &srcs[0]).await;
    let p = env.api.get_ok(&format!("/api/v1/policies/{hid}")).await;
    assert_eq!(p["last_run"]["status"], "completed", "{p}");
    assert_eq!(p["queued"], 0, "{p}");
}
