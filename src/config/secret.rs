//! The cluster secret (`cluster.secret`, usually from `KPAY_CLUSTER__SECRET`):
//! the key of the HMAC every kpay sharing the topics puts on the internal
//! records. It is a secret, so nothing here ever prints it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Shortest secret accepted: a short key is guessable offline from one
/// signed record, so it would protect nothing.
pub const MIN_SECRET_CHARS: usize = 16;

/// A secret string. Empty: no secret (internal records are neither signed
/// nor checked).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The secret's bytes, for the one place that keys the HMAC with them.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub(super) fn chars(&self) -> usize {
        self.0.chars().count()
    }
}

impl fmt::Debug for Secret {
    // The settings are logged and shown in errors: the secret must not be.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(none)")
        } else {
            f.write_str("Secret(<hidden>)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Debug never shows the secret's text, only whether there is one.
    #[test]
    fn debug_hides_the_secret() {
        let secret = Secret::new("correct-horse-battery-staple");
        let shown = format!("{secret:?} {:?}", Some(&secret));
        assert!(!shown.contains("horse"), "{shown}");
        assert!(shown.contains("hidden"), "{shown}");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(none)");
    }
}
