-- Unattended operation: backup policies, their schedule slots and runs, protected points, prune
-- jobs. SQLite dialect; kept equivalent to ../mysql/0006_policies.sql.

CREATE TABLE policies (
    policy_id          VARCHAR(64)  NOT NULL PRIMARY KEY,
    name               VARCHAR(128) NOT NULL UNIQUE,
    -- sendense_shared::api::VmSelector as JSON
    vms_json           TEXT         NOT NULL,
    repository_id      VARCHAR(128) NOT NULL REFERENCES repositories (id),
    schedule           VARCHAR(255) NOT NULL,
    timezone           VARCHAR(64)  NOT NULL,
    -- sendense_shared::api::{BackupRule, Retention} as JSON
    backup_rule_json   TEXT         NOT NULL,
    retention_json     TEXT         NOT NULL,
    max_chain_length   BIGINT       NULL,
    -- 'full' | 'synthetic'
    chain_limit        VARCHAR(16)  NOT NULL,
    enabled            INTEGER      NOT NULL,
    priority           BIGINT       NOT NULL,
    queue_window_secs  BIGINT       NOT NULL,
    created_at         BIGINT       NOT NULL,
    updated_at         BIGINT       NOT NULL
);

-- One row per policy and planned time: the claim that this slot was (or is being) run, so a
-- slot runs once even with several hubs or a restart in the middle.
CREATE TABLE policy_slots (
    policy_id   VARCHAR(64)  NOT NULL REFERENCES policies (policy_id) ON DELETE CASCADE,
    planned_at  BIGINT       NOT NULL,
    claimed_at  BIGINT       NOT NULL,
    late        INTEGER      NOT NULL,
    manual      INTEGER      NOT NULL,
    PRIMARY KEY (policy_id, planned_at)
);

-- One VM's run of one slot: queued, running (backup_id set), and how it ended.
CREATE TABLE policy_runs (
    run_id        VARCHAR(64)  NOT NULL PRIMARY KEY,
    policy_id     VARCHAR(64)  NOT NULL REFERENCES policies (policy_id) ON DELETE CASCADE,
    planned_at    BIGINT       NOT NULL,
    vm_name       VARCHAR(128) NOT NULL,
    late          INTEGER      NOT NULL,
    manual        INTEGER      NOT NULL,
    -- sendense_shared::api::RunStatus
    status        VARCHAR(16)  NOT NULL,
    priority      BIGINT       NOT NULL,
    backup_type   VARCHAR(16)  NULL,
    backup_id     VARCHAR(64)  NULL,
    queued_at     BIGINT       NOT NULL,
    give_up_at    BIGINT       NOT NULL,
    started_at    BIGINT       NULL,
    ended_at      BIGINT       NULL,
    reason        TEXT         NULL,
    UNIQUE (policy_id, planned_at, vm_name)
);
CREATE INDEX policy_runs_status ON policy_runs (status, priority, planned_at);
CREATE INDEX policy_runs_policy ON policy_runs (policy_id, queued_at);

ALTER TABLE backup_jobs ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_jobs ADD COLUMN policy_id VARCHAR(64) NULL;

CREATE TABLE prune_jobs (
    prune_id       VARCHAR(64)  NOT NULL PRIMARY KEY,
    vm_name        VARCHAR(128) NOT NULL,
    -- 'prune' | 'synthetic'
    kind           VARCHAR(16)  NOT NULL,
    status         VARCHAR(16)  NOT NULL,
    -- sendense_shared::api::PrunePlan as JSON: what this job was asked to do
    plan_json      TEXT         NOT NULL,
    steps_total    BIGINT       NOT NULL,
    steps_done     BIGINT       NOT NULL,
    bytes_total    BIGINT       NOT NULL,
    bytes_done     BIGINT       NOT NULL,
    error_message  TEXT         NULL,
    created_at     BIGINT       NOT NULL,
    started_at     BIGINT       NULL,
    completed_at   BIGINT       NULL
);
CREATE INDEX prune_jobs_status ON prune_jobs (status);
CREATE INDEX prune_jobs_vm ON prune_jobs (vm_name, created_at);
