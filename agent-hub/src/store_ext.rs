//! Queries the job manager needs beyond the storage layer's interface, kept apart from
//! `db/` (owned by the storage work) so neither side edits the other's files.

use crate::db::{Db, DbError, q};
use sendense_shared::api::BackupType;
use sendense_shared::ids::BackupId;

/// A job that was prepared as an incremental becomes a full backup (the writer has no valid
/// changed-block map): its type changes and its disks lose their parent and backing file.
pub async fn make_full(db: &Db, id: &BackupId) -> Result<(), DbError> {
    sqlx::query("UPDATE backup_jobs SET backup_type = ? WHERE backup_id = ?")
        .bind(BackupType::Full.as_str())
        .bind(&id.0)
        .execute(db.pool())
        .await
        .map_err(q("turning an incremental job into a full one"))?;
    sqlx::query(
        "UPDATE backup_disks SET parent_backup_id = NULL, backing_path = NULL WHERE backup_id = ?",
    )
    .bind(&id.0)
    .execute(db.pool())
    .await
    .map_err(q("clearing the backing files of a job's disks"))?;
    Ok(())
}
