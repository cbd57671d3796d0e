//! File-level restore: a VM whose data disk is an ext4 built with `mkfs.ext4 -d` from known
//! files (a link pointing outside, a non-UTF-8 name, a 50 MiB pseudo-random file, a nested
//! directory with modes and owners) is backed up through the real hub and node; then the hub's
//! libguestfs appliance browses the point: listings carry the metadata, `files/archive` tars
//! unpack byte-equal, the outside-pointing link comes back as a link, bad input is a 4xx naming
//! the field, the repository image is untouched and unlocked, and a SIGKILLed hub leaves no
//! guestfish or appliance behind. One appliance session serves every assertion.

use super::sys::{full_backup_completes, hub_bin, node_bin, node_options};
use base64::Engine;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::NodeProcess;
use sendense_tests::qemu::TestVm;
use serde_json::Value;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;
const BIG: usize = 50 << 20;
const BAD_NAME: &[u8] = b"bad-\xff\xfe-name.txt";
const MTIME: i64 = 1_700_000_000;

fn run(cmd: &mut Command) -> String {
    eprintln!("+ {cmd:?}");
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Mode and owner of `p` (not following a link).
fn own(p: &Path, mode: u32, uid: u32, gid: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// The tree the guest's data disk holds.
fn build_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("nested/deep")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello from the guest\n").unwrap();
    own(&dir.join("hello.txt"), 0o640, 1001, 1002);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.join("hello.txt"))
        .unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(MTIME as u64))
        .unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("out-link")).unwrap();
    std::os::unix::fs::symlink("../../..", dir.join("up-link")).unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(BAD_NAME)), b"odd name\n").unwrap();
    std::fs::write(dir.join("big.bin"), pseudo_random(BIG)).unwrap();
    std::fs::write(dir.join("nested/deep/note.txt"), b"deep note\n").unwrap();
    own(&dir.join("nested/deep/note.txt"), 0o604, 1000, 1000);
    own(&dir.join("nested/deep"), 0o700, 42, 43);
    own(&dir.join("nested"), 0o750, 1234, 5678);
}

