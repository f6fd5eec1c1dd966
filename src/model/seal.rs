//! The HMAC that authenticates records on the internal topics
//! (`payment.inflight`, `payment.complete`, `control.commands`) when a
//! cluster secret is set: HMAC-SHA256 over the record's key and value,
//! appended to the value as its last [`TAG_BYTES`] bytes. Whoever may write
//! to the topics but lacks the secret cannot make a record kpay applies.
//!
//! The tag is a suffix rather than a field of the envelope so that the
//! codec and the event layout stay as they are; postcard ignores trailing
//! bytes, so a kpay without a secret reads signed records unchanged.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of the tag at the end of a signed value.
pub const TAG_BYTES: usize = 32;

/// Why a record's tag did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the value ({0} bytes) is too short to carry an HMAC tag")]
    Missing(usize),
    #[error("the HMAC tag does not match key and value (not signed with this cluster's secret)")]
    Mismatch,
}

/// Signs and checks records with the cluster's secret. Keyed once: each use
/// clones the keyed state, which costs no key setup.
#[derive(Clone)]
pub struct Sealer {
    keyed: Hmac<Sha256>,
}

impl Sealer {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            keyed: Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"),
        }
    }

    /// The MAC state after key and value. The key's length goes first, so
    /// that no other split of the same bytes into key and value verifies.
    fn mac(&self, key: &[u8], value: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(&(key.len() as u64).to_le_bytes());
        mac.update(key);
        mac.update(value);
        mac
    }

    /// Appends the tag of (`key`, `value`) to `value`.
    pub fn seal(&self, key: &[u8], value: &mut Vec<u8>) {
        let tag = self.mac(key, value).finalize().into_bytes();
        value.extend_from_slice(&tag);
    }

    /// The value without its tag, if the tag is right (compared in constant time).
    pub fn open<'a>(&self, key: &[u8], sealed: &'a [u8]) -> Result<&'a [u8], SealError> {
        let split = sealed
            .len()
            .checked_sub(TAG_BYTES)
            .ok_or(SealError::Missing(sealed.len()))?;
        let (value, tag) = sealed.split_at(split);
        self.mac(key, value)
            .verify_slice(tag)
            .map_err(|_| SealError::Mismatch)?;
        Ok(value)
    }
}

impl fmt::Debug for Sealer {
    // The keyed state is as good as the secret: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(<secret hidden>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A sealed value opens with the same secret and key only; any changed byte, a moved key/value boundary or a missing tag is refused.
    #[test]
    fn only_the_sealed_key_and_value_open() {
        let sealer = Sealer::new(b"a-secret-of-sixteen-plus");
        let mut value = b"\x02debit of 500".to_vec();
        sealer.seal(b"alice", &mut value);
        assert_eq!(value.len(), 13 + TAG_BYTES);
        assert_eq!(sealer.open(b"alice", &value).unwrap(), b"\x02debit of 500");
        assert_eq!(sealer.open(b"bob", &value), Err(SealError::Mismatch));
        let other = Sealer::new(b"another-secret-entirely");
        assert_eq!(other.open(b"alice", &value), Err(SealError::Mismatch));
        for at in [0, 5, value.len() - 1] {
            let mut changed = value.clone();
            changed[at] ^= 1;
            assert_eq!(sealer.open(b"alice", &changed), Err(SealError::Mismatch));
        }
        let mut shifted = b"e\x02debit of 500".to_vec();
        sealer.seal(b"alic", &mut shifted);
        assert_eq!(
            sealer.open(b"alice", &shifted[1..]),
            Err(SealError::Mismatch)
        );
        assert_eq!(sealer.open(b"alice", b"short"), Err(SealError::Missing(5)));
        assert!(!format!("{sealer:?}").contains("secret-of"));
    }
}
