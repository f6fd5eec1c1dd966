//! Idempotency keys: the first answer to a state-changing call made with an
//! `Idempotency-Key` header, kept in the table `k` for as long as payments
//! are (`limits.payment_retention_seconds`), so that the same call again
//! gets that answer and another call with the key gets 409.
//!
//! The answer is kept after the effect, without waiting for the store's
//! flush: the effect itself is what cannot happen twice (a payment's id, a
//! deposit's id, an account's id are checked by their processors), so a
//! crash between the two costs only the replayed answer, not the money.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::now_ms;
use crate::runtime::{Runtime, RuntimeError};
use crate::store::Batch;

/// Store table of the kept answers.
pub const TABLE: &str = "k";

/// Longest key: it becomes a payment's id (and `<key>.<n>` for a batch's
/// items without one), so it is an id of at most 40 characters; a UUID fits.
pub const MAX_KEY_CHARS: usize = 40;

/// Largest answer kept; a longer one is not kept (the call stays safe to
/// repeat, its answer is then computed again).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// The first answer to a call, and what the call was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// SHA-256 of the method, the path and the body.
    pub fingerprint: [u8; 32],
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub at_ms: i64,
}

/// Checks a key: 1 to [`MAX_KEY_CHARS`] of `[A-Za-z0-9_.:-]`.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_CHARS {
        return Err(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters, got {}",
            key.chars().count()
        ));
    }
    match key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.:-".contains(*c)))
    {
        Some(c) => Err(format!(
            "Idempotency-Key contains {c:?}; allowed are letters, digits and _ . : -"
        )),
        None => Ok(()),
    }
}

/// What identifies a call: its method, its path and its body.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(path.as_bytes());
    hash.update([0]);
    hash.update(body);
    hash.finalize().into()
}

fn retention_ms(runtime: &Runtime) -> i64 {
    let seconds = runtime.config().limits.payment_retention_seconds;
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000)
}

/// The kept answer for `key`, unless it is older than the retention.
pub fn find(runtime: &Runtime, key: &str) -> Result<Option<Answer>, RuntimeError> {
    let answer: Option<Answer> = runtime.store().get(&format!("{TABLE}/{key}"))?;
    let fresh = now_ms().saturating_sub(retention_ms(runtime));
    Ok(answer.filter(|a| a.at_ms >= fresh))
}

/// Keeps the first answer for `key`.
pub fn keep(runtime: &Runtime, key: &str, answer: &Answer) -> Result<(), RuntimeError> {
    if answer.body.len() <= MAX_ANSWER_BYTES {
        runtime.store().put(&format!("{TABLE}/{key}"), answer)?;
    }
    Ok(())
}

/// Deletes the answers older than the retention; returns how many.
pub fn forget_expired(runtime: &Runtime) -> Result<u64, RuntimeError> {
    let fresh = now_ms().saturating_sub(retention_ms(runtime));
    let (mut after, mut forgotten) = (None::<String>, 0);
    loop {
        let rows: Vec<(String, Answer)> = runtime.store().scan(TABLE, after.as_deref(), 1_000)?;
        let Some((last, _)) = rows.last() else {
            return Ok(forgotten);
        };
        after = Some(last.clone());
        let mut batch = Batch::default();
        for (key, _) in rows.iter().filter(|(_, a)| a.at_ms < fresh) {
            batch.remove(format!("{TABLE}/{key}").as_bytes());
            forgotten += 1;
        }
        runtime.store().apply(batch)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys are ids of at most 40 characters; a call's fingerprint covers method, path and body.
    #[test]
    fn keys_and_fingerprints() {
        assert!(validate_key("0192f1e2-7a3b-7c4d-8e5f-0a1b2c3d4e5f").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(41))
            .unwrap_err()
            .contains("1 to 40"));
        assert!(validate_key("a b").unwrap_err().contains("' '"));
        let one = fingerprint("POST", "/api/v1/payments", b"{}");
        assert_eq!(one, fingerprint("POST", "/api/v1/payments", b"{}"));
        assert_ne!(one, fingerprint("POST", "/api/v1/payments", b"{ }"));
        assert_ne!(one, fingerprint("POST", "/api/v1/accounts", b"{}"));
    }
}
