//! A QMP (QEMU Machine Protocol) client on a unix socket.
//!
//! One connection per VM carries every command of the node: commands get a numeric `id`, so
//! several tasks can share the connection and each gets its own answer even when events are
//! interleaved between answers. Events go into a bounded in-memory log and a broadcast channel
//! (for waiters such as "export deleted"). Every command sent is also appended to a [`QmpLog`],
//! which is how tests prove that one `transaction` covered every disk.
//!
//! Parts: `error` ([`QmpError`], and [`Refusal`], what QEMU's refusals mean), `log` ([`QmpLog`]),
//! `tests` (the client against a scripted peer).

use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};

mod error;
mod log;
#[cfg(test)]
mod tests;

pub use error::{QmpError, Refusal};
pub use log::QmpLog;

/// How many events the in-memory event log keeps (older ones are dropped).
const EVENT_LOG_CAPACITY: usize = 512;
/// A QMP line longer than this is treated as a protocol error (QEMU's answers to
/// `query-named-block-nodes` on a big VM are a few hundred KiB).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// One event QEMU sent.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    pub received_at: chrono::DateTime<chrono::Utc>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    vm: String,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    pending: Pending,
    closed: Arc<AtomicBool>,
    events: Arc<Mutex<VecDeque<QmpEvent>>>,
    event_tx: broadcast::Sender<QmpEvent>,
    log: Arc<QmpLog>,
    reader: tokio::task::JoinHandle<()>,
    /// The process at the other end of the socket (`SO_PEERCRED`): the QEMU process.
    peer_pid: Option<u32>,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Default time a command may take before the node gives up on it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

impl QmpClient {
    /// Connects, reads the greeting and enters command mode. `vm` names the VM in the log.
    pub async fn connect(path: &Path, vm: &str, log: Arc<QmpLog>) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0);
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        // QEMU accepts one client per QMP socket; a second client connects but gets no
        // greeting until the first leaves, hence the timeout.
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, read_line(&mut reader, path))
            .await
            .map_err(|_| QmpError::GreetingTimeout {
                path: path.to_path_buf(),
                timeout: GREETING_TIMEOUT,
            })??;
        let greeting = greeting.ok_or_else(|| QmpError::Closed {
            path: path.to_path_buf(),
        })?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: path.to_path_buf(),
                detail: format!(
                    "expected a greeting, got {}",
                    truncate(&greeting.to_string())
                ),
            });
        }
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let events: Arc<Mutex<VecDeque<QmpEvent>>> = Arc::default();
        let (event_tx, _) = broadcast::channel(256);
        let reader_task = tokio::spawn(read_loop(
            reader,
            path.to_path_buf(),
            pending.clone(),
            closed.clone(),
            events.clone(),
            event_tx.clone(),
        ));
        let client = QmpClient {
            path: path.to_path_buf(),
            vm: vm.to_string(),
            writer: tokio::sync::Mutex::new(write),
            next_id: AtomicU64::new(1),
            pending,
            closed,
            events,
            event_tx,
            log,
            reader: reader_task,
            peer_pid,
        };
        client.execute("qmp_capabilities", json!({})).await?;
        Ok(client)
    }

    /// The PID of the process serving the QMP socket (its peer credentials), when the kernel
    /// said.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the socket closed or a protocol error ended the session.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs `command` with `arguments` (an object, or `{}`), waiting up to [`COMMAND_TIMEOUT`].
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, COMMAND_TIMEOUT)
            .await
    }

    /// Runs `command`, waiting up to `timeout` for its answer.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        self.log.record(&self.vm, command, &arguments);
        tracing::debug!(vm = %self.vm, command, %arguments, "QMP command");
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(source) = w.write_all(line.as_bytes()).await {
                self.forget(id);
                return Err(QmpError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    timeout,
                })
            }
            Ok(Err(_)) => Err(QmpError::Closed {
                path: self.path.clone(),
            }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Events received so far (bounded, oldest first).
    pub fn events(&self) -> Vec<QmpEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A receiver of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.event_tx.subscribe()
    }
}

async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    path: &Path,
) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        let chunk = reader.fill_buf().await.map_err(|source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if chunk.is_empty() {
            return Ok(None);
        }
        if let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..nl]);
            reader.consume(nl + 1);
            break;
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        reader.consume(n);
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol {
                path: path.to_path_buf(),
                detail: format!("line longer than {MAX_LINE} bytes"),
            });
        }
    }
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| QmpError::Protocol {
            path: path.to_path_buf(),
            detail: format!(
                "invalid JSON ({e}): {}",
                truncate(&String::from_utf8_lossy(&buf))
            ),
        })
}

async fn read_loop(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    path: PathBuf,
    pending: Pending,
    closed: Arc<AtomicBool>,
    events: Arc<Mutex<VecDeque<QmpEvent>>>,
    event_tx: broadcast::Sender<QmpEvent>,
) {
    loop {
        let msg = match read_line(&mut reader, &path).await {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP session ends");
                break;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let ev = QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
                received_at: chrono::Utc::now(),
            };
            {
                let mut log = events.lock().unwrap_or_else(|p| p.into_inner());
                if log.len() == EVENT_LOG_CAPACITY {
                    log.pop_front();
                }
                log.push_back(ev.clone());
            }
            let _ = event_tx.send(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(message = %truncate(&msg.to_string()), "QMP answer without our id");
            continue;
        };
        let Some(tx) = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        else {
            continue; // the caller timed out and left
        };
        let answer = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err((
                err.get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
                    .to_string(),
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ))
        } else {
            Err((
                "ProtocolError".to_string(),
                format!(
                    "answer without return or error: {}",
                    truncate(&msg.to_string())
                ),
            ))
        };
        let _ = tx.send(answer);
    }
    closed.store(true, Ordering::SeqCst);
    // Dropping the senders wakes every waiter with "closed".
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}
