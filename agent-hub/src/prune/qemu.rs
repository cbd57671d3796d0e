//! The qemu-img commands of the merge engine, each with its full command line in errors:
//! `commit -d -b BASE TOP` (merge), `rebase -b NEW TOP` in safe mode (rebase), `info` (which
//! backing file an image names now), `map` (what each layer holds, for the estimates),
//! `check -r leaks` (after an interrupted write). A long command is spawned with its PID handed
//! to the caller before it writes, so the journal can name it and a later start-up can stop it
//! ([`stop_orphan`]) before it redoes the step.
//!
//! A long command runs under `setpriv --pdeathsig KILL` (util-linux, on every Debian): if the
//! hub dies, its qemu-img dies with it instead of writing on, unsupervised, holding the image
//! locks so that no point of the chain can be read until the next start. (Setting the parent
//! death signal ourselves would need `unsafe` `pre_exec`; the workspace forbids unsafe code.)

use crate::repository::RepoError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

fn line(args: &[String]) -> String {
    std::iter::once("qemu-img".to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn failed(cmd: String, out: &std::process::Output) -> RepoError {
    RepoError::Command {
        command: cmd,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

async fn output(args: Vec<String>) -> Result<(String, std::process::Output), RepoError> {
    let cmd = line(&args);
    let out = Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| RepoError::Spawn {
            program: "qemu-img",
            source,
        })?;
    if !out.status.success() {
        return Err(failed(cmd, &out));
    }
    Ok((cmd, out))
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A started long command.
pub struct Running {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub command: String,
}

impl Running {
    /// Waits for the end; an exit status other than 0 is the command's error with its stderr.
    pub async fn wait(self) -> Result<(), RepoError> {
        let out = self
            .child
            .wait_with_output()
            .await
            .map_err(|source| RepoError::Spawn {
                program: "qemu-img",
                source,
            })?;
        if !out.status.success() {
            return Err(failed(self.command, &out));
        }
        Ok(())
    }
}

fn spawn(args: Vec<String>) -> Result<Running, RepoError> {
    let command = line(&args);
    tracing::info!(command = %command, "prune: running");
    let child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "qemu-img"])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RepoError::Spawn {
            program: "setpriv (running qemu-img)",
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    Ok(Running {
        child,
        pid,
        command,
    })
}

/// `qemu-img commit -d -b BASE TOP`: writes every cluster the layers above `base` hold (as
/// `top` reads them) into `base`, leaving `top` and the layers between untouched (`-d`). `rate`
/// (bytes/s) is the test knob's slow-down.
pub fn commit(top: &Path, base: &Path, rate: Option<u64>) -> Result<Running, RepoError> {
    let mut args: Vec<String> = vec![
        "commit".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-t".into(),
        "writeback".into(),
        "-d".into(),
        "-b".into(),
        s(base),
    ];
    if let Some(r) = rate {
        args.extend(["-r".into(), r.to_string()]);
    }
    args.push(s(top));
    spawn(args)
}

/// `qemu-img rebase -b NEW -F qcow2 TOP` (safe mode): copies into `top` every cluster where
/// the old and the new backing chain differ, then writes the new backing file name. `None`:
/// no backing file any more (everything below is copied in).
pub fn rebase(top: &Path, new_backing: Option<&str>) -> Result<Running, RepoError> {
    let mut args: Vec<String> = vec!["rebase".into(), "-q".into(), "-f".into(), "qcow2".into()];
    match new_backing {
        Some(b) => args.extend(["-F".into(), "qcow2".into(), "-b".into(), b.into()]),
        None => args.extend(["-b".into(), String::new()]),
    }
    args.push(s(top));
    spawn(args)
}

/// `qemu-img rebase -u`: only the header's backing file name (the undo of a rebase whose
/// result did not read back equal: the copied clusters equal the old chain's).
pub async fn rebase_unsafe(top: &Path, backing: &str) -> Result<(), RepoError> {
    output(vec![
        "rebase".into(),
        "-u".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        "qcow2".into(),
        "-b".into(),
        backing.into(),
        s(top),
    ])
    .await
    .map(|_| ())
}

#[derive(Deserialize)]
struct Info {
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// The backing file name `image` records now (as written: relative), `None` for a base.
pub async fn backing_of(image: &Path) -> Result<Option<String>, RepoError> {
    let (cmd, out) = output(vec![
        "info".into(),
        "-U".into(),
        "--output=json".into(),
        "-f".into(),
        "qcow2".into(),
        s(image),
    ])
    .await?;
    let i: Info = serde_json::from_slice(&out.stdout).map_err(|e| RepoError::Output {
        command: cmd,
        reason: e.to_string(),
    })?;
    Ok(i.backing_filename.filter(|b| !b.is_empty()))
}

/// One extent of `qemu-img map`.
#[derive(Debug, Clone, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    #[serde(default)]
    pub data: bool,
    #[serde(default)]
    pub present: Option<bool>,
}

/// Where each range of `image`'s chain comes from (depth 0: `image` itself).
pub async fn map(image: &Path) -> Result<Vec<Extent>, RepoError> {
    let (cmd, out) = output(vec![
        "map".into(),
        "-U".into(),
        "--output=json".into(),
        "-f".into(),
        "qcow2".into(),
        s(image),
    ])
    .await?;
    serde_json::from_slice(&out.stdout).map_err(|e| RepoError::Output {
        command: cmd,
        reason: e.to_string(),
    })
}

/// `qemu-img check -r leaks`: clusters an interrupted write allocated but never referenced
/// are freed (they hold nothing any read returns).
pub async fn repair_leaks(image: &Path) -> Result<(), RepoError> {
    output(vec![
        "check".into(),
        "-q".into(),
        "-r".into(),
        "leaks".into(),
        "-f".into(),
        "qcow2".into(),
        s(image),
    ])
    .await
    .map(|_| ())
}

/// Bytes a file uses on disk (its allocated blocks); 0 when it is gone.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Sorted, merged `[start, end)` ranges.
pub fn ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Bytes of `a` not covered by `b` (both as [`ranges`] makes them).
pub fn minus(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    for &(s, e) in a {
        let covered: u64 = b
            .iter()
            .map(|&(bs, be)| be.min(e).saturating_sub(bs.max(s)))
            .sum();
        total += (e - s) - covered.min(e - s);
    }
    total
}

/// The data ranges of `ext` provided by layers at `depths`.
pub fn data_at(ext: &[Extent], depths: std::ops::Range<u32>) -> Vec<(u64, u64)> {
    ranges(
        ext.iter()
            .filter(|e| e.data && e.present != Some(false) && depths.contains(&e.depth))
            .map(|e| (e.start, e.start + e.length))
            .collect(),
    )
}

/// Stops a qemu-img a previous hub process left running (the journal names its PID): only if
/// `/proc/PID/cmdline` is a qemu-img naming `image`; SIGKILL (its write is redone whole), then
/// waits until it is gone. Answers whether it was ours and alive.
pub async fn stop_orphan(pid: u32, image: &Path) -> bool {
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(_) => return false,
    };
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let ours = args.first().is_some_and(|a| a.ends_with("qemu-img"))
        && args.iter().any(|a| Path::new(a) == image);
    if !ours {
        return false;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..200 {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init: it writes nothing any more.
        if state.is_empty() || state.split(' ').nth(2) == Some("Z") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    true
}

/// Renames `from` over `to` and fsyncs the directory (the rename is the merge's commit point).
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Removes files; already gone is fine. Answers the bytes they used.
pub fn remove_all(files: &[PathBuf]) -> Result<u64, RepoError> {
    let mut freed = 0;
    for f in files {
        let used = allocated(f);
        match std::fs::remove_file(f) {
            Ok(()) => freed += used,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RepoError::Io {
                    what: "cannot remove pruned file",
                    path: f.clone(),
                    source,
                });
            }
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        let a = ranges(vec![(0, 10), (5, 20), (30, 40)]);
        assert_eq!(a, vec![(0, 20), (30, 40)]);
        assert_eq!(minus(&a, &ranges(vec![(10, 35)])), 10 + 5);
        assert_eq!(minus(&a, &[]), 30);
    }
}
