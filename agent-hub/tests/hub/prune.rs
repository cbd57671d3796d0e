//! Prune jobs on the real hub with real qemu-img: chains of points whose bytes the test knows
//! (a BLAKE3 of each instant's whole source disk), pruned by keep rules and protected flags;
//! after the prune every remaining point reads equal to its instant and the repository holds
//! no file that no point owns. [`crash`]: the hub SIGKILLed at each named moment of a merge.

mod crash;

use super::env::*;
use sendense_tests::disks;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const CELL: u64 = 4 * MIB;
pub const PRUNE_LIMIT: Duration = Duration::from_secs(120);

pub fn qemu_io_uri(uri: &str, cmd: &str) {
    sendense_tests::run(std::process::Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]));
}

/// A one-disk VM whose points the test made, with the BLAKE3 of the source at each instant.
pub struct Chain {
    pub vm: String,
    pub src: PathBuf,
    /// `(backup_id, hash of the whole disk at its instant)`, oldest first.
    pub points: Vec<(String, String)>,
}

/// `qemu-img check` exits 0: no corruption, no leak.
pub fn check_clean(p: &Path) -> bool {
    std::process::Command::new("qemu-img")
        .args(["check", "-q", "-U", "-f", "qcow2"])
        .arg(p)
        .status()
        .is_ok_and(|s| s.success())
}

pub fn whole_hash(p: &Path) -> String {
    blake3::hash(&disks::read_raw(p)).to_hex().to_string()
}

impl Chain {
    pub async fn new(env: &Env, vm: &str) -> Chain {
        let src = env.vm_with_sources(vm, &[2000]).await.remove(0);
        Chain {
            vm: vm.into(),
            src,
            points: Vec::new(),
        }
    }

    /// One more point: `kind` after writing 1 MiB of `pattern` at `mib` MiB into the source;
    /// the writer writes exactly that into an incremental (the whole source into a full) and
    /// reports the whole-disk grid.
    pub async fn point(&mut self, env: &Env, kind: &str, mib: u64, pattern: u8) -> String {
        disks::write_pattern(&self.src, mib * MIB, MIB, pattern);
        let (id, b) = env.backup(&self.vm, kind).await;
        assert_eq!(b["backup_type"], kind, "{b}");
        let uri = &targets(&b)[0].1;
        if kind == "full" {
            disks::nbdcopy_into(&self.src, uri);
        } else {
            qemu_io_uri(uri, &format!("write -P {pattern} {} {MIB}", mib * MIB));
        }
        let body = json!({"status": "completed", "disks": [{"disk_key": 2000,
            "status": "completed", "grid": grid_of(&self.src, CELL)}]});
        let done = env.complete_ok(&id, &body).await;
        assert_eq!(done["integrity"], "verified", "{done:#}");
        self.points.push((id.clone(), whole_hash(&self.src)));
        id
    }

    pub fn id(&self, i: usize) -> String {
        self.points[i].0.clone()
    }
}

/// Image path of a point's disk as the hub records it now.
pub async fn image(env: &Env, id: &str) -> PathBuf {
    let b = env.api.get_ok(&format!("/api/v1/backups/{id}")).await;
    image_paths(&b)[0].clone()
}

/// The repository's files (relative paths).
pub fn repo_files(env: &Env) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let root = env.hub.opts.data_dir.join("repo");
    let mut out = BTreeSet::new();
    walk(&root, &root, &mut out);
    out
}

/// Asserts what a user checks after a prune: exactly `kept` of the chain's points are in the
/// catalog (completed), each reads equal to its instant and passes `qemu-img check`, and the
/// repository holds only their images and sidecars.
pub async fn assert_remaining(env: &Env, chain: &Chain, kept: &BTreeSet<String>) {
    let all = env.api.get_ok("/api/v1/backups").await;
    let listed: BTreeSet<String> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["vm_name"] == chain.vm.as_str() && b["status"] == "completed")
        .map(|b| b["backup_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(&listed, kept, "the catalog's points");
    let mut owned = BTreeSet::new();
    let root = env.hub.opts.data_dir.join("repo");
    for (id, hash) in chain.points.iter().filter(|(id, _)| kept.contains(id)) {
        let img = image(env, id).await;
        assert_eq!(
            &whole_hash(&img),
            hash,
            "point {id} ({}) reads its instant",
            img.display()
        );
        assert!(check_clean(&img), "qemu-img check {}", img.display());
        owned.insert(img.strip_prefix(&root).unwrap().to_path_buf());
        let mut sums = img.clone().into_os_string();
        sums.push(".sums");
        owned.insert(
            PathBuf::from(sums)
                .strip_prefix(&root)
                .unwrap()
                .to_path_buf(),
        );
    }
    assert_eq!(repo_files(env), owned, "files no point owns");
}

pub async fn wait_prune(env: &Env, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let j = env.api.get_ok(&format!("/api/v1/prune/{id}")).await;
        if ["completed", "failed", "cancelled"].contains(&j["status"].as_str().unwrap()) {
            return j;
        }
        assert!(t.elapsed() < PRUNE_LIMIT, "prune {id} still {j:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn actions(plan: &Value) -> BTreeMap<String, (String, Value)> {
    plan["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["backup_id"].as_str().unwrap().to_string(),
                (
                    p["action"].as_str().unwrap().to_string(),
                    p["kept_by"].clone(),
                ),
            )
        })
        .collect()
}

