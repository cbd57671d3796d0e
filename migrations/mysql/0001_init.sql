-- Sendense hub schema, MySQL/MariaDB dialect. Kept equivalent to ../sqlite/0001_init.sql: same
-- tables, columns, keys and meanings; only the spelling of types and auto-increment differs.
--
-- Times are BIGINT microseconds since the Unix epoch (UTC): the hub reaches both dialects through
-- sqlx's Any driver, which carries integers and text but no date types, and integers sort and
-- compare the same way in both databases.
-- Flags are INT 0/1 (TINYINT/BOOLEAN is not a type the Any driver decodes).

CREATE TABLE repositories (
    id          VARCHAR(128) NOT NULL PRIMARY KEY,
    path        TEXT         NOT NULL,
    created_at  BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE nodes (
    name           VARCHAR(128) NOT NULL PRIMARY KEY,
    api_url        TEXT         NOT NULL,
    version        VARCHAR(255) NOT NULL,
    registered_at  BIGINT       NOT NULL,
    last_seen_at   BIGINT       NULL,
    -- sendense_shared::api::TunnelState as JSON, as the node last reported it
    tunnel_json    TEXT         NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE vm_replication_contexts (
    vm_context_id  VARCHAR(64)  NOT NULL PRIMARY KEY,
    vm_name        VARCHAR(128) NOT NULL UNIQUE,
    node           VARCHAR(128) NULL,
    created_at     BIGINT       NOT NULL,
    updated_at     BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per disk, with the disk's OWN unit number and key (the original system stored unit 0
-- for every disk).
CREATE TABLE vm_disks (
    id             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    vm_context_id  VARCHAR(64)  NOT NULL,
    disk_key       BIGINT       NOT NULL,
    unit_number    INT          NOT NULL,
    size_bytes     BIGINT       NOT NULL,
    label          VARCHAR(255) NOT NULL,
    CONSTRAINT vm_disks_context_key UNIQUE (vm_context_id, disk_key),
    CONSTRAINT vm_disks_context FOREIGN KEY (vm_context_id)
        REFERENCES vm_replication_contexts (vm_context_id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE backup_jobs (
    backup_id           VARCHAR(64)  NOT NULL PRIMARY KEY,
    vm_context_id       VARCHAR(64)  NOT NULL,
    vm_name             VARCHAR(128) NOT NULL,
    backup_type         VARCHAR(16)  NOT NULL,
    repository_id       VARCHAR(128) NOT NULL,
    status              VARCHAR(16)  NOT NULL,
    nbd_targets_string  TEXT         NOT NULL,
    error_message       TEXT         NULL,
    created_at          BIGINT       NOT NULL,
    started_at          BIGINT       NULL,
    completed_at        BIGINT       NULL,
    CONSTRAINT backup_jobs_context FOREIGN KEY (vm_context_id)
        REFERENCES vm_replication_contexts (vm_context_id),
    CONSTRAINT backup_jobs_repository FOREIGN KEY (repository_id) REFERENCES repositories (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX backup_jobs_status ON backup_jobs (status);
CREATE INDEX backup_jobs_context ON backup_jobs (vm_context_id, status, completed_at);

CREATE TABLE backup_disks (
    backup_id            VARCHAR(64)  NOT NULL,
    disk_key             BIGINT       NOT NULL,
    unit_number          INT          NOT NULL,
    qcow2_path           TEXT         NOT NULL,
    nbd_export_name      VARCHAR(255) NOT NULL,
    nbd_port             INT          NULL,
    qemu_nbd_pid         BIGINT       NULL,
    status               VARCHAR(16)  NOT NULL,
    bytes_done           BIGINT       NOT NULL,
    bytes_total          BIGINT       NOT NULL,
    error_message        TEXT         NULL,
    -- the chain: the backup this image's backing file belongs to, and the backing path as
    -- written into the image (relative to the image's directory)
    parent_backup_id     VARCHAR(64)  NULL,
    backing_path         TEXT         NULL,
    -- verification: 'passed' | 'failed' | 'skipped', ranges compared, ranges that differed
    checksum_status      VARCHAR(16)  NULL,
    checksum_ranges      BIGINT       NULL,
    checksum_mismatches  BIGINT       NULL,
    -- summary of `qemu-img check` after the copy
    qemu_img_check       TEXT         NULL,
    PRIMARY KEY (backup_id, disk_key),
    CONSTRAINT backup_disks_job FOREIGN KEY (backup_id)
        REFERENCES backup_jobs (backup_id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The UNIQUE port (primary key) is what makes allocation safe between concurrent requests and
-- between several hub processes sharing one database.
CREATE TABLE nbd_port_allocations (
    port          INT          NOT NULL PRIMARY KEY,
    backup_id     VARCHAR(64)  NOT NULL,
    disk_key      BIGINT       NOT NULL,
    allocated_at  BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX nbd_port_allocations_backup ON nbd_port_allocations (backup_id);

CREATE TABLE qemu_nbd_processes (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    pid           BIGINT       NOT NULL,
    port          INT          NOT NULL,
    export_name   VARCHAR(255) NOT NULL,
    qcow2_path    TEXT         NOT NULL,
    backup_id     VARCHAR(64)  NOT NULL,
    disk_key      BIGINT       NOT NULL,
    alive         INT          NOT NULL,
    started_at    BIGINT       NOT NULL,
    stopped_at    BIGINT       NULL,
    exit_status   TEXT         NULL,
    command_line  TEXT         NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX qemu_nbd_processes_alive ON qemu_nbd_processes (alive);
CREATE INDEX qemu_nbd_processes_pid ON qemu_nbd_processes (pid, port);

-- InnoDB keeps AUTO_INCREMENT across restarts (MariaDB >= 10.2.4), so seq never goes back.
CREATE TABLE job_events (
    seq        BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    backup_id  VARCHAR(64)  NOT NULL,
    at         BIGINT       NOT NULL,
    level      VARCHAR(8)   NOT NULL,
    step       VARCHAR(64)  NOT NULL,
    message    TEXT         NOT NULL,
    disk_key   BIGINT       NULL,
    CONSTRAINT job_events_job FOREIGN KEY (backup_id)
        REFERENCES backup_jobs (backup_id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX job_events_backup ON job_events (backup_id, seq);
