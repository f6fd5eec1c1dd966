//! Bytes ⇄ events. Plain sync functions; the runtime routes failures to the DLQ.
//!
//! Format: one schema-version byte, then the postcard encoding of [`Envelope`].
//! A reader accepts the versions it knows and refuses the rest by name.
//! Postcard ignores trailing bytes, so a newer writer may append optional
//! fields under a new version without breaking the layout of the old ones.

use super::Envelope;

/// The schema version this build writes.
pub const SCHEMA_VERSION: u8 = 2;

/// Largest encoded event accepted; anything bigger is refused, not allocated.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Why bytes did not decode to an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty record value")]
    Empty,
    #[error("record of {0} bytes is above the {MAX_EVENT_BYTES}-byte event limit")]
    TooLarge(usize),
    #[error("unknown schema version {0} (this build reads version {SCHEMA_VERSION})")]
    UnknownVersion(u8),
    #[error("malformed event: {0}")]
    Malformed(String),
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(SCHEMA_VERSION);
    // Serializing plain structs into a Vec cannot fail.
    postcard::to_io(envelope, &mut out).expect("postcard into a Vec is infallible");
    out
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if version != SCHEMA_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    postcard::from_bytes(body).map_err(|error| DecodeError::Malformed(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    fn arb_payment() -> impl Strategy<Value = PaymentRef> {
        (
            "[a-z0-9]{1,64}",
            "[a-z]{1,8}",
            "[a-z]{1,8}",
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(|(id, from, to, amount_cents, accepted_at_ms)| PaymentRef {
                id,
                from,
                to,
                amount_cents,
                accepted_at_ms,
            })
    }

    fn arb_hop() -> impl Strategy<Value = Hop> {
        (0u32..64, any::<u64>(), any::<i64>(), any::<i64>()).prop_map(
            |(partition, offset, at_ms, received_at_ms)| Hop {
                stage: Stage::Debited,
                partition,
                offset,
                at_ms,
                received_at_ms,
            },
        )
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let reason = prop_oneof![
            Just(Reason::InsufficientFunds),
            Just(Reason::UnknownAccount),
            Just(Reason::AccountClosed),
        ];
        prop_oneof![
            arb_payment().prop_map(Event::PaymentSubmitted),
            ("[a-z]{1,8}", any::<i64>(), any::<i64>()).prop_map(|(account, b, at_ms)| {
                Event::OpenAccount {
                    account,
                    opening_balance_cents: b,
                    at_ms,
                }
            }),
            (arb_payment(), proptest::collection::vec(arb_hop(), 0..5))
                .prop_map(|(payment, lineage)| Event::Debit { payment, lineage }),
            (
                arb_payment(),
                reason,
                proptest::collection::vec(arb_hop(), 0..5)
            )
                .prop_map(|(payment, reason, lineage)| Event::Completed {
                    payment,
                    outcome: Outcome::Reversed(reason),
                    completed_at_ms: 7,
                    lineage,
                }),
        ]
    }

    proptest! {
        // Every event survives encode → decode unchanged.
        #[test]
        fn round_trip(event in arb_event(), offset in any::<u64>(), partition in 0u32..64) {
            let envelope = Envelope {
                source: Some(Source { topic: SourceTopic::Inflight, partition, offset }),
                event,
            };
            prop_assert_eq!(decode(&encode(&envelope)).unwrap(), envelope);
        }

        // Arbitrary bytes never panic the decoder; they give an error or an event.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }

    // Unknown versions and empty values are refused by name, not misread.
    #[test]
    fn unknown_version_is_refused() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[9, 0, 0]), Err(DecodeError::UnknownVersion(9)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::UnknownVersion(1)));
        assert!(matches!(
            decode(&[SCHEMA_VERSION, 200]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
