//! Boot checks: a point's disks started as a throwaway QEMU VM on the hub, to prove the point
//! boots, not only that its bytes are the ones backed up.
//!
//! Invariants:
//! - Nothing is written to the point: each disk is a fresh qcow2 overlay whose backing file is
//!   the disk's chain image (QEMU opens backing files read-only), in a private (0700) work
//!   directory under the hub's data dir, never under `/tmp`.
//! - The VM has no network (`-nodefaults`), runs under TCG, and QEMU runs under
//!   `setpriv --pdeathsig KILL`: a hub that dies takes it along. Its PID and work directory are
//!   recorded on the point's `boot_checks` row before the wait starts, so that the start-up
//!   recovery of a hub that was SIGKILLed stops it (after checking `/proc/PID/cmdline` names
//!   the work directory) and removes the overlays ([`recover`]).
//! - The guest is up when its agent answers `guest-ping` on the virtio-serial port
//!   `org.qemu.guest_agent.0`, or when a serial-console line contains the ready line. QEMU
//!   exiting first (`-no-reboot`: a guest that panics or reboots ends it) or the time limit
//!   passing is a failure; either way the last console lines are kept (bounded).
//! - On every way out (success, failure, cancel, time limit) QEMU is stopped and the work
//!   directory removed before the outcome is returned.

use sendense_shared::api::{BootCheckSpec, BootStatus, VmHardware};
use sendense_shared::child::Supervised;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Console lines kept of a check.
pub const TAIL_LINES: usize = 40;
/// Characters kept of one console line.
pub const LINE_CHARS: usize = 200;
/// Default kernel command line of a direct kernel boot.
pub const DEFAULT_APPEND: &str = "console=ttyS0 root=/dev/vda rw panic=-1";
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// How often the console and the guest agent are looked at.
const POLL: Duration = Duration::from_millis(250);
/// Bound of one `guest-ping` round trip.
const PING_BOUND: Duration = Duration::from_millis(1500);
/// SIGTERM to SIGKILL when QEMU is stopped.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A boot check as it will run: the request's fields with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Each disk's chain image (the point's own), in unit order: `vda`, `vdb`, ...
    pub images: Vec<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub ready_line: Option<String>,
    pub timeout: Duration,
}

/// Why a boot request was refused (the field named).
#[derive(Debug, thiserror::Error)]
#[error("boot.{field}: {why}")]
pub struct SpecError {
    pub field: &'static str,
    pub why: String,
}

/// Checks the request's fields (without the images, which come from the point).
pub fn validate(spec: &BootCheckSpec) -> Result<(), SpecError> {
    let bad = |field, why: String| Err(SpecError { field, why });
    if let Some(m) = spec.memory_mib
        && !(64..=16384).contains(&m)
    {
        return bad("memory_mib", format!("{m} is outside 64..=16384"));
    }
    if let Some(c) = spec.cpus
        && !(1..=8).contains(&c)
    {
        return bad("cpus", format!("{c} is outside 1..=8"));
    }
    if let Some(t) = spec.timeout_secs
        && !(5..=1800).contains(&t)
    {
        return bad("timeout_secs", format!("{t} is outside 5..=1800"));
    }
    for (field, v) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(p) = v {
            let path = Path::new(p);
            if !path.is_absolute() {
                return bad(field, format!("{p:?} is not an absolute path"));
            }
            if !path.is_file() {
                return bad(field, format!("{p:?} is not a file on the hub"));
            }
        }
    }
    if spec.initrd.is_some() && spec.kernel.is_none() {
        return bad("initrd", "needs boot.kernel".into());
    }
    if spec.append.is_some() && spec.kernel.is_none() {
        return bad("append", "needs boot.kernel".into());
    }
    for (field, v) in [("append", &spec.append), ("ready_line", &spec.ready_line)] {
        if let Some(s) = v
            && (s.len() > 1024 || s.chars().any(char::is_control))
        {
            return bad(
                field,
                "at most 1024 characters, no control characters".into(),
            );
        }
    }
    if spec.ready_line.as_deref() == Some("") {
        return bad("ready_line", "empty".into());
    }
    Ok(())
}

