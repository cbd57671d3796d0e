//! One long-lived `guestfish` child per browsing session, driven over its stdin.
//!
//! Why not `guestfish --listen` + `--remote`: `--listen` forks the server away from its
//! parent, so the hub could neither reap it nor tie it to its own life, and every `--remote`
//! call would be one more process. Here the child is ours: it runs under
//! `setpriv --pdeathsig KILL` (a killed hub takes guestfish with it, and libguestfs's own
//! recovery process then kills the appliance), leads its own process group (the appliance's
//! QEMU is in it, so a stop reaches both) and is reaped by [`Supervised`].
//!
//! Framing: each command goes as `-CMD ARGS` (the `-` keeps guestfish going after an error)
//! followed by `echo MARK`, where MARK is a random per-session token and a sequence number.
//! stdout and stderr are one pipe (`2>&1` in a `sh -c 'exec "$@" 2>&1'` wrapper, no string
//! interpolation), so an error line (`*stdin*:N: libguestfs: error: ...`) arrives before the
//! mark of its command; guestfish flushes after every command (measured: a listing answers in
//! 1-7 ms once the appliance runs).

use sendense_shared::child::{ExitReport, Supervised};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};

/// Why a guestfish command failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestfishError {
    #[error("cannot start guestfish")]
    Spawn(#[source] sendense_shared::child::ChildError),
    /// libguestfs said no: the message is its own ("lstatns: /x: No such file or directory").
    #[error("{0}")]
    Command(String),
    #[error("guestfish ended: {0}")]
    Died(String),
    #[error("guestfish did not answer `{command}` within {limit:?}")]
    Timeout { command: String, limit: Duration },
    #[error("talking to guestfish failed")]
    Io(#[source] std::io::Error),
}

/// A running guestfish with the point's image added read-only.
pub struct Guestfish {
    pub child: Supervised,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    token: String,
    seq: u64,
}

impl Guestfish {
    /// Starts `program --ro --format=qcow2 -a IMAGE` (the backing chain is opened read-only by
    /// the appliance's QEMU; libguestfs puts its writable overlay into `tmp`, not the
    /// repository). Does not launch the appliance: [`Guestfish::launch`].
    pub fn spawn(
        program: &str,
        image: &Path,
        tmp: &Path,
        cache: &Path,
    ) -> Result<Guestfish, GuestfishError> {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--pdeathsig",
            "KILL",
            "--",
            "sh",
            "-c",
            "exec \"$@\" 2>&1",
            "sh",
        ])
        .arg(program)
        .args(["--ro", "--no-progress-bars", "--format=qcow2", "-a"])
        .arg(image)
        .env("TMPDIR", tmp)
        .env("LIBGUESTFS_TMPDIR", tmp)
        .env("LIBGUESTFS_CACHEDIR", cache);
        if std::env::var_os("LIBGUESTFS_BACKEND").is_none() {
            cmd.env("LIBGUESTFS_BACKEND", "direct");
        }
        let (child, stdin, stdout) = Supervised::spawn_piped(cmd).map_err(GuestfishError::Spawn)?;
        Ok(Guestfish {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            token: uuid::Uuid::new_v4().simple().to_string(),
            seq: 0,
        })
    }

    /// `run`: boots the appliance (about 14-30 s under TCG).
    pub async fn launch(&mut self, limit: Duration) -> Result<(), GuestfishError> {
        self.run("run", limit).await.map(|_| ())
    }

    /// Sends `line` (already quoted) and answers everything it printed before its mark; a
    /// libguestfs error line makes it [`GuestfishError::Command`].
    pub async fn run(&mut self, line: &str, limit: Duration) -> Result<Vec<u8>, GuestfishError> {
        let mark = self.send(line).await?;
        match tokio::time::timeout(limit, self.read_until_mark(&mark)).await {
            Ok(r) => r,
            Err(_) => {
                // The framing is lost (the answer may still come): the session must end.
                self.child.kill_now();
                Err(GuestfishError::Timeout {
                    command: line.chars().take(80).collect(),
                    limit,
                })
            }
        }
    }

    /// Sends `line` and its mark without waiting; [`Guestfish::finish`] reads up to the mark.
    pub async fn send(&mut self, line: &str) -> Result<String, GuestfishError> {
        self.seq += 1;
        let mark = format!("sendense-{}-{}", self.token, self.seq);
        let text = format!("-{line}\necho {mark}\n");
        if let Err(e) = self.stdin.write_all(text.as_bytes()).await {
            return Err(self.died_or(e).await);
        }
        if let Err(e) = self.stdin.flush().await {
            return Err(self.died_or(e).await);
        }
        Ok(mark)
    }

    /// Reads the answer of a command sent with [`Guestfish::send`].
    pub async fn finish(&mut self, mark: &str) -> Result<Vec<u8>, GuestfishError> {
        self.read_until_mark(mark).await
    }

    async fn read_until_mark(&mut self, mark: &str) -> Result<Vec<u8>, GuestfishError> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_until(b'\n', &mut line)
                .await
                .map_err(GuestfishError::Io)?;
            if n == 0 {
                let report = self.exit_report().await;
                return Err(GuestfishError::Died(format!(
                    "{report}; it said: {}",
                    String::from_utf8_lossy(&out).trim()
                )));
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if body == mark.as_bytes() {
                break;
            }
            if let Some(msg) = error_of(body) {
                errors.push(msg);
                continue;
            }
            out.extend_from_slice(&line);
        }
        if !errors.is_empty() {
            return Err(GuestfishError::Command(errors.join("; ")));
        }
        Ok(out)
    }

    async fn exit_report(&self) -> ExitReport {
        match tokio::time::timeout(Duration::from_secs(5), self.child.exited()).await {
            Ok(Some(r)) => r,
            _ => ExitReport {
                status: "stdout closed".into(),
                code: None,
                signal: None,
                stderr_tail: String::new(),
                requested: false,
            },
        }
    }

    async fn died_or(&self, e: std::io::Error) -> GuestfishError {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return GuestfishError::Died(self.exit_report().await.to_string());
        }
        GuestfishError::Io(e)
    }

    /// Ends it: `quit` would do, but the appliance may be busy; SIGTERM to the group, bounded
    /// wait, SIGKILL, reap.
    pub async fn stop(&self) -> ExitReport {
        self.child.stop(Duration::from_secs(5)).await
    }
}

/// `*stdin*:12: libguestfs: error: lstatns: /x: No such file or directory` → the part after
/// `error: `; guestfish's own complaints (`guestfish: ...`) too.
fn error_of(line: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(line);
    let rest = s.strip_prefix("*stdin*:").map(|r| match r.find(": ") {
        Some(i) => &r[i + 2..],
        None => r,
    });
    let rest = rest.unwrap_or(&s);
    if let Some(m) = rest.strip_prefix("libguestfs: error: ") {
        return Some(m.to_string());
    }
    if rest.starts_with("guestfish: ") && s.starts_with("*stdin*:") {
        return Some(rest.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::error_of;

    #[test]
    fn error_lines_are_recognized() {
        assert_eq!(
            error_of(b"*stdin*:8: libguestfs: error: lstatns: /x: No such file or directory")
                .as_deref(),
            Some("lstatns: /x: No such file or directory")
        );
        assert_eq!(error_of(b"st_mode: 33188"), None);
        assert_eq!(
            error_of(b"libguestfs: error: could not create appliance").as_deref(),
            Some("could not create appliance")
        );
    }
}
