//! The console's one-shot commands for every resource against a real hub, node and QEMU VM:
//! `vms`, `nodes`, `ports`, `processes`, `tunnel`, `repositories`, `health` (tables of at most
//! 80 columns, and `--json` equal to what the hub's API answers), and `events --follow`
//! showing a job's events live while it runs; then the job commands on the finished point:
//! `backups list`, `points list`, `point protect|unprotect`, `verify --wait` and `verify list`,
//! `restore start --wait` and `restores list`, `restore cancel` mid-copy, `verify cancel` and
//! `backup cancel` of ended jobs (refused, naming the state), `backup start --wait`.

use super::sys::{Sys, SysOptions};
use sendense_tests::bin_path;
use serde_json::Value;
use std::io::BufRead;
use std::time::{Duration, Instant};

fn console_cmd(sys: &Sys, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(bin_path("sendense-console"));
    c.arg("--hub")
        .arg(&sys.hub.url)
        .arg("--token-file")
        .arg(sys.hub.opts.data_dir.join("token"))
        .args(args)
        .env("HOME", sys.tmp.path())
        .env_remove("SENDENSE_TOKEN")
        .env_remove("SENDENSE_HUB_URL");
    c
}

fn console(sys: &Sys, args: &[&str]) -> (i32, String, String) {
    let out = console_cmd(sys, args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_resource_has_a_command_and_events_follow_shows_a_job_live() {
    assert!(
        bin_path("sendense-console").exists(),
        "cargo build --bin sendense-console"
    );
    let sys = Sys::start(
        "e2ecli",
        SysOptions {
            throttle_bps: Some(super::sys::SLOW_BPS),
            ..Default::default()
        },
    )
    .await;

    // The stream, opened before the job so that it shows the job from its start.
    let mut follower = console_cmd(&sys, &["events", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    // Connected once it says so on stderr: from then on no event is missed.
    let mut err = std::io::BufReader::new(follower.stderr.take().unwrap());
    let mut said = String::new();
    err.read_line(&mut said).unwrap();
    assert!(
        said.starts_with("following the events of http://127.0.0.1:"),
        "{said}"
    );

    let (id, _) = sys.backup("full").await;
    sys.wait_node_copying(&id).await;

    // While it runs: the ports and processes it holds, by every command.
    let (code, out, err) = console(&sys, &["processes", "--json"]);
    assert_eq!(code, 0, "{err}");
    let procs: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        procs,
        sys.api.get_ok("/api/v1/processes").await,
        "--json is the hub's answer"
    );
    let mine: Vec<&Value> = procs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["backup_id"] == id.as_str() && p["alive"] == true)
        .collect();
    assert_eq!(mine.len(), 2, "{procs}");
    let (code, table, err) = console(&sys, &["processes"]);
    assert_eq!(code, 0, "{err}");
    for p in &mine {
        assert!(table.contains(&p["pid"].to_string()), "{table}");
    }
    let (code, table, err) = console(&sys, &["ports"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("2 held"), "{table}");
    assert!(table.contains(&id), "{table}");
    let (code, out, _) = console(&sys, &["ports", "--json"]);
    assert_eq!(code, 0);
    let ports: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ports["allocations"].as_array().unwrap().len(), 2, "{ports}");

    let done = sys.wait_completed(&id).await;
    assert_eq!(done["status"], "completed");

    // The follower saw the job's steps live, in order, before it ended, then its completion.
    let t = Instant::now();
    let mut steps = Vec::new();
    let mut completed_at = None;
    while completed_at.is_none() {
        let left = Duration::from_secs(30).saturating_sub(t.elapsed());
        let (at, line) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no completed event for {id}; saw {steps:?}"));
        let v: Value = serde_json::from_str(&line).expect("one JSON object a line");
        if v["kind"] == "job_event" && v["event"]["backup_id"] == id.as_str() {
            let step = v["event"]["step"].as_str().unwrap().to_string();
            if step == "completed" {
                completed_at = Some(at);
            }
            steps.push(step);
        }
    }
    for want in [
        "created",
        "port_allocated",
        "running",
        "node_accepted",
        "finalizing",
    ] {
        assert!(
            steps.iter().any(|s| s == want),
            "{want} missing from {steps:?}"
        );
    }
    let _ = follower.kill();
    let _ = follower.wait();

    // The hub learns a node's tunnel state from its first probe of the node: until then a
    // node's `tunnel` is null, and a probe between the console's read and the test's would
    // make them differ. Wait for it (the state then stays, `since` included).
    let t = Instant::now();
    while sys.api.get_ok("/api/v1/nodes").await[0]["tunnel"].is_null() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the hub never probed the node's tunnel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every list: a table that fits 80 columns naming what the API lists, and its JSON.
    let vm = sys.vm_name.clone();
    let node = sys.node.opts.name.clone();
    for (cmd, path, must) in [
        ("vms", "/api/v1/vms", vm.as_str()),
        ("nodes", "/api/v1/nodes", node.as_str()),
        ("tunnel", "/api/v1/tunnel", node.as_str()),
        ("repositories", "/api/v1/repositories", "default"),
    ] {
        let (code, table, err) = console(&sys, &[cmd]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(table.contains(must), "{cmd}: {table}");
        for l in table.lines() {
            assert!(
                l.chars().count() <= 80,
                "{cmd}: line over 80 columns: {l:?}"
            );
        }
        let (code, out, err) = console(&sys, &[cmd, "--json"]);
        assert_eq!(code, 0, "{cmd}: {err}");
        let mut got: Value = serde_json::from_str(&out).unwrap();
        let mut want = sys.api.get_ok(path).await;
        if cmd == "tunnel" || cmd == "repositories" || cmd == "nodes" {
            // Live figures (free bytes, last seen, probe answers) move between two reads.
            for v in [&mut got, &mut want] {
                for e in v.as_array_mut().unwrap() {
                    for k in ["free_bytes", "last_seen_at", "live", "error"] {
                        e.as_object_mut().unwrap().remove(k);
                    }
                }
            }
        }
        assert_eq!(got, want, "{cmd} --json");
    }
    let (code, table, _) = console(&sys, &["vms"]);
    assert_eq!(code, 0);
    let row = table.lines().find(|l| l.starts_with(&vm)).unwrap();
    assert!(row.contains(" ago"), "the VM's last backup: {row}");
    let (code, out, err) = console(&sys, &["health"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("healthy"), "{out}");
    let (code, out, _) = console(&sys, &["health", "--json"]);
    assert_eq!(code, 0);
    let h: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h["pid"], sys.hub.pid(), "{h}");

    job_commands(&sys, &id, &vm, &node).await;

    // A hub that is not there: exit status 1 and the cause, for every command.
    let dead = std::process::Command::new(bin_path("sendense-console"))
        .args(["--hub", "http://127.0.0.1:9", "--token-file"])
        .arg(sys.hub.opts.data_dir.join("token"))
        .arg("vms")
        .env("HOME", sys.tmp.path())
        .env_remove("SENDENSE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(dead.status.code(), Some(1));
    let err = String::from_utf8_lossy(&dead.stderr);
    assert!(err.contains("127.0.0.1:9"), "{err}");
}

/// The one-shot job commands against the real hub, on the completed point `id` of `vm`.
async fn job_commands(sys: &Sys, id: &str, vm: &str, node: &str) {
    let json_of = |args: &[&str]| -> Value {
        let (code, out, err) = console(sys, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    // The job tables fit 80 columns: they show the shortest prefix of each id (8 characters
    // at least) that tells the listed ids apart, and every command taking an id takes it.
    let names = |args: &[&str], must: &str| {
        let (code, table, err) = console(sys, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(table.contains(must), "{args:?}: {table}");
        for l in table.lines() {
            assert!(
                l.chars().count() <= 80,
                "{args:?}: line over 80 columns: {l:?}"
            );
        }
    };

    // Lists: the table names the point, the JSON is the API's.
    names(&["backups", "list"], &id[..8]);
    assert_eq!(
        json_of(&["backups", "list", "--json"]),
        sys.api.get_ok("/api/v1/backups").await
    );
    names(&["points", "list", vm], &id[..8]);
    // The points of the hub's plan, as a list.
    assert_eq!(
        json_of(&["points", "list", vm, "--json"]),
        sys.api.get_ok(&format!("/api/v1/vms/{vm}/points")).await["points"]
    );

    // Protect (by the table's short id) and unprotect: the hub's point says so after each.
    let b = json_of(&["point", "protect", &id[..8], "--json"]);
    assert_eq!(b["protected"], true, "{b}");
    let api = sys.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(api["protected"], true, "{api}");
    json_of(&["point", "unprotect", id, "--json"]);
    let api = sys.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    assert_eq!(api["protected"], false, "{api}");

    // A verify job, followed to its end: exit 0, and listed as the API lists it.
    let (code, out, err) = console(sys, &["verify", "--backup", id, "--wait"]);
    assert_eq!(code, 0, "verify --wait: {out}{err}");
    let jobs = json_of(&["verify", "list", "--json"]);
    assert_eq!(jobs, sys.api.get_ok("/api/v1/verify").await);
    let mine = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["scope"] == format!("backup:{id}"))
        .unwrap_or_else(|| panic!("no verify job of {id}: {jobs}"));
    assert_eq!(mine["status"], "completed", "{mine}");
    assert_eq!(mine["corrupt"], serde_json::json!([]), "{mine}");

    // A restore of disk 2000 onto the node, followed to its end; the image is there.
    let restore_start = |path: &std::path::Path, extra: &[&str]| {
        let path = path.to_str().unwrap();
        let mut args = vec![
            "restore", "start", id, "--node", node, "--path", path, "--disk", "2000",
        ];
        args.extend_from_slice(extra);
        console(sys, &args)
    };
    let target = sys.path("cli-restore.qcow2");
    let (code, out, err) = restore_start(&target, &["--wait", "--json"]);
    assert_eq!(code, 0, "restore start --wait: {out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["status"], "completed", "{r}");
    assert!(target.is_file(), "{} not written", target.display());
    let listed = json_of(&["restores", "list", "--json"]);
    assert_eq!(listed, sys.api.get_ok("/api/v1/restores").await);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["restore_id"] == r["restore_id"]),
        "{listed}"
    );

    // A restore started without --wait prints its id; `restore cancel` stops it mid-copy (the
    // node copies at 12 MiB/s here) and nothing of it stays: the job ends cancelled, the
    // partial image is gone.
    let partial = sys.path("cli-cancelled.qcow2");
    let (code, out, err) = restore_start(&partial, &[]);
    assert_eq!(code, 0, "restore start: {err}");
    let rid = out.trim().to_string();
    let r = json_of(&["restore", "cancel", &rid, "--json"]);
    assert_eq!(r["restore_id"], rid.as_str(), "{r}");
    let t = Instant::now();
    let ended = loop {
        let r = sys.api.get_ok(&format!("/api/v1/restores/{rid}")).await;
        if ["completed", "failed", "cancelled"].contains(&r["status"].as_str().unwrap_or("")) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "restore {rid} did not end: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert!(
        !partial.exists(),
        "the cancelled restore left {}",
        partial.display()
    );

    // `verify cancel` of a job that has ended is refused with its state.
    let vid = mine["verify_id"].as_str().unwrap();
    names(&["verify", "list"], &vid[..8]);
    names(&["restores", "list"], &rid[..8]);
    let (code, _, err) = console(sys, &["verify", "cancel", &vid[..8]]);
    assert_ne!(code, 0, "cancelling an ended verify job must fail");
    assert!(
        err.contains("completed"),
        "the cause names its state: {err}"
    );

    // An incremental started and followed from the CLI; cancelling it once ended is refused
    // with the cause.
    let (code, out, err) = console(
        sys,
        &[
            "backup",
            "start",
            vm,
            "--type",
            "incremental",
            "--wait",
            "--json",
        ],
    );
    assert_eq!(code, 0, "backup start --wait: {out}{err}");
    let inc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inc["status"], "completed", "{inc}");
    assert_eq!(inc["backup_type"], "incremental", "{inc}");
    let inc_id = inc["backup_id"].as_str().unwrap();
    // A prefix no id has, or one too short to be sure of, is refused naming it.
    let (code, _, err) = console(sys, &["backup", "cancel", "ffffffff"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no backup has an id starting with 'ffffffff'"),
        "{err}"
    );
    let (code, _, err) = console(sys, &["point", "protect", &inc_id[..3]]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("too short"), "{err}");
    let (code, _, err) = console(sys, &["backup", "cancel", inc_id]);
    assert_ne!(code, 0, "cancelling a completed backup must fail");
    assert!(
        err.contains("completed"),
        "the cause names its state: {err}"
    );
}
