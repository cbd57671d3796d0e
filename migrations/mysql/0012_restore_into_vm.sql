-- Restores into a powered-off VM's own disk (issue 15): the hub's name of the VM whose disk
-- the restore replaced (NULL: a restore into a new image). MariaDB dialect; kept equivalent
-- to ../sqlite/0012_restore_into_vm.sql.
ALTER TABLE restore_jobs ADD COLUMN target_vm VARCHAR(128) NULL;
