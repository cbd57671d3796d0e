//! The hub's idea of "now": schedules, policy runs, record timestamps and retention all read it
//! through one [`Clock`], so tests can run months of schedule in minutes.
//!
//! [`SystemClock`] is the default and the only clock a production hub uses. [`FileClock`] is a
//! **test knob** (`test_clock_file` in the config, `--test-clock-file`): the file holds an
//! RFC 3339 instant, and "now" is that instant plus the real time elapsed since the file was
//! last written, so a test moves the hub's time by rewriting the file (atomically: temp file and
//! rename) and timestamps still increase between writes. A hub started with it says so in its
//! log at start-up.

use chrono::{DateTime, TimeDelta, Utc};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The time as the hub's services see it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Test knob: time read from a file (see the module doc).
#[derive(Debug)]
pub struct FileClock {
    path: PathBuf,
    /// The last instant answered: "now" never goes backwards within one file content, and a
    /// file that cannot be read (mid-rename) answers the last good time.
    last: Mutex<Option<(SystemTime, DateTime<Utc>)>>,
}

/// Why the test clock file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("cannot read the test clock file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the test clock file {path} holds {content:?}, not an RFC 3339 instant")]
    Parse { path: PathBuf, content: String },
}

impl FileClock {
    /// Checks that `path` holds an instant now, so a mistyped knob fails at start-up.
    pub fn open(path: &Path) -> Result<FileClock, ClockError> {
        let c = FileClock {
            path: path.to_path_buf(),
            last: Mutex::new(None),
        };
        c.read()?;
        Ok(c)
    }

    fn read(&self) -> Result<(SystemTime, DateTime<Utc>), ClockError> {
        let read = |source| ClockError::Read {
            path: self.path.clone(),
            source,
        };
        let content = std::fs::read_to_string(&self.path).map_err(read)?;
        let written = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(read)?;
        let at = DateTime::parse_from_rfc3339(content.trim())
            .map_err(|_| ClockError::Parse {
                path: self.path.clone(),
                content: content.trim().to_string(),
            })?
            .with_timezone(&Utc);
        Ok((written, at))
    }
}

impl Clock for FileClock {
    fn now(&self) -> DateTime<Utc> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (written, at) = match self.read() {
            Ok(v) => {
                *last = Some(v);
                v
            }
            Err(e) => match *last {
                Some(v) => v,
                None => {
                    tracing::warn!(error = %sendense_shared::errors::chain(&e), "test clock unreadable: wall time");
                    return Utc::now();
                }
            },
        };
        let elapsed = SystemTime::now()
            .duration_since(written)
            .unwrap_or_default();
        at + TimeDelta::from_std(elapsed).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_clock_answers_the_written_instant_and_moves_when_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("now");
        std::fs::write(&path, "2026-03-01T01:00:00Z\n").unwrap();
        let c = FileClock::open(&path).unwrap();
        let t1 = c.now();
        let base: DateTime<Utc> = "2026-03-01T01:00:00Z".parse().unwrap();
        assert!(t1 >= base && t1 < base + TimeDelta::seconds(60), "{t1}");
        std::fs::write(&path, "2026-03-09T01:00:00Z").unwrap();
        let t2 = c.now();
        let base2: DateTime<Utc> = "2026-03-09T01:00:00Z".parse().unwrap();
        assert!(t2 >= base2 && t2 < base2 + TimeDelta::seconds(60), "{t2}");
    }

    #[test]
    fn a_file_without_an_instant_is_refused_naming_the_file_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("now");
        std::fs::write(&path, "tomorrow").unwrap();
        let e = FileClock::open(&path).unwrap_err().to_string();
        assert!(e.contains("now") && e.contains("tomorrow"), "{e}");
    }
}
