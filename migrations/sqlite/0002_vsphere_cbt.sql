-- vSphere: disk facts of the hypervisor, change ids (CBT) per backup disk, and the bytes a copy
-- really wrote. SQLite dialect; kept equivalent to ../mysql/0002_vsphere_cbt.sql. Every new
-- column is NULL-able: rows written before this migration keep NULL ("not known").

-- The driver that serves the VM ('qemu' | 'vsphere') and whether the hypervisor tracks changed
-- blocks (0/1), as the node's inventory last said.
ALTER TABLE vm_replication_contexts ADD COLUMN driver VARCHAR(32) NULL;
ALTER TABLE vm_replication_contexts ADD COLUMN change_tracking INTEGER NULL;

-- e.g. 'SCSI controller 0', '[datastore1] vm1/vm1.vmdk', thin 0/1
ALTER TABLE vm_disks ADD COLUMN controller VARCHAR(255) NULL;
ALTER TABLE vm_disks ADD COLUMN backing_file TEXT NULL;
ALTER TABLE vm_disks ADD COLUMN thin_provisioned INTEGER NULL;

-- The hypervisor's change id of the snapshot the disk was copied from (the next incremental asks
-- for the blocks changed since it), and the bytes the copy wrote into the target (data and
-- explicit zeroes, without skipped holes or unchanged areas).
ALTER TABLE backup_disks ADD COLUMN change_id VARCHAR(255) NULL;
ALTER TABLE backup_disks ADD COLUMN bytes_transferred BIGINT NULL;
