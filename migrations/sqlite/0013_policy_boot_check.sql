-- A policy may require a boot check of each new point before its retention prune (issue 15):
-- the boot spec as JSON (NULL: no boot check). SQLite dialect; kept equivalent to
-- ../mysql/0013_policy_boot_check.sql.
ALTER TABLE policies ADD COLUMN boot_check_json TEXT NULL;
