//! Per-node credentials: issued by `sendense-hub node enroll NAME`, replaced by `node rotate`,
//! ended by `node revoke`.
//!
//! A credential is 64 hex digits, the keyed BLAKE3 of `(node, credential id)` under the hub's
//! credential key (a random file of its own in the data directory, 0600). The database holds
//! only the plain BLAKE3 hash of it, so a copy of the database (a MySQL dump, a replica) lets
//! nobody act as a node. The key lets the hub present the node's own credential when it calls
//! the node's API, so the hub's admin token is never sent to a node (nor to whoever listens on
//! a node's forwarded port) and a node holds no secret beyond its own.
//!
//! Rotation without downtime: `rotate` issues a new credential and gives the old one a grace
//! period ([`DEFAULT_GRACE`], `credential_grace_secs`); the node's first request with the new
//! one revokes the old at once. Until then the hub keeps presenting the old one to the node
//! (the node's file still holds it), so neither side refuses the other while the operator
//! installs the new file and restarts the node at a quiet moment.

use crate::db::{Db, DbError, NodeCredential};
use sendense_shared::token::Token;
use std::time::Duration;

/// How long an old credential keeps working after a rotation when the node does not switch
/// earlier: a day is enough to install the new file and restart the node between backups
/// (no job is cut), and short enough that a replaced (maybe leaked) secret dies soon.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Why a credential command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "node {node:?} already holds a valid credential; `sendense-hub node rotate {node}` \
         issues a new one (the old keeps working until the node uses the new), \
         `node revoke {node}` ends it"
    )]
    AlreadyEnrolled { node: String },
    #[error(
        "node {node:?} holds no valid credential; `sendense-hub node enroll {node}` issues one"
    )]
    NotEnrolled { node: String },
    #[error(transparent)]
    Name(#[from] sendense_shared::names::NameError),
    #[error("database")]
    Db(#[from] DbError),
}

/// Who a bearer token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A valid credential of this node.
    Node(String),
    /// A credential of this node that was revoked or whose grace period ended.
    Ended(String),
    /// Nothing the hub issued.
    Unknown,
}

/// The credential store: the key and the database; cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    db: Db,
    key: [u8; 32],
    grace: Duration,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// The hex BLAKE3 the database stores for a secret.
pub fn stored_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Credentials {
    /// `key_material`: the content of the credential key file.
    pub fn new(db: Db, key_material: &Token, grace: Duration) -> Self {
        Credentials {
            db,
            key: blake3::derive_key(
                "sendense-hub node credentials v1",
                key_material.as_str().as_bytes(),
            ),
            grace,
        }
    }

    fn secret(&self, node: &str, credential_id: &str) -> Token {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"node\0");
        h.update(node.as_bytes());
        h.update(b"\0credential\0");
        h.update(credential_id.as_bytes());
        Token::new(h.finalize().to_hex().to_string())
    }

    async fn issue(&self, node: &str, rotation: bool) -> Result<Token, CredentialError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let secret = self.secret(node, &id);
        let others_expire_at = rotation.then(|| {
            now_us().saturating_add(i64::try_from(self.grace.as_micros()).unwrap_or(i64::MAX))
        });
        self.db
            .insert_node_credential(&id, node, &stored_hash(secret.as_str()), others_expire_at)
            .await?;
        Ok(secret)
    }

    async fn valid(&self, node: &str) -> Result<Vec<NodeCredential>, DbError> {
        let now = now_us();
        let mut all = self.db.node_credentials(node).await?;
        all.retain(|c| c.valid_at(now));
        Ok(all)
    }

    /// A first credential for `node` (also after a revocation); refused while one is valid.
    pub async fn enroll(&self, node: &str) -> Result<Token, CredentialError> {
        sendense_shared::names::validate_name("name", node)?;
        if !self.valid(node).await?.is_empty() {
            return Err(CredentialError::AlreadyEnrolled { node: node.into() });
        }
        self.issue(node, false).await
    }

    /// A new credential for an enrolled node; the old one keeps working until the node uses
    /// the new one, or for the grace period.
    pub async fn rotate(&self, node: &str) -> Result<Token, CredentialError> {
        sendense_shared::names::validate_name("name", node)?;
        if self.valid(node).await?.is_empty() {
            return Err(CredentialError::NotEnrolled { node: node.into() });
        }
        self.issue(node, true).await
    }

    /// Ends every credential of `node` now; returns how many were valid or pending.
    pub async fn revoke(&self, node: &str) -> Result<u64, CredentialError> {
        sendense_shared::names::validate_name("name", node)?;
        Ok(self.db.revoke_node_credentials(node).await?)
    }

    /// Who `bearer` is; asks the database every time (no cache), so a revocation holds from
    /// the next request on.
    pub async fn identify(&self, bearer: &str) -> Result<Identity, DbError> {
        let Some(c) = self
            .db
            .node_credential_by_hash(&stored_hash(bearer))
            .await?
        else {
            return Ok(Identity::Unknown);
        };
        if !c.valid_at(now_us()) {
            return Ok(Identity::Ended(c.node));
        }
        if c.first_used_at.is_none()
            && self
                .db
                .first_use_of_node_credential(&c.credential_id, &c.node)
                .await?
        {
            tracing::info!(node = %c.node, credential = %c.credential_id,
                "node used its new credential; its older ones are revoked");
        }
        Ok(Identity::Node(c.node))
    }

    /// The credential the hub presents when it calls `node`'s API: the newest one the node has
    /// used (its file holds that one), else the newest issued; `None` when the node holds none
    /// (then nothing is sent: the admin token never goes to a node).
    pub async fn for_node(&self, node: &str) -> Result<Option<Token>, DbError> {
        let valid = self.valid(node).await?;
        let pick = valid
            .iter()
            .rev()
            .find(|c| c.first_used_at.is_some())
            .or(valid.last());
        Ok(pick.map(|c| self.secret(node, &c.credential_id)))
    }

    /// Every credential of `node` that is valid now (two during a rotation): the keys of the
    /// proofs the hub gives (`GET /api/v1/proof`) and checks (its calls to the node), so
    /// whichever of them the node's file holds, the two sides recognise each other.
    pub async fn valid_secrets(&self, node: &str) -> Result<Vec<Token>, DbError> {
        Ok(self
            .valid(node)
            .await?
            .iter()
            .map(|c| self.secret(node, &c.credential_id))
            .collect())
    }
}
