//! Bytes ⇄ events. Plain sync functions; the runtime routes failures to the DLQ.
//!
//! Internal format: one schema-version byte, the postcard encoding of
//! [`Envelope`], then that of who submitted it (an `Option`: kpay's intake
//! writes submitted payments in this format too, a third the size of the
//! JSON). Public formats are JSON: a payment on `payment.incoming`
//! (`{"id","from","to","amount"}`, which any Kafka client may write; a value
//! starting with `{` is read as one) and a completion on `payment.confirmed`.
//! A reader accepts the versions it knows and refuses the rest by name.
//! Postcard ignores trailing bytes, so a newer writer may append optional
//! fields under a new version without breaking the layout of the old ones.

use serde::{Deserialize, Serialize};

use super::{Envelope, Event, PaymentRef, Submitter};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u8 = 4;

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

/// Who submitted a payment, as the binary format carries it.
#[derive(Serialize, Deserialize)]
struct WireSubmitter<'a> {
    principal: std::borrow::Cow<'a, str>,
    source: std::borrow::Cow<'a, str>,
    tag: Option<std::borrow::Cow<'a, str>>,
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(SCHEMA_VERSION);
    let by = envelope.submitted_by.as_ref().map(|by| WireSubmitter {
        principal: by.principal.as_str().into(),
        source: by.source.as_str().into(),
        tag: by.tag.as_deref().map(Into::into),
    });
    // Serializing plain structs into a Vec cannot fail.
    postcard::to_io(envelope, &mut out).expect("postcard into a Vec is infallible");
    postcard::to_io(&by, &mut out).expect("postcard into a Vec is infallible");
    out
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if version == b'{' {
        return decode_json_payment(bytes);
    }
    if version != SCHEMA_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let malformed = |error: postcard::Error| DecodeError::Malformed(error.to_string());
    let (mut envelope, rest) = postcard::take_from_bytes::<Envelope>(body).map_err(malformed)?;
    let (by, _) = postcard::take_from_bytes::<Option<WireSubmitter>>(rest).map_err(malformed)?;
    envelope.submitted_by = by.map(|by| Submitter {
        principal: by.principal.into_owned(),
        source: by.source.into_owned(),
        tag: by.tag.map(|tag| tag.into_owned()),
    });
    Ok(envelope)
}

/// A payment as JSON, the public format of `payment.incoming` (what any
/// Kafka client may write): `{"id","from","to","amount"}`, amount in cents,
/// optional `accepted_at` (ms since the epoch; the record's time otherwise)
/// and optional `submitted_by` (`{"principal","source"}`, and with a cluster
/// secret the `tag` that kpay's own intake signs it with).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPayment {
    id: String,
    from: String,
    to: String,
    amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accepted_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    submitted_by: Option<JsonSubmitter>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSubmitter {
    principal: String,
    source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// A terminal payment as JSON, the public format of `payment.confirmed`.
#[derive(Debug, Serialize)]
struct JsonCompleted<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    amount: i64,
    status: &'a str,
    reason: Option<&'a str>,
    accepted_at: i64,
    completed_at: i64,
}

fn decode_json_payment(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let payment: JsonPayment = serde_json::from_slice(bytes)
        .map_err(|error| DecodeError::Malformed(format!("JSON payment: {error}")))?;
    let submitted = Event::PaymentSubmitted(PaymentRef {
        id: payment.id,
        from: payment.from,
        to: payment.to,
        amount_cents: payment.amount,
        // 0: the inflight processor takes the record's time.
        accepted_at_ms: payment.accepted_at.unwrap_or(0),
    });
    let mut envelope = Envelope::new(None, submitted);
    envelope.submitted_by = payment.submitted_by.map(|by| Submitter {
        principal: by.principal,
        source: by.source,
        tag: by.tag,
    });
    Ok(envelope)
}