impl Plan {
    /// The request's fields over the point's recorded hardware (memory, vCPUs, and its direct
    /// kernel boot when those files exist on the hub too), over the defaults.
    pub fn new(images: Vec<PathBuf>, spec: &BootCheckSpec, hw: Option<&VmHardware>) -> Plan {
        let hw_file = |p: &Option<String>| {
            p.as_ref()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.is_file())
        };
        // The recorded kernel only when the request names none and the hub has that file.
        let (kernel, initrd, hw_append) = match (&spec.kernel, hw) {
            (Some(k), _) => (
                Some(PathBuf::from(k)),
                spec.initrd.as_ref().map(PathBuf::from),
                hw.and_then(|h| h.append.clone()),
            ),
            (None, Some(h)) => match hw_file(&h.kernel) {
                Some(k) => (Some(k), hw_file(&h.initrd), h.append.clone()),
                None => (None, None, None),
            },
            (None, None) => (None, None, None),
        };
        Plan {
            images,
            memory_mib: spec.memory_mib.unwrap_or_else(|| {
                hw.map(|h| h.memory_mib.clamp(64, 16384) as u32)
                    .unwrap_or(DEFAULT_MEMORY_MIB)
            }),
            cpus: spec
                .cpus
                .unwrap_or_else(|| hw.map(|h| h.cpus.clamp(1, 8)).unwrap_or(1)),
            kernel,
            initrd,
            append: spec
                .append
                .clone()
                .or(hw_append)
                .unwrap_or_else(|| DEFAULT_APPEND.to_string()),
            ready_line: spec.ready_line.clone(),
            timeout: Duration::from_secs(spec.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS)),
        }
    }
}

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: BootStatus,
    pub detail: String,
    pub console_tail: Vec<String>,
    pub boot_ms: Option<u64>,
}

/// The parent of every work directory: `<data dir>/boot-checks`, 0700.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("boot-checks")
}

/// Creates `dir` (and the root above it) private to the hub's user.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Runs one check in `work` (created here, removed before returning); `started` is told
/// QEMU's PID as soon as it runs.
pub async fn run<F, Fut>(
    work: &Path,
    plan: &Plan,
    cancel: &CancellationToken,
    started: F,
) -> Outcome
where
    F: FnOnce(u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut qemu = None;
    let out = run_in(work, plan, cancel, started, &mut qemu).await;
    if let Some(q) = qemu {
        q.stop(STOP_GRACE).await;
    }
    if let Err(e) = tokio::fs::remove_dir_all(work).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::error!(dir = %work.display(), error = %e, "cannot remove a boot check's overlays");
    }
    out
}

fn failed(detail: String, tail: &Tail) -> Outcome {
    Outcome {
        status: BootStatus::BootFailed,
        detail,
        console_tail: tail.lines(),
        boot_ms: None,
    }
}

