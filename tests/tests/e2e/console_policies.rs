//! The Policies view of the real `sendense-console` in a tmux pane at 80×24 against a real hub,
//! node and 2-disk QEMU VM: a policy created with the CLI, three full backups of the VM, then
//! with keys: `7` the view, Enter its detail with the VM's chain of points and the rule that
//! keeps each, `p` protecting the oldest point, `x` the dry run (the protected point kept, the
//! middle one removed, with the bytes freed), `y` the prune it showed; afterwards the hub's own
//! `GET /api/v1/vms/{name}/points` says the same, and `prune --dry-run` has nothing left to do.

use super::sys::{Sys, SysOptions};
use sendense_tests::bin_path;
use sendense_tests::tmux::Tmux;
use serde_json::Value;
use std::time::{Duration, Instant};

const SCREEN_LIMIT: Duration = Duration::from_secs(90);

/// Runs `sendense-console ARGS` against the test hub; answers (exit status, stdout, stderr).
fn console(sys: &Sys, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin_path("sendense-console"))
        .arg("--hub")
        .arg(&sys.hub.url)
        .arg("--token-file")
        .arg(sys.hub.opts.data_dir.join("token"))
        .args(args)
        .env("HOME", sys.tmp.path())
        .env_remove("SENDENSE_TOKEN")
        .env_remove("SENDENSE_HUB_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The VM's points as the hub lists them, newest first: (id, protected, kept_by).
async fn points(sys: &Sys) -> Vec<(String, bool, Value)> {
    let p = sys
        .api
        .get_ok(&format!("/api/v1/vms/{}/points", sys.vm_name))
        .await;
    let list = p
        .as_array()
        .cloned()
        .or_else(|| p["points"].as_array().cloned());
    list.unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["backup_id"].as_str().unwrap().to_string(),
                p["protected"].as_bool().unwrap_or(false),
                p["kept_by"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn keys_protect_a_point_preview_and_run_a_prune() {
    assert!(
        bin_path("sendense-console").exists(),
        "cargo build --bin sendense-console"
    );
    let sys = Sys::start("conpol", SysOptions::default()).await;
    let vm = sys.vm_name.clone();

    // A policy that keeps only the newest point; scheduled far away (the test runs it by hand).
    let (code, id, err) = console(
        &sys,
        &[
            "policy",
            "create",
            "conpol-nightly",
            "--vm",
            &vm,
            "--schedule",
            "0 3 1 1 *",
            "--timezone",
            "Europe/London",
            "--keep-last",
            "1",
            "--repository",
            &sys.repository,
        ],
    );
    assert_eq!(code, 0, "policy create: {err}");
    let policy_id = id.trim().to_string();
    // A bad schedule is refused naming the field.
    let (code, _, err) = console(
        &sys,
        &[
            "policy",
            "create",
            "bad",
            "--vm",
            &vm,
            "--schedule",
            "61 * * *",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("schedule"),
        "the refusal names the field: {err}"
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            sys.backup_completes("full").await["backup_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (oldest, middle, newest) = (ids[0].clone(), ids[1].clone(), ids[2].clone());

    let tmux = Tmux::new("sendense-console-policies", SCREEN_LIMIT);
    let exit_file = sys.path("console.exit");
    let cmd = format!(
        "sh -c '{} --hub {} --token-file {} --log-file {}; echo $? > {}'",
        bin_path("sendense-console").display(),
        sys.hub.url,
        sys.hub.opts.data_dir.join("token").display(),
        sys.path("console.log").display(),
        exit_file.display()
    );
    tmux.start_ui(sys.tmp.path(), &cmd);
    tmux.wait_for("◉ live").await;
    tmux.keys(&["7"]);
    tmux.wait_for("conpol-nightly").await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("Policy conpol-nightly · ✔ enabled").await;
    tmux.wait_for(&format!("Points of {vm} (1/1 VMs, h/l) · 3 points"))
        .await;

    // G selects the oldest point; p protects it.
    tmux.keys(&["G"]);
    tmux.keys(&["p"]);
    tmux.wait_for(&format!("Point {oldest} is protected")).await;
    tmux.wait_for("■ yes").await;
    let t = Instant::now();
    while !points(&sys)
        .await
        .iter()
        .any(|(id, p, _)| id == &oldest && *p)
    {
        assert!(
            t.elapsed() < SCREEN_LIMIT,
            "the hub never marked {oldest} protected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // x: the dry run keeps the newest (last) and the protected one, removes the middle one.
    tmux.keys(&["x"]);
    let dialog = tmux.wait_for("Prune preview").await;
    assert!(
        dialog.contains("Keeps 2 point(s), removes 1"),
        "the preview counts the protected point as kept:\n{dialog}"
    );
    assert!(
        dialog.contains("keep protected") && dialog.contains("keep last"),
        "{dialog}"
    );
    tmux.keys(&["y"]);
    tmux.wait_for("Prune ").await;
    let t = Instant::now();
    loop {
        let now = points(&sys).await;
        let left: Vec<&str> = now.iter().map(|(id, _, _)| id.as_str()).collect();
        if left == [newest.as_str(), oldest.as_str()] {
            break;
        }
        assert!(
            t.elapsed() < SCREEN_LIMIT * 2,
            "the prune did not leave {newest} and {oldest}: {left:?} (middle {middle})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tmux.wait_for(&format!("Points of {vm} (1/1 VMs, h/l) · 2 points"))
        .await;

    // What the CLI says afterwards: nothing left to prune, the run-now answered.
    let (code, out, err) = console(&sys, &["prune", &vm, "--dry-run", "--json"]);
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["bytes_freed"], 0, "{plan:#}");
    let (code, _, err) = console(&sys, &["policy", "show", &policy_id]);
    assert_eq!(code, 0, "{err}");
    // The tables fit 80 columns and show the short id, which `policy show` takes.
    for args in [
        &["policy", "list"][..],
        &["policy", "show", &policy_id[..8]],
    ] {
        let (code, out, err) = console(&sys, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("conpol-nightly"), "{args:?}: {out}");
        for l in out.lines() {
            assert!(
                l.chars().count() <= 80,
                "{args:?}: line over 80 columns: {l:?}"
            );
        }
    }

    tmux.keys(&["q"]);
    let t = Instant::now();
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "console did not quit on q"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&exit_file)
            .unwrap_or_default()
            .trim(),
        "0"
    );
}
