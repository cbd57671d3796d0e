-- Instant recoveries (issue 15): a backup point booted as a new VM on a node while its disks
-- stream home. A recovery is a job like a restore: a row per recovery whose status moves by
-- compare-and-set, its events in job_events (under the point's backup_id, job_id = the
-- recovery's id), and one row per disk it serves: the read-only export (port, qemu-nbd PID)
-- while the recovery holds it, and the stream's progress as the node last reported it.
-- SQLite dialect; kept equivalent to ../mysql/0011_recoveries.sql.

CREATE TABLE recovery_jobs (
    recovery_id    VARCHAR(64)  NOT NULL PRIMARY KEY,
    -- the point recovered
    backup_id      VARCHAR(64)  NOT NULL REFERENCES backup_jobs (backup_id),
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
    completed_at   BIGINT       NULL
);
CREATE INDEX recovery_jobs_status ON recovery_jobs (status);
CREATE INDEX recovery_jobs_backup ON recovery_jobs (backup_id, status);
CREATE INDEX recovery_jobs_node_vm ON recovery_jobs (node, vm_name, status);

CREATE TABLE recovery_disks (
    recovery_id      VARCHAR(64)  NOT NULL REFERENCES recovery_jobs (recovery_id),
    disk_key         BIGINT       NOT NULL,
    -- the guest's order (vda, vdb, ...), from 0
    position         INTEGER      NOT NULL,
    source_qcow2     TEXT         NOT NULL,
    -- while the recovery holds them (NULL once it ended)
    nbd_port         INTEGER      NULL,
    nbd_export_name  VARCHAR(255) NOT NULL,
    qemu_nbd_pid     BIGINT       NULL,
    overlay          TEXT         NULL,
    bytes_done       BIGINT       NOT NULL,
    bytes_total      BIGINT       NOT NULL,
    rate_bps         BIGINT       NOT NULL,
    stream           VARCHAR(32)  NOT NULL,
    PRIMARY KEY (recovery_id, disk_key)
);
