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

use super::{PaymentRef, Submitter};

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

impl Sealer {
    /// The MAC of a payment's attribution, bound to the payment: the same
    /// principal and source on another payment do not verify.
    fn attribution_mac(&self, payment: &PaymentRef, by: &Submitter) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        for part in [
            &payment.id,
            &payment.from,
            &payment.to,
            &by.principal,
            &by.source,
        ] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.update(&payment.amount_cents.to_le_bytes());
        mac.update(&payment.accepted_at_ms.to_le_bytes());
        mac
    }

    /// The hex tag kpay's intake writes into a payment's `submitted_by`.
    pub fn attribution_tag(&self, payment: &PaymentRef, by: &Submitter) -> String {
        let tag = self.attribution_mac(payment, by).finalize().into_bytes();
        tag.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Whether `by` carries the tag of this secret for this payment.
    pub fn attribution_holds(&self, payment: &PaymentRef, by: &Submitter) -> bool {
        let Some(tag) = by.tag.as_deref().and_then(from_hex) else {
            return false;
        };
        self.attribution_mac(payment, by).verify_slice(&tag).is_ok()
    }
}

/// Bytes from lowercase or uppercase hex; `None` for anything else.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
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

    // An attribution verifies for its own payment and signer only: another principal, another payment, another secret or a missing tag does not.
    #[test]
    fn attributions_are_bound_to_their_payment() {
        let sealer = Sealer::new(b"a-secret-of-sixteen-plus");
        let payment = PaymentRef {
            id: "p-1".into(),
            from: "a".into(),
            to: "b".into(),
            amount_cents: 500,
            accepted_at_ms: 1_700_000_000_000,
        };
        let mut by = Submitter {
            principal: "teller#0".into(),
            source: "10.0.0.7:5100".into(),
            tag: None,
        };
        assert!(!sealer.attribution_holds(&payment, &by));
        by.tag = Some(sealer.attribution_tag(&payment, &by));
        assert_eq!(by.tag.as_ref().unwrap().len(), 2 * TAG_BYTES);
        assert!(sealer.attribution_holds(&payment, &by));
        let other = Sealer::new(b"another-secret-entirely");
        assert!(!other.attribution_holds(&payment, &by));
        let larger = PaymentRef {
            amount_cents: 501,
            ..payment.clone()
        };
        assert!(!sealer.attribution_holds(&larger, &by));
        let someone_else = Submitter {
            principal: "operator#0".into(),
            ..by.clone()
        };
        assert!(!sealer.attribution_holds(&payment, &someone_else));
        let garbled = Submitter {
            tag: Some("zz".repeat(32)),
            ..by
        };
        assert!(!sealer.attribution_holds(&payment, &garbled));
    }
}
