//! The record of every QMP command the node sent: how operators and tests see, for instance,
//! that one `transaction` covered every disk.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Every command the node sent, as JSON lines `{"at","vm","execute","arguments"}`: kept in memory
/// (bounded) and, when given a file, appended there too.
#[derive(Debug)]
pub struct QmpLog {
    file: Option<PathBuf>,
    entries: Mutex<VecDeque<Value>>,
}

const COMMAND_LOG_CAPACITY: usize = 4096;

impl QmpLog {
    pub fn new(file: Option<PathBuf>) -> Self {
        QmpLog {
            file,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Path of the log file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub(super) fn record(&self, vm: &str, command: &str, arguments: &Value) {
        let entry = json!({
            "at": chrono::Utc::now().to_rfc3339(),
            "vm": vm,
            "execute": command,
            "arguments": arguments,
        });
        if let Some(path) = &self.file {
            // The log is evidence for operators and tests; failing to write it must not fail a
            // backup, so the error is only logged.
            // One write per line, so that lines of several VMs' sessions never interleave.
            let line = format!("{entry}\n");
            let res = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = res {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to QMP log");
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == COMMAND_LOG_CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Commands recorded so far (oldest first).
    pub fn entries(&self) -> Vec<Value> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
