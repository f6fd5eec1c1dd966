//! The domain: money, identifiers, payments and the events that flow between
//! processors. Events are the API between processors; HTTP types live in `http`.

pub mod codec;
pub mod events;
pub mod lineage;
pub mod rules;
pub mod seal;

pub use events::*;
pub use rules::{ScreeningRules, Velocity};

use serde::{Deserialize, Serialize};

/// Longest account or payment identifier accepted.
pub const ID_MAX_CHARS: usize = 64;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long, the limit is {ID_MAX_CHARS}")]
    TooLong(usize),
    #[error("contains {0:?}; allowed are letters, digits and _ . : -")]
    BadChar(char),
}

/// Checks an account or payment id: 1–64 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > ID_MAX_CHARS {
        return Err(IdError::TooLong(id.chars().count()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

/// A new payment id when the client gives none: UUID v7, so ids sort by time.
pub fn new_payment_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Stable partition of a key: FNV-1a 64 of its bytes, modulo the partition count.
/// Stable across versions and processes, because records already in the log
/// were placed with it.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions)) as u32
}

/// How many payments and how much money they carry (an API shape shared by
/// the planes' views: money in flight, for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CountAmount {
    pub count: u64,
    /// Cents.
    pub amount: i64,
}

/// Milliseconds since the Unix epoch, the one clock every event carries.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Terminal and non-terminal states of a payment, one word each everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Durable in `payment.incoming`, not yet admitted by the inflight processor.
    Accepted,
    /// Admitted: debit and credit under way.
    Inflight,
    /// Money moved from `from` to `to`.
    Confirmed,
    /// Refused before any money moved (see the reason).
    Rejected,
    /// Debited, the credit failed, the debit was refunded.
    Reversed,
    /// Held by screening for an operator's review (approve or decline).
    Held,
}

impl PaymentStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Rejected | Self::Reversed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Inflight => "inflight",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Reversed => "reversed",
            Self::Held => "held",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Accepted,
            Self::Inflight,
            Self::Confirmed,
            Self::Rejected,
            Self::Reversed,
            Self::Held,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }
}

/// Why a payment was rejected or reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The `from` account holds less than the amount.
    InsufficientFunds,
    /// The account (from for a rejection, to for a reversal) does not exist.
    UnknownAccount,
    /// The account exists but is closed.
    AccountClosed,
    /// The payment itself is invalid (amount ≤ 0, from = to, bad id).
    Invalid,
    /// Crediting would overflow the receiving balance.
    BalanceOverflow,
    /// Above the screening rules' `max_amount`.
    LimitExceeded,
    /// From or to an account on the screening rules' blocked list.
    Blocked,
    /// More payments from the payer within the window than the rules allow.
    Velocity,
    /// Held for review and declined by an operator.
    Declined,
    /// More payments of the payer waiting for their turn than kept
    /// (`screening::MAX_WAITING_PER_PAYER`).
    QueueFull,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "insufficient_funds",
            Self::UnknownAccount => "unknown_account",
            Self::AccountClosed => "account_closed",
            Self::Invalid => "invalid",
            Self::BalanceOverflow => "balance_overflow",
            Self::LimitExceeded => "limit_exceeded",
            Self::Blocked => "blocked",
            Self::Velocity => "velocity",
            Self::Declined => "declined",
            Self::QueueFull => "queue_full",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ids follow the documented alphabet and length, and say what is wrong.
    #[test]
    fn ids_are_validated() {
        assert!(validate_id("acc-1_x.y:z").is_ok());
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(&"a".repeat(65)), Err(IdError::TooLong(65)));
        assert!(validate_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_id("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(validate_id("é"), Err(IdError::BadChar('é')));
    }

    // The partitioner is stable: these values are part of the on-disk format.
    #[test]
    fn partitioning_is_stable() {
        assert_eq!(partition_for("acct-1", 8), partition_for("acct-1", 8));
        let spread: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_for(&format!("acct-{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(partition_for("", 8), (0xcbf2_9ce4_8422_2325u64 % 8) as u32);
    }
}
