//! Stamps the build with the git commit and the build time, so that every binary can say
//! exactly which build is answering on a port (`--version`, `/health`).
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let commit = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=SENDENSE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=SENDENSE_BUILD_EPOCH={epoch}");
    // Re-stamp only when the checked-out branch changes: watching the index or refs would
    // rebuild every crate of the workspace on each commit. A clean build (CI, release) is exact.
    // In a linked worktree `.git` is a file; its HEAD lives where `git rev-parse --git-dir`
    // says (watching a path that does not exist would rerun this on every build).
    let head = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("HEAD"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "../.git/HEAD".into());
    println!("cargo:rerun-if-changed={}", head.display());
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}
