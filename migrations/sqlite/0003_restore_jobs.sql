-- Restores are jobs like backups: a row per restore, its status moved by compare-and-set, its
-- events in job_events. SQLite dialect; kept equivalent to ../mysql/0003_restore_jobs.sql.

CREATE TABLE restore_jobs (
    restore_id       VARCHAR(64)  NOT NULL PRIMARY KEY,
    -- the backup point restored; its events log carries the restore's events too
    backup_id        VARCHAR(64)  NOT NULL REFERENCES backup_jobs (backup_id),
    vm_name          VARCHAR(128) NOT NULL,
    disk_key         BIGINT       NOT NULL,
    target_node      VARCHAR(128) NOT NULL,
    target_path      TEXT         NOT NULL,
    status           VARCHAR(16)  NOT NULL,
    source_qcow2     TEXT         NOT NULL,
    nbd_port         INTEGER      NULL,
    nbd_export_name  VARCHAR(255) NOT NULL,
    bytes_done       BIGINT       NOT NULL,
    bytes_total      BIGINT       NOT NULL,
    error_message    TEXT         NULL,
    created_at       BIGINT       NOT NULL,
    started_at       BIGINT       NULL,
    completed_at     BIGINT       NULL
);
CREATE INDEX restore_jobs_status ON restore_jobs (status);
CREATE INDEX restore_jobs_backup ON restore_jobs (backup_id, status);

-- The job an event belongs to when it is not the backup itself (a restore of it); NULL for the
-- backup's own events and for every event written before this migration.
ALTER TABLE job_events ADD COLUMN job_id VARCHAR(64) NULL;
CREATE INDEX job_events_job ON job_events (job_id, seq);
