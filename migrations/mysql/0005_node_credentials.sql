-- Per-node credentials (issue 14): one row per credential the hub issued a node with
-- `sendense-hub node enroll|rotate NAME`. MySQL/MariaDB dialect; kept equivalent to
-- ../sqlite/0005_node_credentials.sql.
--
-- The hub stores only the BLAKE3 hash of a credential (hex): a copy of the database does not
-- let anyone act as a node. A credential is valid while `revoked_at` is NULL and `expires_at`
-- is NULL or later than now. Rotation adds a row and gives the node's other valid rows an
-- `expires_at` (the grace period); the first request made with the new row (`first_used_at`)
-- revokes them at once.
CREATE TABLE node_credentials (
    credential_id  VARCHAR(64)  NOT NULL PRIMARY KEY,
    node           VARCHAR(128) NOT NULL,
    token_hash     VARCHAR(64)  NOT NULL UNIQUE,
    created_at     BIGINT       NOT NULL,
    first_used_at  BIGINT       NULL,
    expires_at     BIGINT       NULL,
    revoked_at     BIGINT       NULL,
    INDEX node_credentials_node (node)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
