//! Carrying out the file browser's actions off the UI thread: a listing (the first of a
//! session waits for the hub's appliance) and writing a tar to a file, with its progress.

use crate::app::{FileTarget, Update};
use crate::cli::files::{ArchiveError, copy_archive};
use crate::format;
use crate::sse::cause;
use crate::strings;
use sendense_shared::api::FileListing;
use sendense_shared::client::HubClient;
use sendense_shared::errors::chain;
use sendense_shared::ids::BackupId;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Progress of a tar is reported this often at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How a listing is named in its error: `/dev/sda1:/etc`, `disk 2000`.
fn place(target: &FileTarget) -> String {
    match (&target.fs, target.disk) {
        (Some(fs), _) => format!(
            "{fs}:{}",
            crate::app::files::escape_bytes(&target.path_bytes())
        ),
        (None, Some(k)) => format!("the filesystems of {} {k}", strings::DISK),
        (None, None) => "the point's filesystems".into(),
    }
}

pub(super) async fn list(
    client: &HubClient,
    seq: u64,
    backup_id: &BackupId,
    target: &FileTarget,
) -> Update {
    let result: Result<FileListing, String> = client
        .files(backup_id, &target.query())
        .await
        .map_err(|e| strings::files_listing_failed(&place(target), &cause(&e)));
    Update::FileListing {
        seq,
        result: result.map(Box::new),
    }
}

/// Write the tar of `target` to `dest` (a new file: an existing one is never overwritten); a
/// broken archive's partial file is removed.
pub(super) async fn get(
    client: &HubClient,
    backup_id: &BackupId,
    target: &FileTarget,
    what: &str,
    dest: &str,
    tx: &mpsc::Sender<Update>,
) -> Update {
    let failed = |message: String| Update::FilesDone { message, ok: false };
    let mut file = match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .await
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return failed(format!(
                "{dest} exists: nothing was overwritten; give another path (g)"
            ));
        }
        Err(e) => return failed(format!("cannot create {dest}: {e}")),
    };
    let mut last = Instant::now();
    let result = copy_archive(client, backup_id, &target.query(), &mut file, |n| {
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let _ = tx.try_send(Update::FilesProgress { bytes: n });
        }
    })
    .await;
    drop(file);
    match result {
        Ok(n) => Update::FilesDone {
            message: strings::files_written(dest, what, &format::bytes(n)),
            ok: true,
        },
        Err(e) => {
            let removed = match tokio::fs::remove_file(dest).await {
                Ok(()) => format!("; the partial {dest} was removed"),
                Err(r) => format!("; the partial {dest} could not be removed: {r}"),
            };
            let why = match &e {
                ArchiveError::Refused(c) => cause(c),
                e => chain(e),
            };
            failed(format!("Getting {what} failed: {why}{removed}"))
        }
    }
}
