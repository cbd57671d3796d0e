-- The journal of prune and synthetic-full jobs: one row per step (delete, rebase, merge) with
-- the files it touches and the phase it reached, written before the step changes anything, so
-- that the start-up reconciler can finish a step a killed hub left half done
-- (agent-hub/src/prune/journal.rs). SQLite dialect; kept equivalent to
-- ../mysql/0007_prune_journal.sql.

CREATE TABLE prune_steps (
    prune_id      VARCHAR(64)  NOT NULL REFERENCES prune_jobs (prune_id) ON DELETE CASCADE,
    seq           BIGINT       NOT NULL,
    -- 'delete' | 'rebase' | 'merge'
    kind          VARCHAR(16)  NOT NULL,
    -- 'planned' | 'started' | 'copied' | 'cataloged' | 'done' | 'failed'
    phase         VARCHAR(16)  NOT NULL,
    -- agent-hub's prune::journal::Step as JSON: points, disks, image paths
    step_json     TEXT         NOT NULL,
    -- the qemu-img of the step while it runs, checked against /proc/PID/cmdline after a crash
    pid           BIGINT       NULL,
    bytes_copied  BIGINT       NOT NULL,
    bytes_freed   BIGINT       NOT NULL,
    updated_at    BIGINT       NOT NULL,
    PRIMARY KEY (prune_id, seq)
);
CREATE INDEX prune_steps_phase ON prune_steps (phase);
