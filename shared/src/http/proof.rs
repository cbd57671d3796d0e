//! The server side of `GET /api/v1/proof` ([`crate::proof`]): the query check both agents do
//! before answering, so neither answers a MAC for anything but a nonce of the fixed shape.

use super::ErrorAnswer;
use crate::errors::ErrorCode;
use crate::proof::{ProofQuery, valid_nonce};

/// `Ok` for a nonce of [`crate::proof::NONCE_BYTES`] hex bytes; `422 invalid_field` otherwise.
pub fn check_query(q: &ProofQuery) -> Result<(), ErrorAnswer> {
    check_nonce(&q.nonce)
}

/// [`check_query`] for a nonce alone (the hub's query, whose `node` is required).
pub fn check_nonce(nonce: &str) -> Result<(), ErrorAnswer> {
    if valid_nonce(nonce) {
        Ok(())
    } else {
        Err(ErrorAnswer::new(
            ErrorCode::InvalidField,
            format!(
                "nonce: must be {} hex digits",
                2 * crate::proof::NONCE_BYTES
            ),
        ))
    }
}
