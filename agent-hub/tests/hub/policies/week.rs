//! The backup types a policy chooses over a simulated week (test clock): 01:00 London time
//! daily, a weekly full on Sunday, chains of at most four points.

use super::*;

#[tokio::test]
async fn a_week_of_nightly_runs_takes_the_fulls_the_rules_say() {
    let (env, clock) = clocked_env("2026-05-31T22:00:00Z", |_| {});
    let srcs = env.vm_with_sources("pg", &[2000]).await;
    let mut req = request("nightly", &["pg"]);
    req["timezone"] = json!("Europe/London");
    req["backup_rule"] = json!({"weekly_full_on": "sun"});
    req["max_chain_length"] = json!(4);
    let p = create(&env, &req).await;
    let pid = p["id"].as_str().unwrap().to_string();
    // 01:00 BST is midnight UTC.
    assert_eq!(p["next_run"], "2026-06-01T00:00:00Z", "{p}");

    let mut kinds = Vec::new();
    for day in 1..=8 {
        let planned = format!("2026-06-{day:02}T00:00:00Z");
        set_clock(&clock, &format!("2026-06-{day:02}T00:00:03Z"));
        let run = wait_run(&env, &pid, &format!("running for {planned}"), |r| {
            r["planned_at"] == planned.as_str() && r["backup_id"].is_string()
        })
        .await;
        assert_eq!(run["late"], false, "{run}");
        kinds.push(run["backup_type"].as_str().unwrap().to_string());
        // A guest write between runs.
        disks::write_pattern(&srcs[0], (8 + day) * MIB, MIB, 0x40 + day as u8);
        complete_run(&env, &pid, &run, &srcs[0]).await;
    }
    // Mon: first backup, full. Tue-Thu: incrementals (chain of 4). Fri: a fifth point would
    // exceed max_chain_length. Sat: incremental. Sun: weekly full. Mon: incremental.
    assert_eq!(
        kinds,
        [
            "full",
            "incremental",
            "incremental",
            "incremental",
            "full",
            "incremental",
            "full",
            "incremental"
        ]
    );
    let list = runs(&env, &pid).await;
    assert_eq!(list.len(), 8, "{list:#?}");
    assert!(list.iter().all(|r| r["status"] == "completed"), "{list:#?}");
}
