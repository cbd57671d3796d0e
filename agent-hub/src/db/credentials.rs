//! `node_credentials`: the credentials the hub issued its nodes, stored as the BLAKE3 hash of
//! the secret only (see `migrations/*/0005_node_credentials.sql`). What a credential is and how
//! it is derived lives in [`crate::auth`]; this module only keeps the rows.

use super::{DbError, col, now_us, q, with_retry};
use crate::db::Db;
use sqlx::any::AnyRow;

/// One issued credential, without its secret (the hub never stores that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredential {
    pub credential_id: String,
    pub node: String,
    /// Microseconds since the epoch, as every time in the schema.
    pub created_at: i64,
    /// The first request the node made with it; `None`: never used yet.
    pub first_used_at: Option<i64>,
    /// End of the grace period a rotation gave it; `None`: no end.
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl NodeCredential {
    /// Accepted at `now_us`: not revoked and not past its grace period.
    pub fn valid_at(&self, now_us: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now_us)
    }
}

/// A static `SELECT` of every column but the hash, with `$rest` after the table.
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT credential_id, node, created_at, first_used_at, expires_at, revoked_at \
             FROM node_credentials ",
            $rest
        )
    };
}

fn row(r: &AnyRow) -> Result<NodeCredential, DbError> {
    Ok(NodeCredential {
        credential_id: col(r, "credential_id")?,
        node: col(r, "node")?,
        created_at: col(r, "created_at")?,
        first_used_at: col(r, "first_used_at")?,
        expires_at: col(r, "expires_at")?,
        revoked_at: col(r, "revoked_at")?,
    })
}

impl Db {
    /// Records a new credential of `node`. With `others_expire_at` (a rotation), every other
    /// valid credential the node has used ends then at the latest (the grace period), and one
    /// it never used is revoked now (superseded before it was ever in use: two pending
    /// credentials would let the older one, used first, revoke the newer). In one transaction,
    /// so there is no moment with neither or with an unbounded old one.
    pub async fn insert_node_credential(
        &self,
        credential_id: &str,
        node: &str,
        token_hash: &str,
        others_expire_at: Option<i64>,
    ) -> Result<(), DbError> {
        let doing = "recording a node credential";
        with_retry(|| async {
            let mut tx = self.begin_write(doing).await?;
            let now = now_us();
            if let Some(at) = others_expire_at {
                sqlx::query(
                    "UPDATE node_credentials SET revoked_at = ? WHERE node = ? \
                     AND revoked_at IS NULL AND first_used_at IS NULL",
                )
                .bind(now)
                .bind(node)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
                sqlx::query(
                    "UPDATE node_credentials SET expires_at = ? WHERE node = ? \
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                )
                .bind(at)
                .bind(node)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
            }
            sqlx::query(
                "INSERT INTO node_credentials (credential_id, node, token_hash, created_at) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(credential_id)
            .bind(node)
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
            tx.commit().await.map_err(q(doing))
        })
        .await
    }

    /// The credential whose secret hashes to `token_hash`, valid or not.
    pub async fn node_credential_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<NodeCredential>, DbError> {
        let r = sqlx::query(select!("WHERE token_hash = ?"))
            .bind(token_hash)
            .fetch_optional(self.pool())
            .await
            .map_err(q("checking a node credential"))?;
        r.as_ref().map(row).transpose()
    }

    /// Every credential issued to `node`, oldest first.
    pub async fn node_credentials(&self, node: &str) -> Result<Vec<NodeCredential>, DbError> {
        sqlx::query(select!("WHERE node = ? ORDER BY created_at, credential_id"))
            .bind(node)
            .fetch_all(self.pool())
            .await
            .map_err(q("listing a node's credentials"))?
            .iter()
            .map(row)
            .collect()
    }

    /// The node used credential `credential_id` for the first time: recorded, and every other
    /// credential of the node is revoked now (the rotation is complete; the old secret's grace
    /// period ends early). Returns whether this call was the first use.
    pub async fn first_use_of_node_credential(
        &self,
        credential_id: &str,
        node: &str,
    ) -> Result<bool, DbError> {
        let doing = "recording a node credential's first use";
        with_retry(|| async {
            let mut tx = self.begin_write(doing).await?;
            let now = now_us();
            let first = sqlx::query(
                "UPDATE node_credentials SET first_used_at = ? \
                 WHERE credential_id = ? AND first_used_at IS NULL",
            )
            .bind(now)
            .bind(credential_id)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?
            .rows_affected()
                == 1;
            if first {
                sqlx::query(
                    "UPDATE node_credentials SET revoked_at = ? \
                     WHERE node = ? AND credential_id <> ? AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(node)
                .bind(credential_id)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
            }
            tx.commit().await.map_err(q(doing))?;
            Ok(first)
        })
        .await
    }

    /// Revokes every credential of `node` now; returns how many were still unrevoked.
    pub async fn revoke_node_credentials(&self, node: &str) -> Result<u64, DbError> {
        let doing = "revoking a node's credentials";
        let now = now_us();
        with_retry(|| async {
            Ok(sqlx::query(
                "UPDATE node_credentials SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(node)
            .execute(self.pool())
            .await
            .map_err(q(doing))?
            .rows_affected())
        })
        .await
    }
}
