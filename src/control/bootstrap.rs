//! Bootstrap: open many accounts with opening balances in one go from a CSV
//! file (`id,opening_balance` per line, cents; a header line and blank lines
//! are allowed). Idempotent: opening is idempotent in the account processor,
//! so running it twice opens nothing twice and funds nothing twice.

use std::path::Path;

use crate::model::{now_ms, validate_id, Event};

/// Most accounts one bootstrap file may open.
pub const MAX_BOOTSTRAP_ACCOUNTS: usize = 10_000_000;

/// A line of the file that cannot be used, by number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bootstrap file line {line}: {reason}")]
pub struct BootstrapError {
    pub line: usize,
    pub reason: String,
}

/// Parses the CSV text into open-account events; every line is checked
/// before any account is opened.
pub fn parse(text: &str, max_amount_cents: i64) -> Result<Vec<Event>, BootstrapError> {
    let mut events = Vec::new();
    let at_ms = now_ms();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || (line == 1 && trimmed.starts_with("id,")) {
            continue;
        }
        let error = |reason: String| BootstrapError { line, reason };
        let (id, balance) = trimmed
            .split_once(',')
            .ok_or_else(|| error("expected `id,opening_balance`".into()))?;
        let id = id.trim();
        validate_id(id).map_err(|e| error(format!("account id {e}")))?;
        let balance: i64 = balance.trim().parse().map_err(|_| {
            error(format!(
                "opening balance {:?} is not an integer number of cents",
                balance.trim()
            ))
        })?;
        if !(0..=max_amount_cents).contains(&balance) {
            return Err(error(format!(
                "opening balance must be between 0 and {max_amount_cents}"
            )));
        }
        if events.len() == MAX_BOOTSTRAP_ACCOUNTS {
            return Err(error(format!(
                "more than {MAX_BOOTSTRAP_ACCOUNTS} accounts"
            )));
        }
        events.push(Event::OpenAccount {
            account: id.to_owned(),
            opening_balance_cents: balance,
            at_ms,
        });
    }
    Ok(events)
}

/// Reads and parses a bootstrap file.
pub fn read(path: &Path, max_amount_cents: i64) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read bootstrap file {}: {e}", path.display()))?;
    Ok(parse(&text, max_amount_cents)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Header, blank lines and spaces are fine; each bad line is named by number and nothing is returned.
    #[test]
    fn parses_and_names_bad_lines() {
        let events = parse("id,opening_balance\nalice, 100\n\nbob,0\n", 1_000).unwrap();
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[0], Event::OpenAccount { account, opening_balance_cents: 100, .. } if account == "alice")
        );
        let cases = [
            ("alice\n", 1, "expected"),
            ("a,1\nb b,2\n", 2, "account id"),
            ("a,12.50\n", 1, "not an integer"),
            ("a,-1\n", 1, "between 0"),
            ("a,1001\n", 1, "between 0"),
        ];
        for (text, line, needle) in cases {
            let error = parse(text, 1_000).unwrap_err();
            assert_eq!(error.line, line, "{text:?}");
            assert!(error.reason.contains(needle), "{text:?}: {error}");
        }
    }
}

#[cfg(test)]
mod decoder_fuzz {
    use proptest::prelude::*;

    proptest! {
        // Any CSV text parses or is refused with the line named; it never panics.
        #[test]
        fn arbitrary_csv_never_panics(text in "(\\PC|\\n|,){0,400}") {
            if let Err(error) = super::parse(&text, 1_000_000) {
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}