/// A completion in the public JSON format of `payment.confirmed`; `None`
/// for any other event.
pub fn encode_completed_json(event: &Event) -> Option<Vec<u8>> {
    let Event::Completed {
        payment,
        outcome,
        completed_at_ms,
        ..
    } = event
    else {
        return None;
    };
    let json = JsonCompleted {
        id: &payment.id,
        from: &payment.from,
        to: &payment.to,
        amount: payment.amount_cents,
        status: outcome.status().as_str(),
        reason: outcome.reason().map(|r| r.as_str()),
        accepted_at: payment.accepted_at_ms,
        completed_at: *completed_at_ms,
    };
    Some(serde_json::to_vec(&json).expect("plain struct serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    /// A payment in the public JSON format, as any Kafka client may write it.
    fn encode_payment_json(payment: &PaymentRef, submitted_by: Option<&Submitter>) -> Vec<u8> {
        serde_json::to_vec(&JsonPayment {
            id: payment.id.clone(),
            from: payment.from.clone(),
            to: payment.to.clone(),
            amount: payment.amount_cents,
            accepted_at: Some(payment.accepted_at_ms),
            submitted_by: submitted_by.map(|by| JsonSubmitter {
                principal: by.principal.clone(),
                source: by.source.clone(),
                tag: by.tag.clone(),
            }),
        })
        .expect("plain struct serializes")
    }

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
            let envelope = Envelope::new(Some(Source { topic: SourceTopic::Inflight, partition, offset }), event);
            prop_assert_eq!(decode(&encode(&envelope)).unwrap(), envelope);
        }

        // A submitted payment keeps who submitted it, tag included; bytes after it (a seal) are ignored.
        #[test]
        fn submitter_round_trips(payment in arb_payment(), principal in "\\PC{0,12}", source in "\\PC{0,24}", tag in proptest::option::of("[0-9a-f]{64}"), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut envelope = Envelope::new(None, Event::PaymentSubmitted(payment));
            envelope.submitted_by = Some(Submitter { principal, source, tag });
            let mut bytes = encode(&envelope);
            prop_assert_eq!(decode(&bytes).unwrap(), envelope.clone());
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(decode(&bytes).unwrap(), envelope);
        }
    }

    // The public JSON payment decodes (any Kafka client may write it); our own JSON round-trips; bad JSON is refused by name.
    #[test]
    fn json_payments_decode() {
        let foreign = br#"{"id":"o-1","from":"a","to":"b","amount":1250}"#;
        let envelope = decode(foreign).unwrap();
        let Event::PaymentSubmitted(payment) = envelope.event else {
            panic!("not a payment");
        };
        assert_eq!((payment.amount_cents, payment.accepted_at_ms), (1250, 0));
        assert!(envelope.source.is_none());
        let ours = PaymentRef {
            accepted_at_ms: 77,
            ..payment
        };
        let back = decode(&encode_payment_json(&ours, None)).unwrap();
        assert_eq!(back.event, Event::PaymentSubmitted(ours.clone()));
        assert_eq!(back.submitted_by, None);
        let by = Submitter {
            principal: "teller#0".into(),
            source: "10.0.0.7:5100".into(),
            tag: Some("ab".repeat(32)),
        };
        let back = decode(&encode_payment_json(&ours, Some(&by))).unwrap();
        assert_eq!(back.submitted_by, Some(by));
        let claimed = br#"{"id":"o-1","from":"a","to":"b","amount":1,"submitted_by":{"principal":"p","source":"s"}}"#;
        assert_eq!(decode(claimed).unwrap().submitted_by.unwrap().tag, None);
        for bad in [
            &br#"{"id":"o-1","from":"a","to":"b","amount":12.5}"#[..],
            br#"{"id":"o-1","from":"a","to":"b","amount":1,"extra":1}"#,
            br#"{"id":"o-1"}"#,
            b"{not json",
            br#"{"id":"o-1","from":"a","to":"b","amount":1,"submitted_by":{"principal":"p"}}"#,
        ] {
            let error = decode(bad).unwrap_err().to_string();
            assert!(error.contains("JSON payment"), "{error}");
        }
    }

    // Completions go to payment.confirmed as documented JSON.
    #[test]
    fn completions_encode_as_json() {
        let event = Event::Completed {
            payment: PaymentRef {
                id: "p".into(),
                from: "a".into(),
                to: "b".into(),
                amount_cents: 5,
                accepted_at_ms: 1,
            },
            outcome: Outcome::Reversed(Reason::UnknownAccount),
            completed_at_ms: 9,
            lineage: vec![],
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode_completed_json(&event).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "p", "from": "a", "to": "b", "amount": 5,
                "status": "reversed", "reason": "unknown_account",
                "accepted_at": 1, "completed_at": 9})
        );
        assert!(encode_completed_json(&Event::CloseAccount {
            account: "a".into(),
            at_ms: 0
        })
        .is_none());
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

/// Bytes from outside the process (`cargo test decoder_fuzz` runs every decoder's).
#[cfg(test)]
mod decoder_fuzz {
    use super::decode;
    use proptest::prelude::*;

    proptest! {
        // Arbitrary bytes never panic the decoder; they give an error or an event.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        // Bytes that start like JSON take the JSON path: error or payment, no panic.
        #[test]
        fn arbitrary_json_like_bytes_do_not_panic(text in "\\{(\\PC){0,200}") {
            let _ = decode(text.as_bytes());
        }
    }
}
