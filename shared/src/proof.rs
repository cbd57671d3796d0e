//! Endpoint proofs: before a caller sends its bearer credential to a URL, the endpoint there
//! proves that it knows the node's credential, so a process that merely bound a free port (a
//! tunnel forward while ssh is down) gets nothing.
//!
//! The challenge is `GET /api/v1/proof?nonce=<64 hex digits>&node=<name>`, open on both agents
//! (no bearer: a credential would defeat it). The answer is [`ProofAnswer`]: one proof per
//! credential the answering side holds for that node (a node holds one; the hub all that are
//! valid, two during a rotation). A proof is
//! `hex(BLAKE3-keyed(key, "sendense-proof-v1\0" || role || "\0" || node || "\0" || nonce))`,
//! `key = BLAKE3-derive_key("sendense-proof-v1 key", credential)`:
//!
//! - the **role** (`hub` or `node`) is the answering side's: a squatter on the node's hub
//!   forward that asks the node's own API for a proof of the node's nonce gets a `node` proof,
//!   which the node refuses (no reflection);
//! - the **nonce** is the caller's, fresh from the kernel's generator for every connection:
//!   an answer recorded earlier is for another nonce (no replay);
//! - the **key** is derived from the credential, never the credential itself, and a proof is a
//!   MAC: it tells nothing about the credential.
//!
//! What it does not stop: a relay that can itself reach the real endpoint (it passes the
//! challenge through). In the tunnel setup both APIs listen on loopback of their own machine,
//! so a squatter on the other machine cannot reach the real one; a direct setup over a network
//! needs TLS for that, as for any bearer scheme.

use crate::token::Token;
use serde::{Deserialize, Serialize};

/// Domain separation of the key and of the message (bump to change the scheme).
const CONTEXT: &str = "sendense-proof-v1";
/// The path of the challenge on both agents.
pub const PATH: &str = "/api/v1/proof";
/// The `node` of the hub's proof to an operator's tool (the console): the hub proves it holds
/// the admin token. `@` is not allowed in node names, so it names no node.
pub const ADMIN: &str = "@admin";
/// Bytes of a nonce (hex: twice as many digits).
pub const NONCE_BYTES: usize = 32;

/// Who answers a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Hub,
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hub => "hub",
            Role::Node => "node",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of `GET /api/v1/proof`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProofAnswer {
    /// Hex proofs, one per credential the answering side holds for the node.
    pub proofs: Vec<String>,
}

/// The query of `GET /api/v1/proof`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProofQuery {
    #[param(pattern = r"^[0-9a-fA-F]{64}$")]
    pub nonce: String,
    #[serde(default)]
    pub node: Option<String>,
}

/// The hub's query of `GET /api/v1/proof`: the hub holds many nodes' credentials, so it is always
/// asked for one node's (or [`ADMIN`] for the admin token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HubProofQuery {
    #[param(pattern = r"^[0-9a-fA-F]{64}$")]
    pub nonce: String,
    /// The node whose credential is to be proven, or `@admin` for the admin token.
    #[param(pattern = r"^(@admin|(\.?[A-Za-z0-9_-])+\.?)$", max_length = 128)]
    pub node: String,
}

/// A fresh nonce, hex.
pub fn nonce() -> String {
    hex(&rand::random::<[u8; NONCE_BYTES]>())
}

/// True when `nonce` is exactly [`NONCE_BYTES`] bytes of lower- or upper-case hex: answering
/// anything else would make the endpoint a MAC oracle for chosen messages of any shape.
pub fn valid_nonce(nonce: &str) -> bool {
    nonce.len() == 2 * NONCE_BYTES && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The proof `role` gives for `node` and `nonce` with `credential`.
pub fn prove(credential: &Token, role: Role, node: &str, nonce: &str) -> String {
    let key = blake3::derive_key(
        &format!("{CONTEXT} key"),
        credential.as_str().trim().as_bytes(),
    );
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(CONTEXT.as_bytes());
    h.update(b"\0");
    h.update(role.as_str().as_bytes());
    h.update(b"\0");
    h.update(node.as_bytes());
    h.update(b"\0");
    h.update(nonce.to_ascii_lowercase().as_bytes());
    h.finalize().to_hex().to_string()
}

/// True when one of `answer`'s proofs is `role`'s for `node` and `nonce` under `credential`
/// (compared in constant time).
pub fn verify(
    credential: &Token,
    role: Role,
    node: &str,
    nonce: &str,
    answer: &ProofAnswer,
) -> bool {
    let want = Token::new(prove(credential, role, node, nonce));
    answer.proofs.iter().any(|p| want.matches(p))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(p: String) -> ProofAnswer {
        ProofAnswer { proofs: vec![p] }
    }

    #[test]
    fn the_right_key_role_node_and_nonce_pass() {
        let c = Token::new("c".repeat(64));
        let n = nonce();
        assert!(valid_nonce(&n));
        let a = answer(prove(&c, Role::Hub, "node1", &n));
        assert!(verify(&c, Role::Hub, "node1", &n, &a));
        // One of several (the hub during a rotation) is enough.
        let two = ProofAnswer {
            proofs: vec!["00".repeat(32), a.proofs[0].clone()],
        };
        assert!(verify(&c, Role::Hub, "node1", &n, &two));
    }

    #[test]
    fn a_wrong_key_is_refused() {
        let n = nonce();
        let a = answer(prove(
            &Token::new("other".to_string()),
            Role::Hub,
            "node1",
            &n,
        ));
        assert!(!verify(
            &Token::new("mine".to_string()),
            Role::Hub,
            "node1",
            &n,
            &a
        ));
    }

    #[test]
    fn a_reflected_role_is_refused() {
        // A squatter on the node's hub forward asks the node's own API to answer the node's
        // challenge: the node's proof is a `node` proof, and the node wants the hub's.
        let c = Token::new("secret".to_string());
        let n = nonce();
        let reflected = answer(prove(&c, Role::Node, "node1", &n));
        assert!(!verify(&c, Role::Hub, "node1", &n, &reflected));
        let reflected = answer(prove(&c, Role::Hub, "node1", &n));
        assert!(!verify(&c, Role::Node, "node1", &n, &reflected));
    }

    #[test]
    fn a_replayed_answer_is_refused_for_a_fresh_nonce() {
        let c = Token::new("secret".to_string());
        let old = nonce();
        let recorded = answer(prove(&c, Role::Hub, "node1", &old));
        let fresh = nonce();
        assert_ne!(old, fresh);
        assert!(!verify(&c, Role::Hub, "node1", &fresh, &recorded));
    }

    #[test]
    fn another_nodes_proof_is_refused() {
        let c = Token::new("secret".to_string());
        let n = nonce();
        let a = answer(prove(&c, Role::Hub, "node2", &n));
        assert!(!verify(&c, Role::Hub, "node1", &n, &a));
    }

    #[test]
    fn nonces_of_another_shape_are_not_answered() {
        assert!(!valid_nonce(""));
        assert!(!valid_nonce(&"0".repeat(63)));
        assert!(!valid_nonce(&"g".repeat(64)));
        assert!(valid_nonce(&"aF".repeat(32)));
    }
}
