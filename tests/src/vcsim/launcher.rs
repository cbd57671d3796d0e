//! The simulator's launcher (`tests/vcsim/*.go`): built with Debian's Go and govmomi sources
//! once per target directory, named after a hash of its sources.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Where Debian's govmomi sources live (GOPATH mode).
const GOPATH: &str = "/usr/share/gocode";
const SIMULATOR_SRC: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
/// The launcher's sources, hashed into the binary's name so an edit rebuilds it.
const SOURCES: &[&str] = &["main.go", "setup.go", "vm.go", "control.go"];

/// FNV-1a, stable across builds (the binary's name must not change with the toolchain).
fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The launcher binary for the current sources, built once per target directory: named after a
/// hash of its sources, built under an exclusive `flock` (parallel test processes wait for one
/// build) into a temporary name, then renamed into place.
pub fn launcher_binary() -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("vcsim");
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for name in SOURCES {
        let p = src.join(name);
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        h = fnv1a(name.as_bytes(), h);
        h = fnv1a(&text, h);
    }
    let out_dir = target_dir().join("vcsim");
    let bin = out_dir.join(format!("vcsim-launcher-{h:016x}"));
    if bin.exists() {
        return Ok(bin);
    }
    let go = crate::which("go");
    if go.is_none() || !Path::new(SIMULATOR_SRC).is_dir() {
        bail!(
            "the vSphere tests need Go and govmomi's simulator: install the Debian packages \
             golang-go and golang-github-vmware-govmomi-dev (scripts/setup.sh packages); \
             missing: {}",
            [
                go.is_none().then_some("go (golang-go)"),
                (!Path::new(SIMULATOR_SRC).is_dir())
                    .then_some("/usr/share/gocode (golang-github-vmware-govmomi-dev)")
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        );
    }
    std::fs::create_dir_all(&out_dir)?;
    let lock_path = out_dir.join("build.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("flock {}: {e}", lock_path.display()))?;
    if bin.exists() {
        return Ok(bin);
    }
    let tmp = out_dir.join(format!("vcsim-launcher.tmp-{}", std::process::id()));
    let gocache = std::env::var_os("GOCACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| out_dir.join("gocache"));
    let mut cmd = Command::new(go.expect("checked above"));
    cmd.arg("build")
        .arg("-o")
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", &gocache)
        .env("GOFLAGS", "");
    let t = Instant::now();
    eprintln!(
        "+ (cd {} && GO111MODULE=off GOPATH={GOPATH} {})",
        src.display(),
        crate::describe(&cmd)
    );
    let out = cmd.output().context("running go build")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "go build of the vcsim launcher failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &bin)?;
    // Binaries of older sources are of no use any more (a running one keeps its inode).
    for e in std::fs::read_dir(&out_dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("vcsim-launcher-") && e.path() != bin {
            let _ = std::fs::remove_file(e.path());
        }
    }
    eprintln!("built {} in {:.1?}", bin.display(), t.elapsed());
    Ok(bin)
}

/// `target/` of the running test (`target/<profile>/deps/<test>` → `target`).
fn target_dir() -> PathBuf {
    let profile_dir = crate::bin_path("x");
    let profile_dir = profile_dir.parent().expect("target/<profile>");
    profile_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| profile_dir.to_path_buf())
}
