//! A QEMU guest agent (`qemu-ga`) client on the unix socket of the VM's
//! `org.qemu.guest_agent.0` virtio port: JSON lines, one command at a time.
//!
//! The channel has no session: whatever an earlier client left unread (an answer that came
//! after its timeout, say) is still in it, and the agent may not be running at all (then
//! nothing answers; QEMU still accepts the connection). So every session starts with
//! `guest-sync-delimited` and a random id: the agent answers with a `0xFF` byte and then the
//! id, and everything before the `0xFF` is stale and dropped. Every command has a timeout.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// An answer longer than this is a protocol error (fsfreeze answers are a few bytes).
const MAX_LINE: u64 = 1024 * 1024;

/// Why talking to the guest agent failed.
#[derive(Debug, Error)]
pub enum QgaError {
    #[error("connecting to the guest agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent did not answer {command} within {} s", timeout.as_secs_f64())]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("guest agent {command}: {source}")]
    Io {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent closed the channel during {command}")]
    Closed { command: &'static str },
    #[error("guest agent {command}: not an answer: {detail}")]
    Protocol {
        command: &'static str,
        detail: String,
    },
    /// The agent answered with an error (e.g. freeze refused).
    #[error("guest agent refused {command}: {class}: {desc}")]
    Refused {
        command: &'static str,
        class: String,
        desc: String,
    },
}

impl QgaError {
    /// The agent did not answer in time (not running, hung, or the guest is stuck).
    pub fn is_timeout(&self) -> bool {
        matches!(self, QgaError::Timeout { .. })
    }
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// A synchronized session with the guest agent.
pub struct QgaClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl QgaClient {
    /// Connects and synchronizes (`guest-sync-delimited`), each step within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QgaClient, QgaError> {
        let connect = UnixStream::connect(path);
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| QgaError::Timeout {
                command: "connect",
                timeout,
            })?
            .map_err(|source| QgaError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut c = QgaClient {
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        c.sync().await?;
        Ok(c)
    }

    async fn sync(&mut self) -> Result<(), QgaError> {
        const CMD: &str = "guest-sync-delimited";
        let id: u32 = rand::random::<u32>() & 0x7fff_ffff;
        let msg = json!({"execute": CMD, "arguments": {"id": id}});
        // The leading 0xFF resets the agent's parser (a half line left by an earlier client).
        let mut bytes = vec![0xFF];
        bytes.extend_from_slice(format!("{msg}\n").as_bytes());
        let timeout = self.timeout;
        let r = tokio::time::timeout(timeout, async {
            self.writer
                .write_all(&bytes)
                .await
                .map_err(|source| QgaError::Io {
                    command: CMD,
                    source,
                })?;
            loop {
                // Drop everything up to the agent's 0xFF, then read its answer.
                self.skip_to_delimiter().await?;
                let v = self.read_value(CMD).await?;
                if v.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                    return Ok(());
                }
                // An answer to an older sync of someone else: keep looking.
            }
        })
        .await;
        r.map_err(|_| QgaError::Timeout {
            command: CMD,
            timeout,
        })?
    }

    async fn skip_to_delimiter(&mut self) -> Result<(), QgaError> {
        const CMD: &str = "guest-sync-delimited";
        let mut skipped = 0u64;
        loop {
            let mut b = [0u8; 1];
            let n = self
                .reader
                .read(&mut b)
                .await
                .map_err(|source| QgaError::Io {
                    command: CMD,
                    source,
                })?;
            if n == 0 {
                return Err(QgaError::Closed { command: CMD });
            }
            if b[0] == 0xFF {
                return Ok(());
            }
            skipped += 1;
            if skipped > MAX_LINE {
                return Err(QgaError::Protocol {
                    command: CMD,
                    detail: "no delimiter in 1 MiB of stale output".to_string(),
                });
            }
        }
    }

    async fn read_value(&mut self, command: &'static str) -> Result<Value, QgaError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|source| QgaError::Io { command, source })?;
        if n == 0 {
            return Err(QgaError::Closed { command });
        }
        serde_json::from_str(line.trim()).map_err(|e| QgaError::Protocol {
            command,
            detail: format!("{e}: {}", line.trim()),
        })
    }

    /// Runs `command`; answers its `return` value or the agent's refusal.
    pub async fn execute(&mut self, command: &'static str) -> Result<Value, QgaError> {
        let timeout = self.timeout;
        let msg = json!({ "execute": command });
        let r = tokio::time::timeout(timeout, async {
            self.writer
                .write_all(format!("{msg}\n").as_bytes())
                .await
                .map_err(|source| QgaError::Io { command, source })?;
            let v = self.read_value(command).await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            match v.get("error") {
                Some(e) => Err(QgaError::Refused {
                    command,
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or_default().to_string(),
                }),
                None => Err(QgaError::Protocol {
                    command,
                    detail: v.to_string(),
                }),
            }
        })
        .await;
        r.map_err(|_| QgaError::Timeout { command, timeout })?
    }

    /// `guest-fsfreeze-freeze`: how many file systems the agent froze.
    pub async fn freeze(&mut self) -> Result<u64, QgaError> {
        const CMD: &str = "guest-fsfreeze-freeze";
        let v = self.execute(CMD).await?;
        v.as_u64().ok_or_else(|| QgaError::Protocol {
            command: CMD,
            detail: v.to_string(),
        })
    }

    /// `guest-fsfreeze-thaw`: how many file systems the agent thawed.
    pub async fn thaw(&mut self) -> Result<u64, QgaError> {
        const CMD: &str = "guest-fsfreeze-thaw";
        let v = self.execute(CMD).await?;
        v.as_u64().ok_or_else(|| QgaError::Protocol {
            command: CMD,
            detail: v.to_string(),
        })
    }

    /// `guest-fsfreeze-status`.
    pub async fn status(&mut self) -> Result<FreezeStatus, QgaError> {
        const CMD: &str = "guest-fsfreeze-status";
        match self.execute(CMD).await? {
            Value::String(s) if s == "thawed" => Ok(FreezeStatus::Thawed),
            Value::String(s) if s == "frozen" => Ok(FreezeStatus::Frozen),
            v => Err(QgaError::Protocol {
                command: CMD,
                detail: v.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted agent: stale output first, then answers sync with 0xFF + the id, and the
    /// fsfreeze commands as a real agent does.
    async fn fake_agent(path: PathBuf, answer_sync: bool) {
        let l = UnixListener::bind(&path).unwrap();
        let (s, _) = l.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"return\": {\"pid\": 7}}\n").await.unwrap();
        let mut frozen = false;
        loop {
            let mut buf = Vec::new();
            if r.read_until(b'\n', &mut buf).await.unwrap() == 0 {
                return;
            }
            let text = String::from_utf8_lossy(&buf)
                .trim_start_matches('\u{FFFD}')
                .to_string();
            let v: Value = serde_json::from_str(text.trim()).unwrap();
            let out = match v["execute"].as_str().unwrap() {
                "guest-sync-delimited" if !answer_sync => continue,
                "guest-sync-delimited" => {
                    w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"stray\"}}\n")
                        .await
                        .unwrap();
                    format!("\u{0}{{\"return\": {}}}", v["arguments"]["id"])
                }
                "guest-fsfreeze-freeze" if frozen => {
                    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state\"}}".to_string()
                }
                "guest-fsfreeze-freeze" => {
                    frozen = true;
                    "{\"return\": 2}".to_string()
                }
                "guest-fsfreeze-thaw" => {
                    frozen = false;
                    "{\"return\": 2}".to_string()
                }
                "guest-fsfreeze-status" => {
                    format!("{{\"return\": \"{}\"}}", if frozen { "frozen" } else { "thawed" })
                }
                other => panic!("unexpected {other}"),
            };
            let mut bytes = out.into_bytes();
            if bytes.first() == Some(&0) {
                bytes[0] = 0xFF;
            }
            bytes.push(b'\n');
            w.write_all(&bytes).await.unwrap();
        }
    }

    #[tokio::test]
    async fn sync_drops_stale_output_then_freeze_status_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        tokio::spawn(fake_agent(path.clone(), true));
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut c = QgaClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(c.status().await.unwrap(), FreezeStatus::Thawed);
        assert_eq!(c.freeze().await.unwrap(), 2);
        assert_eq!(c.status().await.unwrap(), FreezeStatus::Frozen);
        let e = c.freeze().await.unwrap_err();
        assert!(
            matches!(&e, QgaError::Refused { desc, .. } if desc.contains("frozen state")),
            "{e}"
        );
        assert_eq!(c.thaw().await.unwrap(), 2);
        assert_eq!(c.status().await.unwrap(), FreezeStatus::Thawed);
    }

    #[tokio::test]
    async fn a_silent_agent_is_a_timeout_naming_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        tokio::spawn(fake_agent(path.clone(), false));
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let e = QgaClient::connect(&path, Duration::from_millis(300))
            .await
            .err()
            .expect("no answer");
        assert!(e.is_timeout(), "{e}");
        assert_eq!(
            e.to_string(),
            "guest agent did not answer guest-sync-delimited within 0.3 s"
        );
    }
}
