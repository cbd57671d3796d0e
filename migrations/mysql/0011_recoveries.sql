-- Instant recoveries (issue 15): a backup point booted as a new VM on a node while its disks
-- stream home. A recovery is a job like a restore: a row per recovery whose status moves by
-- compare-and-set, its events in job_events (under the point's backup_id, job_id = the
-- recovery's id), and one row per disk it serves: the read-only export (port, qemu-nbd PID)
-- while the recovery holds it, and the stream's progress as the node last reported it.
-- MySQL/MariaDB dialect; kept equivalent to ../sqlite/0011_recoveries.sql.

CREATE TABLE recovery_jobs (
    recovery_id    VARCHAR(64)  NOT NULL PRIMARY KEY,
    -- the point recovered
    backup_id      VARCHAR(64)  NOT NULL,
    -- the VM the point was taken of (prune's busy check)
    source_vm      VARCHAR(128) NOT NULL,
    node           VARCHAR(128) NOT NULL,
    -- the new VM on the node: one active recovery per (node, vm_name)
    vm_name        VARCHAR(64)  NOT NULL,
    status         VARCHAR(16)  NOT NULL,
    -- as the node last reported them
    vm_state       VARCHAR(32)  NULL,
    qemu_pid       BIGINT       NULL,
    qmp_socket     TEXT         NULL,
    serial_log     TEXT         NULL,
    stalled        TEXT         NULL,
    error_message  TEXT         NULL,
    created_at     BIGINT       NOT NULL,
    started_at     BIGINT       NULL,
    -- the first report that named the VM's QEMU process
    vm_started_at  BIGINT       NULL,
    completed_at   BIGINT       NULL,
    CONSTRAINT recovery_jobs_backup_fk FOREIGN KEY (backup_id) REFERENCES backup_jobs (backup_id),
    INDEX recovery_jobs_status (status),
    INDEX recovery_jobs_backup (backup_id, status),
    INDEX recovery_jobs_node_vm (node, vm_name, status)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE recovery_disks (
    recovery_id      VARCHAR(64)  NOT NULL,
    disk_key         BIGINT       NOT NULL,
    -- the guest's order (vda, vdb, ...), from 0
    position         INT          NOT NULL,
    source_qcow2     TEXT         NOT NULL,
    -- while the recovery holds them (NULL once it ended)
    nbd_port         INT          NULL,
    nbd_export_name  VARCHAR(255) NOT NULL,
    qemu_nbd_pid     BIGINT       NULL,
    overlay          TEXT         NULL,
    bytes_done       BIGINT       NOT NULL,
    bytes_total      BIGINT       NOT NULL,
    rate_bps         BIGINT       NOT NULL,
    stream           VARCHAR(32)  NOT NULL,
    PRIMARY KEY (recovery_id, disk_key),
    CONSTRAINT recovery_disks_job_fk FOREIGN KEY (recovery_id) REFERENCES recovery_jobs (recovery_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
