//! The tests' real Linux guest (`scripts/guest.sh`): Debian's kernel and initramfs, a root ext4
//! holding busybox, `qemu-ga` (with an fsfreeze hook that prints `FREEZE`/`THAW` on the serial
//! console) and a writer, and an ext4 data disk the writer appends numbered, checksummed,
//! fsynced records to, printing `ACK N` on the serial console after each fsync.
//!
//! The images are built once per hash of their inputs (the script, the kernel, busybox and
//! qemu-ga as installed) into `target/guest/<hash>/` and reused by every later run; a build
//! goes to a temporary directory renamed into place, so concurrent test processes never see a
//! half-built guest. [`GuestImages::vm_disks`] gives each VM its own root (a qcow2 overlay of
//! the cached root) and its own copy of the empty data disk.

use anyhow::{Context, bail};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's record file on the data disk (as `debugfs -R "cat /records"` reads it).
pub const RECORDS_PATH: &str = "/records";

/// The cached, built guest.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    root: PathBuf,
    data: PathBuf,
}

/// Where the builder is.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest.sh")
}

/// `target/` of the running test (the cache's parent).
fn target_dir() -> PathBuf {
    let profile_dir = crate::bin_path("x");
    let profile_dir = profile_dir.parent().expect("target/<profile>");
    profile_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| profile_dir.to_path_buf())
}

/// What a build depends on: the script's text and the installed files it copies (by name,
/// size and modification time; a package upgrade changes them).
fn inputs_hash() -> anyhow::Result<String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(script())
        .context("reading scripts/guest.sh")?
        .hash(&mut h);
    let mut files: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("listing /boot (run scripts/setup.sh)")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") || n.starts_with("initrd.img-"))
        })
        .collect();
    files.sort();
    files.push("/bin/busybox".into());
    files.push("/usr/sbin/qemu-ga".into());
    for f in files {
        let m = std::fs::metadata(&f)
            .with_context(|| format!("{} (run scripts/setup.sh)", f.display()))?;
        f.hash(&mut h);
        m.len().hash(&mut h);
        m.modified().ok().hash(&mut h);
    }
    Ok(format!("{:016x}", h.finish()))
}

impl GuestImages {
    /// The cached guest, built first when its inputs changed.
    pub fn get() -> anyhow::Result<GuestImages> {
        let base = target_dir().join("guest");
        let dir = base.join(inputs_hash()?);
        if !dir.join("inputs").exists() {
            std::fs::create_dir_all(&base)?;
            let tmp = base.join(format!(".tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let t = std::time::Instant::now();
            crate::run(Command::new("bash").arg(script()).arg(&tmp));
            eprintln!("guest built in {:.1} s", t.elapsed().as_secs_f64());
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                // Another test process built it first: theirs is as good as ours.
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.join("inputs").exists() {
                    bail!("moving the built guest to {}: {e}", dir.display());
                }
            }
        }
        Ok(GuestImages {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            root: dir.join("root.qcow2"),
            data: dir.join("data.qcow2"),
            dir,
        })
    }

    /// A VM's own disks in `dir`: `[root overlay, data copy]` (`/dev/vda`, `/dev/vdb`).
    pub fn vm_disks(&self, dir: &Path, name: &str) -> anyhow::Result<Vec<PathBuf>> {
        let root = dir.join(format!("{name}-root.qcow2"));
        let data = dir.join(format!("{name}-data.qcow2"));
        crate::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&self.root)
                .arg(&root),
        );
        std::fs::copy(&self.data, &data)
            .with_context(|| format!("copying {} to {}", self.data.display(), data.display()))?;
        Ok(vec![root, data])
    }
}

/// One record line as the writer writes it: `R <n:08> payload-<n:08>-sendense <sum>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub number: u64,
    /// The line's checksum matches its body.
    pub checksum_ok: bool,
}

/// Parses the record file's text; a line that is not a whole record (a torn last line) is
/// returned as `Err` with its text.
pub fn parse_records(text: &str) -> Vec<Result<Record, String>> {
    text.lines()
        .map(|line| {
            let (body, sum) = line.rsplit_once(' ').ok_or_else(|| line.to_string())?;
            let number = body
                .strip_prefix("R ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| line.to_string())?;
            let expected = format!("R {number:08} payload-{number:08}-sendense");
            let digest = sha256_hex(body.as_bytes());
            Ok(Record {
                number,
                checksum_ok: body == expected && digest.get(..16) == Some(sum),
            })
        })
        .collect()
}

/// Hex SHA-256, as the guest's `sha256sum` prints it.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `ACK N` numbers of a serial log's text before its `nth` (1-based) line `FREEZE` (the
/// guest's fsfreeze hook prints it before qemu-ga freezes); `None` when there are fewer.
pub fn acks_before_freeze(serial: &str, nth: usize) -> Option<Vec<u64>> {
    let mut acks = Vec::new();
    let mut seen = 0;
    for l in serial.lines().map(str::trim) {
        if l == "FREEZE" {
            seen += 1;
            if seen == nth {
                return Some(acks);
            }
        } else if let Some(n) = l.strip_prefix("ACK ").and_then(|n| n.parse().ok()) {
            acks.push(n);
        }
    }
    None
}
