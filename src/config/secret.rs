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
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    // Serde's own "invalid type" errors quote the value, and the settings
    // parse `KPAY_CLUSTER__SECRET=1234…` as a number: this says what is
    // wrong without the value.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret as text")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secret, E> {
                Ok(Secret::new(text))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom(NOT_TEXT))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// Why a secret that is not text is refused (without repeating it).
const NOT_TEXT: &str = "the secret must be text, not a number or a boolean \
     (in the environment, mix in letters)";

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

    // A secret that parses as a number is refused without the error repeating it.
    #[test]
    fn a_numeric_secret_is_refused_without_printing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kpay.toml");
        std::fs::write(&path, "[cluster]\nsecret = 98765432109876543\n").unwrap();
        let error = crate::config::Config::load(Some(&path), &Default::default()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("must be text"), "{text}");
        assert!(!text.contains("98765432109876543"), "{text}");
        std::fs::write(&path, "[cluster]\nsecret = \"short\"\n").unwrap();
        let error = crate::config::Config::load(Some(&path), &Default::default()).unwrap_err();
        assert!(error.to_string().contains("cluster.secret"), "{error}");
    }
}
