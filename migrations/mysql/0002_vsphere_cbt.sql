-- vSphere: disk facts of the hypervisor, change ids (CBT) per backup disk, and the bytes a copy
-- really wrote. MySQL/MariaDB dialect; kept equivalent to ../sqlite/0002_vsphere_cbt.sql. Every
-- new column is NULL-able: rows written before this migration keep NULL ("not known").
-- One ALTER TABLE per table: MySQL commits each DDL statement by itself, and one statement per
-- table either adds all of that table's columns or none.

-- The driver that serves the VM ('qemu' | 'vsphere') and whether the hypervisor tracks changed
-- blocks (0/1), as the node's inventory last said.
ALTER TABLE vm_replication_contexts
    ADD COLUMN driver           VARCHAR(32)  NULL,
    ADD COLUMN change_tracking  INT          NULL;

-- e.g. 'SCSI controller 0', '[datastore1] vm1/vm1.vmdk', thin 0/1
ALTER TABLE vm_disks
    ADD COLUMN controller        VARCHAR(255) NULL,
    ADD COLUMN backing_file      TEXT         NULL,
    ADD COLUMN thin_provisioned  INT          NULL;

-- The hypervisor's change id of the snapshot the disk was copied from (the next incremental asks
-- for the blocks changed since it), and the bytes the copy wrote into the target (data and
-- explicit zeroes, without skipped holes or unchanged areas).
ALTER TABLE backup_disks
    ADD COLUMN change_id          VARCHAR(255) NULL,
    ADD COLUMN bytes_transferred  BIGINT       NULL;