/// Two chains, eight points, two of them protected: keep-last 2 keeps the two newest; the
/// newer chain's full is merged into its child, the older chain's newest point is deleted,
/// a middle point is rebased past, the old full merged into its protected child. The dry run
/// says exactly that, the real prune does exactly that, and the survivors read their instants.
#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_by_rule_and_protection_merges_rebases_deletes_and_matches_its_dry_run() {
    let env = Env::start();
    let mut c = Chain::new(&env, "pr").await;
    c.point(&env, "full", 8, 0x10).await; // p0
    c.point(&env, "incremental", 9, 0x11).await; // p1 (protected)
    c.point(&env, "incremental", 8, 0x12).await; // p2: overwrites p0's change
    c.point(&env, "incremental", 10, 0x13).await; // p3 (protected)
    c.point(&env, "incremental", 11, 0x14).await; // p4
    c.point(&env, "full", 12, 0x15).await; // p5
    c.point(&env, "incremental", 12, 0x16).await; // p6
    c.point(&env, "incremental", 13, 0x17).await; // p7
    for i in [1, 3] {
        let (s, b) = env
            .api
            .post(&format!("/api/v1/backups/{}/protect", c.id(i)), &json!({}))
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["protected"], true, "{b}");
    }
    // Independently: the two newest, and the protected ones.
    let kept: BTreeSet<String> = [7, 6, 3, 1].iter().map(|&i| c.id(i)).collect();

    let req = json!({"vm_name": "pr", "retention": {"keep_last": 2}});
    let (s, dry) = env.api.post("/api/v1/prune?dry_run=true", &req).await;
    assert_eq!(s, 200, "{dry}");
    let want: BTreeMap<String, (String, Value)> = [
        (7, "keep", json!("last")),
        (6, "keep", json!("last")),
        (5, "merge_into_child", Value::Null),
        (4, "delete", Value::Null),
        (3, "keep", json!("protected")),
        (2, "rebase_child", Value::Null),
        (1, "keep", json!("protected")),
        (0, "merge_into_child", Value::Null),
    ]
    .into_iter()
    .map(|(i, a, k)| (c.id(i), (a.to_string(), k)))
    .collect();
    assert_eq!(actions(&dry), want, "{dry:#}");
    assert!(dry["bytes_freed"].as_u64().unwrap() > 0, "{dry:#}");
    // A dry run changes nothing.
    let before = repo_files(&env);
    let points = env.api.get_ok("/api/v1/vms/pr/points?keep_last=2").await;
    assert_eq!(actions(&points), want);
    assert_eq!(repo_files(&env), before);

    let (s, job) = env.api.post("/api/v1/prune", &req).await;
    assert_eq!(s, 202, "{job}");
    assert_eq!(
        actions(&job["plan"]),
        want,
        "the job carries the dry run's plan"
    );
    let id = job["prune_id"].as_str().unwrap();
    // While it runs (or once it ran) no backup of the VM starts on a changing chain.
    let done = wait_prune(&env, id).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["steps_done"], 4, "{done:#}");
    assert_remaining(&env, &c, &kept).await;
    // The merged children are fulls now; the rebased one names its new parent.
    for i in [6, 1] {
        let b = env
            .api
            .get_ok(&format!("/api/v1/backups/{}", c.id(i)))
            .await;
        assert_eq!(b["backup_type"], "full", "{b}");
        assert!(disks::info(&image(&env, &c.id(i)).await)["backing-filename"].is_null());
    }
    let p3 = disks::info(&image(&env, &c.id(3)).await);
    assert_eq!(
        p3["backing-filename"],
        format!("{}.qcow2", c.id(1)),
        "{p3:#}"
    );
    // The rewritten points still verify against their stored checksums.
    let (s, v) = env
        .api
        .post("/api/v1/verify", &json!({"vm_name": "pr"}))
        .await;
    assert_eq!(s, 202, "{v}");
    let vid = v["verify_id"].as_str().unwrap();
    let t = Instant::now();
    let v = loop {
        let v = env.api.get_ok(&format!("/api/v1/verify/{vid}")).await;
        if v["status"] != "pending" && v["status"] != "running" {
            break v;
        }
        assert!(t.elapsed() < PRUNE_LIMIT);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["status"], "completed", "{v:#}");
    assert_eq!(v["corrupt"], json!([]), "{v:#}");
    // The next incremental builds on the newest point, which is still there.
    let next = c.point(&env, "incremental", 14, 0x18).await;
    let b = env.api.get_ok(&format!("/api/v1/backups/{next}")).await;
    assert_eq!(b["backup_type"], "incremental", "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_without_retention_or_policy_is_refused_naming_retention_and_a_busy_vm_is_refused() {
    let env = Env::start();
    let mut c = Chain::new(&env, "pq").await;
    c.point(&env, "full", 8, 0x10).await;
    let (s, v) = env
        .api
        .post("/api/v1/prune", &json!({"vm_name": "pq"}))
        .await;
    assert_refused_naming(s, &v, "retention");
    let (s, v) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": "pq", "retention": {"keep_last": 0}}),
        )
        .await;
    assert_refused_naming(s, &v, "retention");
    // A running backup holds the chain: the prune names it.
    let (bid, _) = env.backup("pq", "incremental").await;
    let (s, v) = env
        .api
        .post(
            "/api/v1/prune",
            &json!({"vm_name": "pq", "retention": {"keep_last": 1}}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains(&bid), "{v}");
    env.cancel_and_check(&bid).await;
    let space = env.api.get_ok("/api/v1/repositories/default/space").await;
    assert!(space["total_bytes"].as_u64().unwrap() > 0, "{space}");
    assert_eq!(space["vms"][0]["vm_name"], "pq", "{space}");
    assert!(
        space["growth_bytes_per_day"].as_f64().unwrap() > 0.0,
        "{space}"
    );
    assert!(space["full_in_days"].as_f64().is_some(), "{space}");
}
