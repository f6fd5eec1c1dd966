//! Bearer tokens and their roles, parsed once when the settings load
//! (`tokens = "token:role,token:role"`, usually from `KPAY_TOKENS`). The
//! HTTP layer only matches presented tokens against this list.

use std::fmt;

use serde::{Deserialize, Serialize};
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

/// The configured tokens. Empty: protected mode (loopback only).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tokens {
    entries: Vec<(Vec<u8>, Role)>,
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
            if token.len() < MIN_TOKEN_CHARS {
                return Err(format!(
                    "tokens must be at least {MIN_TOKEN_CHARS} characters long"
                ));
            }
            entries.push((token.as_bytes().to_vec(), role));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role and position of `presented`, comparing against every
    /// configured token in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<(usize, Role)> {
        let mut found = None;
        for (index, (token, role)) in self.entries.iter().enumerate() {
            if bool::from(token.as_slice().ct_eq(presented)) {
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
            .map(|(token, role)| format!("{}:{}", String::from_utf8_lossy(token), role.as_str()))
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