fn set_clock(file: &Path, at: chrono::DateTime<chrono::Utc>) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, at.to_rfc3339()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Children of `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            v.push(p);
        }
    }
    v
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for this purpose only once reaped; /proc/PID/stat state Z counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s[s.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => false,
    }
}

struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    async fn get(&self, path: &str, query: &[(&str, String)]) -> reqwest::Response {
        self.http
            .get(format!("{}{path}?{}", self.base, encode_query(query)))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(300))
            .send()
            .await
            .expect("request")
    }

    async fn json(&self, path: &str, query: &[(&str, String)]) -> (u16, Value) {
        let r = self.get(path, query).await;
        let s = r.status().as_u16();
        (s, r.json().await.expect("JSON body"))
    }

    /// The archive, unpacked by GNU tar (numeric owners, modes kept) into a new directory.
    async fn untar(&self, path: &str, query: &[(&str, String)], into: &Path) -> (u64, Duration) {
        let t = Instant::now();
        let r = self.get(path, query).await;
        assert_eq!(r.status().as_u16(), 200, "{query:?}");
        assert_eq!(r.headers()["content-type"], "application/x-tar");
        let body = r.bytes().await.expect("tar body");
        let took = t.elapsed();
        std::fs::create_dir_all(into).unwrap();
        let tarfile = into.with_extension("tar");
        std::fs::write(&tarfile, &body).unwrap();
        run(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&tarfile)
            .arg("-C")
            .arg(into));
        (body.len() as u64, took)
    }
}

/// `k=v&...`, every byte but unreserved ones percent-encoded.
fn encode_query(q: &[(&str, String)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    q.iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn entry<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entry {name:?} in {list:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_browse_a_point_in_one_appliance() {
    let tmp = tempfile::Builder::new()
        .prefix("sde2e-files-")
        .tempdir()
        .unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    let raw = tmp.path().join("data.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&raw)
        .arg("128M"));

    // The hub's clock from a file (its test knob): the idle timeout is passed by moving it.
    let clock = tmp.path().join("clock");
    set_clock(&clock, chrono::Utc::now());
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, "files_idle_timeout_secs = 600\n").unwrap();
    let mut hopts = HubOptions::new(tmp.path().join("hub"));
    hopts.extra_args.extend([
        "--test-clock-file".to_string(),
        clock.display().to_string(),
        "--config".to_string(),
        cfg.display().to_string(),
    ]);
    hopts
        .env
        .push(("LIBGUESTFS_BACKEND".into(), "direct".into()));
    hopts
        .env
        .push(("LIBGUESTFS_BACKEND_SETTINGS".into(), "force_tcg".into()));
    let mut hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
    let api = hub.api();
    let vm_name = "files1";
    let raw2 = raw.clone();
    let vm = TestVm::start(
        vm_name,
        &tmp.path().join("vm"),
        &[64 * MIB, 128 * MIB],
        move |imgs| {
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw2)
                .arg(&imgs[1]));
        },
    )
    .await
    .expect("start QEMU");
    let node = NodeProcess::start(
        &node_bin(),
        node_options(
            &hub,
            tmp.path(),
            vm_name,
            vec![(vm_name.to_string(), vm.node_qmp.clone())],
            None,
        ),
    )
    .expect("start sendense-node");
    super::sys::Jobs {
        api: &api,
        node: &node,
        vm: vm_name,
        repository: "default",
    }
    .wait_vm_imported(|d| d.len() == 2)
    .await;
    let b = full_backup_completes(&api, vm_name, &node).await;
    let id = b["backup_id"].as_str().unwrap().to_string();
    let data_disk = b["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["unit_number"] == 1)
        .expect("disk unit 1")
        .clone();
    let disk = data_disk["disk_key"].as_i64().unwrap().to_string();
    let image = PathBuf::from(data_disk["qcow2_path"].as_str().unwrap());
    let image_copy = tmp.path().join("image-before.qcow2");
    std::fs::copy(&image, &image_copy).unwrap();
    let image_mtime = std::fs::metadata(&image).unwrap().mtime();

    let c = Client {
        base: hub.url.clone(),
        token: hub.token.clone(),
        http: reqwest::Client::new(),
    };
    let files = format!("/api/v1/backups/{id}/files");
    let archive = format!("{files}/archive");
    let q = |path: &str| vec![("disk", disk.clone()), ("path", path.to_string())];

    // The first request launches the appliance; the filesystems of the disk.
    let t = Instant::now();
    let (s, fss) = c.json(&files, &[("disk", disk.clone())]).await;
    let first = t.elapsed();
    assert_eq!(s, 200, "{fss:#}\nhub: {}", hub.stderr());
    assert!(
        fss["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["fs_type"] == "ext4"),
        "{fss:#}"
    );

    // The guestfish child and its appliance, children of the hub.
    let gf: Vec<u32> = children(hub.pid())
        .into_iter()
        .filter(|p| cmdline(*p).contains("guestfish"))
        .collect();
    assert_eq!(
        gf.len(),
        1,
        "one guestfish under the hub: {:?}",
        children(hub.pid())
            .iter()
            .map(|p| cmdline(*p))
            .collect::<Vec<_>>()
    );
    let appliance: Vec<u32> = children(gf[0])
        .into_iter()
        .filter(|p| cmdline(*p).contains("qemu"))
        .collect();
    assert_eq!(
        appliance.len(),
        1,
        "guestfish's appliance: {:?}",
        children(gf[0])
            .iter()
            .map(|p| cmdline(*p))
            .collect::<Vec<_>>()
    );

    // The root directory: every entry's metadata.
    let t = Instant::now();
    let (s, root) = c.json(&files, &q("/")).await;
    let second = t.elapsed();
    assert_eq!(s, 200, "{root:#}");
    let hello = entry(&root, "hello.txt");
    assert_eq!(hello["kind"], "file");
    assert_eq!(hello["size"], 21);
    assert_eq!(hello["mode"], 0o640);
    assert_eq!(
        (hello["uid"].as_u64(), hello["gid"].as_u64()),
        (Some(1001), Some(1002))
    );
    assert_eq!(hello["mtime"], MTIME);
    let out = entry(&root, "out-link");
    assert_eq!(out["kind"], "symlink");
    assert_eq!(out["link_target"], "/etc/passwd");
    assert_eq!(entry(&root, "up-link")["link_target"], "../../..");
    assert_eq!(entry(&root, "big.bin")["size"], BIG as u64);
    let nested = entry(&root, "nested");
    assert_eq!(nested["kind"], "directory");
    assert_eq!(nested["mode"], 0o750);
    assert_eq!(
        (nested["uid"].as_u64(), nested["gid"].as_u64()),
        (Some(1234), Some(5678))
    );
    let bad = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name_b64"].is_string())
        .unwrap_or_else(|| panic!("no non-UTF-8 name in {root:#}"));
    let bad_bytes = base64::engine::general_purpose::STANDARD
        .decode(bad["name_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bad_bytes, BAD_NAME);
    assert_eq!(bad["name"], String::from_utf8_lossy(BAD_NAME).as_ref());

    let t = Instant::now();
    let (s, deep) = c.json(&files, &q("/nested/./deep/")).await;
    let third = t.elapsed();
    assert_eq!(s, 200, "{deep:#}");
    assert_eq!(deep["path"], "/nested/deep");
    let note = entry(&deep, "note.txt");
    assert_eq!(
        (
            note["mode"].as_u64(),
            note["uid"].as_u64(),
            note["size"].as_u64()
        ),
        (Some(0o604), Some(1000), Some(10))
    );

    // Archives: the 50 MiB file, the non-UTF-8 name (asked by its bytes), a directory, the link.
    let got = tmp.path().join("got-big");
    let (n, took) = c.untar(&archive, &q("/big.bin"), &got).await;
    let big = std::fs::read(got.join("big.bin")).unwrap();
    assert!(
        big == pseudo_random(BIG),
        "big.bin differs after the round trip"
    );
    let mib_s = n as f64 / MIB as f64 / took.as_secs_f64();

    let got = tmp.path().join("got-bad");
    let mut bad_path = b"/".to_vec();
    bad_path.extend_from_slice(BAD_NAME);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bad_path);
    c.untar(&archive, &[("disk", disk.clone()), ("path_b64", b64)], &got)
        .await;
    assert_eq!(
        std::fs::read(got.join(OsStr::from_bytes(BAD_NAME))).unwrap(),
        b"odd name\n"
    );

    let got = tmp.path().join("got-nested");
    c.untar(&archive, &q("/nested"), &got).await;
    let m = std::fs::metadata(got.join("deep")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o700, 42, 43));
    let m = std::fs::metadata(got.join("deep/note.txt")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o604, 1000, 1000));
    assert_eq!(
        std::fs::read(got.join("deep/note.txt")).unwrap(),
        b"deep note\n"
    );

    let got = tmp.path().join("got-link");
    c.untar(&archive, &q("/out-link"), &got).await;
    let l = got.join("out-link");
    assert!(
        std::fs::symlink_metadata(&l)
            .unwrap()
            .file_type()
            .is_symlink(),
        "out-link comes back as a link"
    );
    assert_eq!(std::fs::read_link(&l).unwrap(), Path::new("/etc/passwd"));

    // The whole root: the links are links in it, nothing of the hub's /etc came along.
    let got = tmp.path().join("got-root");
    c.untar(&archive, &q("/"), &got).await;
    for name in ["out-link", "up-link"] {
        assert!(
            std::fs::symlink_metadata(got.join(name))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read(got.join("hello.txt")).unwrap(),
        b"hello from the guest\n"
    );

    // Bad input: 4xx naming the field.
    type Query<'a> = Vec<(&'a str, String)>;
    let cases: Vec<(Query, u16, &str)> = vec![
        (q("etc/passwd"), 422, "path:"),
        (q("/nested/../etc"), 422, "path:"),
        (q("/no-such-dir"), 404, "path:"),
        (q("/out-link/x"), 422, "path:"),
        (q("/hello.txt"), 422, "path:"),
        (
            vec![("disk", "9999".into()), ("path", "/".into())],
            404,
            "disk:",
        ),
        (
            vec![
                ("disk", disk.clone()),
                ("fs", "/dev/nope".into()),
                ("path", "/".into()),
            ],
            404,
            "fs:",
        ),
        (
            vec![("disk", disk.clone()), ("path_b64", "!!".into())],
            422,
            "path_b64:",
        ),
    ];
    for (query, status, field) in cases {
        let (s, v) = c.json(&files, &query).await;
        assert_eq!(s, status, "{query:?}: {v:#}");
        assert!(
            v["detail"].as_str().unwrap().starts_with(field),
            "{query:?}: {v:#}"
        );
    }
    let (s, v) = c.json(&archive, &q("/missing")).await;
    assert_eq!(
        (s, v["detail"].as_str().unwrap().starts_with("path:")),
        (404, true),
        "{v:#}"
    );
    let r = reqwest::Client::new()
        .get(format!("{}{files}", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "no token, no files");

    // The console's CLI against the same session: `files ls` (text and JSON), `files get`
    // of the non-UTF-8 name (an OsString argument) into a file, a bad path named.
    let console = |args: &[&OsStr]| {
        let mut cmd = Command::new(sendense_tests::bin_path("sendense-console"));
        cmd.arg("--hub")
            .arg(&hub.url)
            .arg("--token-file")
            .arg(hub.opts.data_dir.join("token"))
            .args(args)
            .env("HOME", tmp.path())
            .env_remove("SENDENSE_TOKEN")
            .env_remove("SENDENSE_HUB_URL");
        cmd
    };
    let o = |s: &str| OsStr::new(s).to_os_string();
    let out = console(&[
        &o("files"),
        &o("ls"),
        &o(&id),
        &o("--disk"),
        &o(&disk),
        &o("/nested/deep"),
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.starts_with("-rw----r--")
            && l.contains("1000:1000")
            && l.ends_with(" note.txt")),
        "{text}"
    );
    let out = console(&[
        &o("files"),
        &o("ls"),
        &o(&id),
        &o("--disk"),
        &o(&disk),
        &o("/"),
        &o("--json"),
    ])
    .output()
    .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entry(&v, "out-link")["link_target"], "/etc/passwd");
    let tarfile = tmp.path().join("cli-bad.tar");
    let f = std::fs::File::create(&tarfile).unwrap();
    let out = console(&[
        &o("files"),
        &o("get"),
        &o(&id),
        &o("--disk"),
        &o(&disk),
        OsStr::from_bytes(&bad_path),
    ])
    .stdout(f)
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = tmp.path().join("got-cli");
    std::fs::create_dir_all(&got).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tarfile)
        .arg("-C")
        .arg(&got));
    assert_eq!(
        std::fs::read(got.join(OsStr::from_bytes(BAD_NAME))).unwrap(),
        b"odd name\n"
    );
    let out = console(&[
        &o("files"),
        &o("ls"),
        &o(&id),
        &o("--disk"),
        &o(&disk),
        &o("relative/x"),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("path:"), "{err}");

    // Read-only: no write lock on the chain (qemu-img info takes a shared lock), bytes and
    // mtime unchanged.
    run(Command::new("qemu-img").arg("info").arg(&image));
    run(Command::new("cmp").arg(&image).arg(&image_copy));
    assert_eq!(std::fs::metadata(&image).unwrap().mtime(), image_mtime);
    // Still one appliance: every request above was served by the session of the first.
    assert!(gf.iter().chain(&appliance).all(|p| alive(*p)));
    assert_eq!(
        children(hub.pid())
            .into_iter()
            .filter(|p| cmdline(*p).contains("guestfish"))
            .count(),
        1
    );

    // Idle for longer than the timeout (the clock moved 11 minutes): the session is closed,
    // guestfish and its appliance gone, the session's directory removed.
    set_clock(&clock, chrono::Utc::now() + chrono::TimeDelta::seconds(660));
    let t = Instant::now();
    while gf.iter().chain(&appliance).any(|p| alive(*p)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "idle session not closed: {}",
            hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sessions = hub.opts.data_dir.join("files/sessions");
    assert_eq!(
        std::fs::read_dir(&sessions).map(|d| d.count()).unwrap_or(0),
        0,
        "{}",
        sessions.display()
    );
    // The next request opens a new session.
    let t = Instant::now();
    let (s, _) = c.json(&files, &q("/nested")).await;
    let relaunch = t.elapsed();
    assert_eq!(s, 200);
    let gf: Vec<u32> = children(hub.pid())
        .into_iter()
        .filter(|p| cmdline(*p).contains("guestfish"))
        .collect();
    assert_eq!(gf.len(), 1);
    let appliance: Vec<u32> = children(gf[0])
        .into_iter()
        .filter(|p| cmdline(*p).contains("qemu"))
        .collect();
    assert_eq!(appliance.len(), 1);

    eprintln!(
        "figures: relaunch after the idle close {:.2} s",
        relaunch.as_secs_f64()
    );
    eprintln!(
        "figures: first request (appliance launch) {:.2} s; later listings {:.3} s (/), {:.3} s (/nested/deep); \
         big.bin tar {n} bytes in {:.2} s = {mib_s:.1} MiB/s",
        first.as_secs_f64(),
        second.as_secs_f64(),
        third.as_secs_f64(),
        took.as_secs_f64()
    );

    // A SIGKILLed hub takes guestfish and its appliance with it.
    hub.kill9();
    let t = Instant::now();
    while gf.iter().chain(&appliance).any(|p| alive(*p)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "guestfish {gf:?} / appliance {appliance:?} outlived the hub"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "figures: guestfish and appliance gone {:.1} s after the hub's SIGKILL",
        t.elapsed().as_secs_f64()
    );
    drop(node);
    drop(vm);
}
