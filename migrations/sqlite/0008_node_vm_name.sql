-- Two nodes with a VM of the same name (issue 14): the first node's VM keeps the name; the
-- second node's is registered under the hub name `<name>.<node>` and remembers here the name its
-- node knows it by (what the hub sends that node in a backup start). NULL: the node's name is the
-- hub name. SQLite dialect; kept equivalent to ../mysql/0008_node_vm_name.sql.
ALTER TABLE vm_replication_contexts ADD COLUMN node_vm_name VARCHAR(128) NULL;
CREATE UNIQUE INDEX vm_contexts_node_vm_name ON vm_replication_contexts (node, node_vm_name);
