-- A QEMU VM's hardware as the node recorded it at backup time (issue 15: memory, vCPUs,
-- machine, disks with their images, NICs, direct kernel boot, the QEMU command line), as the
-- JSON of sendense_shared::api::VmHardware; what an instant recovery starts the VM with. NULL:
-- not recorded (another driver, or a point older than this column). SQLite dialect; kept
-- equivalent to ../mysql/0009_backup_hardware.sql.
ALTER TABLE backup_jobs ADD COLUMN hardware_json TEXT NULL;