async fn run_in<F, Fut>(
    work: &Path,
    plan: &Plan,
    cancel: &CancellationToken,
    started: F,
    qemu: &mut Option<Supervised>,
) -> Outcome
where
    F: FnOnce(u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tail = Tail::default();
    let qga = work.join("qga.sock");
    if qga.as_os_str().len() >= 108 {
        return failed(
            format!(
                "the guest agent's socket {} would be longer than a unix socket path may be \
                 (107 bytes): give the hub a shorter data dir",
                qga.display()
            ),
            &tail,
        );
    }
    if let Err(e) = make_private_dir(work) {
        return failed(format!("cannot create {}: {e}", work.display()), &tail);
    }
    let mut overlays = Vec::new();
    for (i, image) in plan.images.iter().enumerate() {
        let overlay = work.join(format!("disk{i}.qcow2"));
        if let Err(why) = create_overlay(image, &overlay).await {
            return failed(why, &tail);
        }
        overlays.push(overlay);
    }
    let serial = work.join("serial.log");
    let cmd = command(plan, &overlays, &serial, &qga, work);
    let child = match Supervised::spawn(cmd) {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start QEMU: {e}"), &tail),
    };
    tracing::info!(pid = child.pid(), command = %child.command_line_string(), "boot check: QEMU started");
    let pid = child.pid();
    *qemu = Some(child.clone());
    started(pid).await;
    let t = Instant::now();
    let mut reader = SerialReader::default();
    let mut next_ping = Instant::now();
    loop {
        reader.read(&serial, &mut tail).await;
        if let Some(line) = &plan.ready_line
            && tail.seen(line)
        {
            return Outcome {
                status: BootStatus::BootOk,
                detail: format!(
                    "the console printed the ready line {line:?} after {:.1} s",
                    t.elapsed().as_secs_f64()
                ),
                console_tail: tail.lines(),
                boot_ms: Some(t.elapsed().as_millis() as u64),
            };
        }
        if let Some(exit) = child.exit_report() {
            reader.read(&serial, &mut tail).await;
            let stderr = exit.last_stderr_line().unwrap_or_default().to_string();
            return failed(
                format!(
                    "QEMU exited ({}) after {:.1} s before the guest was up (the guest halted, \
                     panicked or rebooted){}",
                    exit.status,
                    t.elapsed().as_secs_f64(),
                    if stderr.is_empty() {
                        String::new()
                    } else {
                        format!("; QEMU said: {stderr}")
                    }
                ),
                &tail,
            );
        }
        if t.elapsed() >= plan.timeout {
            return failed(
                format!(
                    "the guest was not up within {} s (no guest agent answer{})",
                    plan.timeout.as_secs(),
                    match &plan.ready_line {
                        Some(l) => format!(", no console line {l:?}"),
                        None => String::new(),
                    }
                ),
                &tail,
            );
        }
        if Instant::now() >= next_ping && qga.exists() {
            next_ping = Instant::now() + Duration::from_secs(2);
            if ping(&qga, cancel).await {
                reader.read(&serial, &mut tail).await;
                return Outcome {
                    status: BootStatus::BootOk,
                    detail: format!(
                        "the guest agent answered guest-ping after {:.1} s",
                        t.elapsed().as_secs_f64()
                    ),
                    console_tail: tail.lines(),
                    boot_ms: Some(t.elapsed().as_millis() as u64),
                };
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                reader.read(&serial, &mut tail).await;
                return Outcome {
                    status: BootStatus::Interrupted,
                    detail: "the verify job was cancelled during the boot check".into(),
                    console_tail: tail.lines(),
                    boot_ms: None,
                };
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn create_overlay(image: &Path, overlay: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let image = std::path::absolute(image).unwrap_or_else(|_| image.to_path_buf());
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image)
        .arg(overlay)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create of an overlay over {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::set_permissions(overlay, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", overlay.display()))
}

/// QEMU's command line (under `setpriv --pdeathsig KILL`, which execs it: the PID is QEMU's).
fn command(
    plan: &Plan,
    overlays: &[PathBuf],
    serial: &Path,
    qga: &Path,
    work: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
    cmd.args(["-machine", "q35,accel=tcg", "-nodefaults", "-no-reboot"]);
    cmd.args(["-display", "none", "-monitor", "none"]);
    // The work directory is in the serial and disk paths: what recovery checks in /proc.
    let _ = work;
    cmd.args(["-name", "sendense-boot-check"]);
    cmd.arg("-m").arg(plan.memory_mib.to_string());
    cmd.arg("-smp").arg(plan.cpus.to_string());
    if let Some(k) = &plan.kernel {
        cmd.arg("-kernel").arg(k);
        if let Some(i) = &plan.initrd {
            cmd.arg("-initrd").arg(i);
        }
        cmd.arg("-append").arg(&plan.append);
    }
    cmd.arg("-serial").arg(format!("file:{}", serial.display()));
    cmd.args(["-device", "virtio-serial"]);
    cmd.arg("-chardev").arg(format!(
        "socket,path={},server=on,wait=off,id=qga0",
        qga.display()
    ));
    cmd.args([
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);
    for (i, o) in overlays.iter().enumerate() {
        cmd.arg("-blockdev").arg(format!(
            "driver=file,filename={},node-name=file{i}",
            o.display()
        ));
        cmd.arg("-blockdev")
            .arg(format!("driver=qcow2,file=file{i},node-name=disk{i}"));
        let boot = if i == 0 && plan.kernel.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i}{boot}"));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    cmd
}

/// One `guest-ping`: true when the agent answered with a `return`.
async fn ping(socket: &Path, cancel: &CancellationToken) -> bool {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
        s.write_all(b"{\"execute\":\"guest-ping\"}\n").await.ok()?;
        let mut lines = BufReader::new(s).lines();
        while let Some(line) = lines.next_line().await.ok()? {
            if line.contains("\"return\"") {
                return Some(());
            }
        }
        None
    };
    tokio::select! {
        _ = cancel.cancelled() => false,
        r = tokio::time::timeout(PING_BOUND, attempt) => matches!(r, Ok(Some(()))),
    }
}

/// The console's last lines, bounded in count and length, control characters dropped.
#[derive(Debug, Default)]
pub struct Tail {
    lines: VecDeque<String>,
    partial: String,
    /// Whether any complete line so far contained the needle asked for last.
    found: Vec<String>,
}

impl Tail {
    /// Feeds console bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        for ch in String::from_utf8_lossy(bytes).chars() {
            match ch {
                '\n' => {
                    let line = std::mem::take(&mut self.partial);
                    self.push_line(line);
                }
                c if c.is_control() => {}
                c => {
                    if self.partial.chars().count() < LINE_CHARS {
                        self.partial.push(c);
                    }
                }
            }
        }
    }

    fn push_line(&mut self, line: String) {
        if line.trim().is_empty() {
            return;
        }
        self.found.push(line.clone());
        if self.found.len() > 4 * TAIL_LINES {
            self.found.drain(..TAIL_LINES);
        }
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    /// Whether a line seen since the last call contained `needle` (lines are looked at once).
    pub fn seen(&mut self, needle: &str) -> bool {
        let hit = self.found.iter().any(|l| l.contains(needle)) || self.partial.contains(needle);
        self.found.clear();
        hit
    }

    /// The kept lines, oldest first, with an unfinished last line.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.trim().is_empty() {
            v.push(self.partial.clone());
            if v.len() > TAIL_LINES {
                v.remove(0);
            }
        }
        v
    }
}

/// Reads what QEMU appended to the serial file since the last call.
#[derive(Debug, Default)]
struct SerialReader {
    offset: u64,
}

impl SerialReader {
    async fn read(&mut self, path: &Path, tail: &mut Tail) {
        let Ok(mut f) = tokio::fs::File::open(path).await else {
            return;
        };
        if f.seek(std::io::SeekFrom::Start(self.offset)).await.is_err() {
            return;
        }
        let mut buf = Vec::new();
        // Bounded per poll: a guest flooding its console cannot make the hub read without end.
        let mut limited = (&mut f).take(4 << 20);
        if let Ok(n) = limited.read_to_end(&mut buf).await {
            self.offset += n as u64;
            tail.push(&buf);
        }
    }
}

/// What start-up recovery did to one check a previous hub process left running.
pub async fn recover_one(pid: Option<u32>, work_dir: Option<&str>, root: &Path) -> String {
    let mut said = Vec::new();
    if let Some(pid) = pid {
        let ours = sendense_shared::child::read_cmdline(pid).is_some_and(|args| {
            work_dir.is_some_and(|w| args.iter().any(|a| a.contains(w)))
                && args.iter().any(|a| a.contains("qemu-system"))
        });
        if ours {
            match sendense_shared::child::stop_group(pid, STOP_GRACE).await {
                Ok(_) => said.push(format!(
                    "its QEMU pid {pid} was verified in /proc and stopped"
                )),
                Err(e) => said.push(format!("stopping its QEMU pid {pid} failed: {e}")),
            }
        } else {
            said.push(format!(
                "its QEMU pid {pid} was already gone (or is not ours now)"
            ));
        }
    }
    if let Some(w) = work_dir {
        let w = Path::new(w);
        if w.starts_with(root) {
            match std::fs::remove_dir_all(w) {
                Ok(()) => said.push(format!("its overlays {} were removed", w.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => said.push(format!("removing {} failed: {e}", w.display())),
            }
        }
    }
    said.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_bounded_and_clean() {
        let mut t = Tail::default();
        for i in 0..100 {
            t.push(format!("line {i}\r\n").as_bytes());
        }
        t.push(&[b'x'; 1000]);
        let l = t.lines();
        assert_eq!(l.len(), TAIL_LINES);
        assert_eq!(l[0], "line 61");
        assert_eq!(l.last().unwrap().len(), LINE_CHARS);
        assert!(t.seen("line 99"));
        assert!(!t.seen("line 99"), "a line is looked at once");
    }

    /// Memory, vCPUs and a direct kernel boot come from the recorded hardware unless the
    /// request says otherwise; a kernel the hub does not have is not used.
    #[test]
    fn defaults_come_from_the_recorded_hardware() {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let hw = VmHardware {
            memory_mib: 1024,
            cpus: 2,
            kernel: Some(kernel.path().display().to_string()),
            append: Some("console=ttyS0 root=/dev/vda".into()),
            ..Default::default()
        };
        let p = Plan::new(vec![], &BootCheckSpec::default(), Some(&hw));
        assert_eq!((p.memory_mib, p.cpus), (1024, 2));
        assert_eq!(p.kernel.as_deref(), Some(kernel.path()));
        assert_eq!(p.append, "console=ttyS0 root=/dev/vda");
        let spec = BootCheckSpec {
            memory_mib: Some(256),
            ..Default::default()
        };
        let missing = VmHardware {
            kernel: Some("/nonexistent/vmlinuz".into()),
            ..hw.clone()
        };
        let p = Plan::new(vec![], &spec, Some(&missing));
        assert_eq!((p.memory_mib, p.kernel), (256, None));
        let p = Plan::new(vec![], &BootCheckSpec::default(), None);
        assert_eq!(
            (p.memory_mib, p.cpus, p.append.as_str()),
            (512, 1, DEFAULT_APPEND)
        );
    }

    #[test]
    fn spec_fields_are_named() {
        let e = validate(&BootCheckSpec {
            memory_mib: Some(1),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "memory_mib");
        let e = validate(&BootCheckSpec {
            kernel: Some("vmlinuz".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "kernel");
        let e = validate(&BootCheckSpec {
            append: Some("x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "append");
    }
}
