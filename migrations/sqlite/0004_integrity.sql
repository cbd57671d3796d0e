-- Integrity: whole-disk checksums per backup point (a sidecar file next to each image, its own
-- BLAKE3 here), the point's integrity and consistency, verify jobs. SQLite dialect; kept
-- equivalent to ../mysql/0004_integrity.sql.

-- 'unverified' | 'verified' | 'hub_computed' | 'legacy' | 'corrupt'
-- (sendense_shared::api::Integrity). Points completed before this migration were verified
-- only on the ranges the writer wrote: 'legacy'.
ALTER TABLE backup_jobs ADD COLUMN integrity VARCHAR(16) NOT NULL DEFAULT 'unverified';
UPDATE backup_jobs SET integrity = 'legacy' WHERE status = 'completed';
ALTER TABLE backup_jobs ADD COLUMN integrity_detail TEXT NULL;
ALTER TABLE backup_jobs ADD COLUMN verified_at BIGINT NULL;
-- 'application' | 'crash', why, and the freeze window; NULL when the writer did not say
ALTER TABLE backup_jobs ADD COLUMN consistency VARCHAR(16) NULL;
ALTER TABLE backup_jobs ADD COLUMN consistency_reason TEXT NULL;
ALTER TABLE backup_jobs ADD COLUMN freeze_ms BIGINT NULL;
CREATE INDEX backup_jobs_integrity ON backup_jobs (integrity);

-- The checksum sidecar of the disk's image (see agent-hub/src/manifest.rs), the BLAKE3 of the
-- whole sidecar file (so a sidecar changed on disk is caught, not trusted), and who computed
-- the checksums: 'writer' (the node, from the snapshot) or 'hub' (from the stopped image).
ALTER TABLE backup_disks ADD COLUMN manifest_path TEXT NULL;
ALTER TABLE backup_disks ADD COLUMN manifest_blake3 VARCHAR(64) NULL;
ALTER TABLE backup_disks ADD COLUMN checksums_source VARCHAR(16) NULL;

-- Scheduled verification per repository: every verify_interval_secs (NULL: on demand only).
ALTER TABLE repositories ADD COLUMN verify_interval_secs BIGINT NULL;
ALTER TABLE repositories ADD COLUMN last_verified_at BIGINT NULL;

CREATE TABLE verify_jobs (
    verify_id      VARCHAR(64)  NOT NULL PRIMARY KEY,
    -- 'backup:<id>' | 'vm:<name>' | 'repository:<id>'
    scope          VARCHAR(255) NOT NULL,
    -- 'manual' | 'schedule'
    trigger_kind   VARCHAR(16)  NOT NULL,
    status         VARCHAR(16)  NOT NULL,
    points_total   BIGINT       NOT NULL,
    points_done    BIGINT       NOT NULL,
    bytes_total    BIGINT       NOT NULL,
    bytes_read     BIGINT       NOT NULL,
    -- comma-separated backup ids found corrupt by this job
    corrupt        TEXT         NULL,
    error_message  TEXT         NULL,
    created_at     BIGINT       NOT NULL,
    started_at     BIGINT       NULL,
    completed_at   BIGINT       NULL
);
CREATE INDEX verify_jobs_status ON verify_jobs (status);
