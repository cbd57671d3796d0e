//! The crash journal: one JSON file per snapshot the node is taking or holds
//! (`<run_dir>/vsphere-snapshot-<stem>.json`), written before `CreateSnapshot_Task` and removed
//! once the snapshot is gone, so that a node that died in between finds and removes it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const PREFIX: &str = "vsphere-snapshot-";

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub backup_id: String,
    pub vm_name: String,
    /// `vm-42`.
    pub vm_moref: String,
    /// `sendense-<backup id>`.
    pub snapshot_name: String,
    /// `snapshot-43`, once the task returned it.
    pub snapshot_moref: Option<String>,
}

/// Where the entry of a snapshot whose files use `stem` lives.
pub fn path(run_dir: &Path, stem: &str) -> PathBuf {
    run_dir.join(format!("{PREFIX}{stem}.json"))
}

/// Writes (or rewrites) an entry whole or not at all ([`crate::fsutil::atomic_write`]).
pub fn write(path: &Path, entry: &Entry) -> std::io::Result<()> {
    crate::fsutil::atomic_write(path, &serde_json::to_vec_pretty(entry).unwrap_or_default())
}

/// Removes an entry; a missing one is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every entry in `run_dir` with its path; unreadable files come back as errors naming them.
pub fn all(run_dir: &Path) -> Vec<Result<(PathBuf, Entry), String>> {
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let entry = serde_json::from_slice(&text)
                .map_err(|e| format!("{}: not a snapshot journal: {e}", p.display()))?;
            Ok((p, entry))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry {
            backup_id: "b1".into(),
            vm_name: "vm1".into(),
            vm_moref: "vm-42".into(),
            snapshot_name: "sendense-b1".into(),
            snapshot_moref: None,
        };
        let p = path(dir.path(), "b1");
        write(&p, &e).unwrap();
        let updated = Entry {
            snapshot_moref: Some("snapshot-43".into()),
            ..e
        };
        write(&p, &updated).unwrap();
        std::fs::write(path(dir.path(), "junk"), "{").unwrap();
        std::fs::write(dir.path().join("other.json"), "{}").unwrap();
        let listed = all(dir.path());
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].as_ref().unwrap(), &(p.clone(), updated));
        assert!(
            listed[1]
                .as_ref()
                .unwrap_err()
                .contains("not a snapshot journal")
        );
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(all(dir.path()).len(), 1);
    }
}
