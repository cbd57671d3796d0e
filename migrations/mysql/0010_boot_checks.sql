-- Boot-checked points (issue 15): the last boot check of each point (a verify job that also
-- booted the point's disks as a throwaway VM on the hub), and while one runs the QEMU process
-- and its private work directory of overlays, so that a hub that crashed mid-check finds and
-- removes them at start-up. MySQL/MariaDB dialect; kept equivalent to ../sqlite/0010_boot_checks.sql.
CREATE TABLE boot_checks (
    backup_id     VARCHAR(64)  NOT NULL PRIMARY KEY,
    verify_id     VARCHAR(64)  NOT NULL,
    -- booting | boot_ok | boot_failed | interrupted
    status        VARCHAR(16)  NOT NULL,
    detail        TEXT         NULL,
    -- the guest's last serial-console lines, JSON array of strings (bounded)
    console_tail  TEXT         NULL,
    -- while booting: QEMU's PID and the work directory (NULL once both are gone)
    qemu_pid      BIGINT       NULL,
    work_dir      TEXT         NULL,
    started_at    BIGINT       NOT NULL,
    checked_at    BIGINT       NULL,
    boot_ms       BIGINT       NULL,
    CONSTRAINT boot_checks_backup_fk FOREIGN KEY (backup_id) REFERENCES backup_jobs (backup_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
