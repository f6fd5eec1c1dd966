//! Bearer tokens and their roles, parsed once when the settings load
//! (`tokens = "token:role,token:role"`, usually from `KPAY_TOKENS`). The
//! HTTP layer only matches presented tokens against this list.
//!
//! A token may be given by its SHA-256 instead (`sha256:<64 hex digits>:role`),
//! so that a config file or an environment dump does not reveal it: the
//! presented token is hashed and compared with the hash.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Roles, each allowed what the one before it is, and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads (when reads are protected).
    Viewer,
    /// Accounts and payments.
    Teller,
    /// Everything, including control.
    Operator,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "teller" => Some(Self::Teller),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Teller => "teller",
            Self::Operator => "operator",
        }
    }
}

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_CHARS: usize = 8;

/// How a token is configured: as itself, or as the SHA-256 of it.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    Plain(Vec<u8>),
    Sha256([u8; 32]),
}

/// The prefix of a token given as its hash.
const SHA256: &str = "sha256:";

impl Secret {
    fn parse(text: &str) -> Result<Self, String> {
        let Some(digits) = text.strip_prefix(SHA256) else {
            if text.len() < MIN_TOKEN_CHARS {
                return Err(format!(
                    "tokens must be at least {MIN_TOKEN_CHARS} characters long"
                ));
            }
            return Ok(Self::Plain(text.as_bytes().to_vec()));
        };
        let refused = || "a sha256: token needs 64 hex digits (the SHA-256 of the token)";
        if digits.len() != 64 || !digits.is_ascii() {
            return Err(refused().into());
        }
        let mut hash = [0; 32];
        for (byte, pair) in hash.iter_mut().zip(digits.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| refused())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| refused())?;
        }
        Ok(Self::Sha256(hash))
    }

    /// Whether `presented` (with its hash) is this token, in constant time.
    fn matches(&self, presented: &[u8], hash: &[u8; 32]) -> bool {
        match self {
            Self::Plain(token) => token.as_slice().ct_eq(presented).into(),
            Self::Sha256(want) => want.ct_eq(hash).into(),
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Plain(token) => String::from_utf8_lossy(token).into_owned(),
            Self::Sha256(hash) => {
                let digits: String = hash.iter().map(|b| format!("{b:02x}")).collect();
                format!("{SHA256}{digits}")
            }
        }
    }
}

/// The configured tokens. Empty: protected mode (loopback only).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tokens {
    entries: Vec<(Secret, Role)>,
}

impl Tokens {
    /// Parses `token:role,token:role`; names what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (token, role) = item.rsplit_once(':').ok_or_else(|| {
                format!(
                    "token entry {:?}... has no `:role`",
                    &item[..item.len().min(3)]
                )
            })?;
            let role = Role::parse(role)
                .ok_or_else(|| format!("role {role:?} is not one of operator, teller, viewer"))?;
            entries.push((Secret::parse(token)?, role));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role and position of `presented`, comparing against every
    /// configured token in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<(usize, Role)> {
        // Hashed only when some token is configured as a hash: a plain
        // list costs no more than before.
        let hashed = self
            .entries
            .iter()
            .any(|(s, _)| matches!(s, Secret::Sha256(_)));
        let hash: [u8; 32] = if hashed {
            Sha256::digest(presented).into()
        } else {
            [0; 32]
        };
        let mut found = None;
        for (index, (secret, role)) in self.entries.iter().enumerate() {
            if secret.matches(presented, &hash) {
                found = Some((index, *role));
            }
        }
        found
    }
}

impl TryFrom<String> for Tokens {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<Tokens> for String {
    fn from(tokens: Tokens) -> String {
        let items: Vec<String> = tokens
            .entries
            .iter()
            .map(|(secret, role)| format!("{}:{}", secret.text(), role.as_str()))
            .collect();
        items.join(",")
    }
}

/// Never prints a token: settings are logged and shown in errors.
impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<&str> = self.entries.iter().map(|(_, role)| role.as_str()).collect();
        f.debug_struct("Tokens").field("roles", &roles).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Token lists parse with roles, refuse bad entries by reason, and match only exact tokens.
    #[test]
    fn tokens_parse_and_match() {
        let tokens = Tokens::parse("s3cret-op:operator, t3ller-1:teller").unwrap();
        assert_eq!(tokens.find(b"s3cret-op"), Some((0, Role::Operator)));
        assert_eq!(tokens.find(b"t3ller-1"), Some((1, Role::Teller)));
        assert_eq!(tokens.find(b"t3ller-"), None);
        assert_eq!(tokens.find(b""), None);
        assert!(Tokens::parse("nocolon").unwrap_err().contains("no `:role`"));
        assert!(Tokens::parse("longenough:boss")
            .unwrap_err()
            .contains("not one of"));
        assert!(Tokens::parse("short:viewer")
            .unwrap_err()
            .contains("8 characters"));
        assert!(Tokens::parse("").unwrap().is_empty());
    }

    // A token given as its SHA-256 matches the token, not the hash, and bad hashes are refused.
    #[test]
    fn hashed_tokens_match_the_token_they_hash() {
        let digits: String = Sha256::digest(b"s3cret-op")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = format!("sha256:{digits}:operator,t3ller-1:teller");
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.find(b"s3cret-op"), Some((0, Role::Operator)));
        assert_eq!(tokens.find(digits.as_bytes()), None);
        assert_eq!(tokens.find(b"t3ller-1"), Some((1, Role::Teller)));
        assert_eq!(String::from(tokens), text);
        assert!(Tokens::parse("sha256:abcd:viewer")
            .unwrap_err()
            .contains("64 hex digits"));
        let bad = format!("sha256:{}:viewer", "zz".repeat(32));
        assert!(Tokens::parse(&bad).unwrap_err().contains("64 hex digits"));
    }

    // The list goes back to its text unchanged, and its Debug form shows roles, never tokens.
    #[test]
    fn tokens_round_trip_and_never_print() {
        let text = "s3cret-op:operator,t3ller-1:teller";
        let tokens = Tokens::parse(text).unwrap();
        assert_eq!(String::from(tokens.clone()), text);
        let shown = format!("{tokens:?}");
        assert!(
            shown.contains("operator") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
