//! Screening rules: what the screening step (in the account processor,
//! before the debit) refuses, holds for review or makes wait. They are an
//! operator's setting, changed by a command through `control.commands` and
//! handed to every account partition in its own input order, so that a
//! replay of the log screens every payment under the rules it met.

use serde::{Deserialize, Serialize};

use super::validate_id;

/// Most accounts on the blocked list.
pub const MAX_BLOCKED_ACCOUNTS: usize = 1_000;
/// Largest velocity count: a payer's row keeps this many acceptance times.
pub const MAX_VELOCITY_PAYMENTS: u32 = 1_000;
/// Longest velocity window.
pub const MAX_VELOCITY_WINDOW_SECONDS: u32 = 86_400;

/// At most `max_payments` admitted from one payer within `window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Velocity {
    /// Payments admitted per payer within the window (1–1,000).
    #[schema(example = 5, minimum = 1, maximum = 1000)]
    pub max_payments: u32,
    /// The window, by the payments' acceptance times (1–86,400 s).
    #[schema(example = 60, minimum = 1, maximum = 86400)]
    pub window_seconds: u32,
}

/// The screening rules in force; `None` (JSON `null`) turns a rule off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScreeningRules {
    /// Payments above this many cents are rejected (`limit_exceeded`).
    #[schema(example = 50000, minimum = 1)]
    pub max_amount: Option<i64>,
    /// Payments above this many cents are held for review (`held`).
    #[schema(example = 20000, minimum = 1)]
    pub review_above: Option<i64>,
    /// More payments than this from one payer within the window are
    /// rejected (`velocity`).
    pub velocity: Option<Velocity>,
    /// Payments from or to these accounts are rejected (`blocked`).
    #[schema(example = json!(["acct-x"]))]
    pub blocked_accounts: Option<Vec<String>>,
    /// A payment waits until its payer's previous payment is terminal
    /// before its own debit is sent.
    pub single_inflight_debit: Option<bool>,
}

impl ScreeningRules {
    /// Whether any rule is on (with none, payments pass unscreened).
    pub fn any(&self) -> bool {
        self.max_amount.is_some()
            || self.review_above.is_some()
            || self.velocity.is_some()
            || self
                .blocked_accounts
                .as_ref()
                .is_some_and(|b| !b.is_empty())
            || self.single_inflight_debit == Some(true)
    }

    /// Whether payments wait for their payer's previous one.
    pub fn single_inflight(&self) -> bool {
        self.single_inflight_debit == Some(true)
    }

    /// Whether `account` is on the blocked list.
    pub fn blocks(&self, account: &str) -> bool {
        (self.blocked_accounts.as_ref()).is_some_and(|list| list.iter().any(|a| a == account))
    }

    /// Checks every bound, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("max_amount", self.max_amount),
            ("review_above", self.review_above),
        ] {
            if let Some(cents) = value.filter(|c| *c <= 0) {
                return Err(format!(
                    "{field} must be a positive number of cents, got {cents}"
                ));
            }
        }
        if let Some(velocity) = self.velocity {
            if !(1..=MAX_VELOCITY_PAYMENTS).contains(&velocity.max_payments) {
                return Err(format!(
                    "velocity.max_payments must be 1 to {MAX_VELOCITY_PAYMENTS}, got {}",
                    velocity.max_payments
                ));
            }
            if !(1..=MAX_VELOCITY_WINDOW_SECONDS).contains(&velocity.window_seconds) {
                return Err(format!(
                    "velocity.window_seconds must be 1 to {MAX_VELOCITY_WINDOW_SECONDS}, got {}",
                    velocity.window_seconds
                ));
            }
        }
        if let Some(blocked) = &self.blocked_accounts {
            if blocked.len() > MAX_BLOCKED_ACCOUNTS {
                return Err(format!(
                    "blocked_accounts holds at most {MAX_BLOCKED_ACCOUNTS} accounts, got {}",
                    blocked.len()
                ));
            }
            for account in blocked {
                validate_id(account)
                    .map_err(|e| format!("blocked_accounts: account id {account:?} {e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Off by default; each bound names its field; a valid set passes.
    #[test]
    fn rules_are_validated_field_by_field() {
        assert!(!ScreeningRules::default().any());
        let good = ScreeningRules {
            max_amount: Some(50_000),
            review_above: Some(20_000),
            velocity: Some(Velocity {
                max_payments: 5,
                window_seconds: 60,
            }),
            blocked_accounts: Some(vec!["acct-x".into()]),
            single_inflight_debit: Some(false),
        };
        assert!(good.any() && good.blocks("acct-x") && !good.blocks("acct-y"));
        assert_eq!(good.validate(), Ok(()));
        let cases = [
            (
                ScreeningRules {
                    max_amount: Some(0),
                    ..good.clone()
                },
                "max_amount",
            ),
            (
                ScreeningRules {
                    review_above: Some(-1),
                    ..good.clone()
                },
                "review_above",
            ),
            (
                ScreeningRules {
                    velocity: Some(Velocity {
                        max_payments: 0,
                        window_seconds: 1,
                    }),
                    ..good.clone()
                },
                "velocity.max_payments",
            ),
            (
                ScreeningRules {
                    velocity: Some(Velocity {
                        max_payments: 1,
                        window_seconds: 90_000,
                    }),
                    ..good.clone()
                },
                "velocity.window_seconds",
            ),
            (
                ScreeningRules {
                    blocked_accounts: Some(vec!["a b".into()]),
                    ..good.clone()
                },
                "blocked_accounts",
            ),
        ];
        for (rules, field) in cases {
            let error = rules.validate().unwrap_err();
            assert!(error.starts_with(field), "{field}: {error}");
        }
    }
}
