//! The `payments` row's decoding. Postcard carries no field names or count,
//! so a field added at the end is missing from rows written before it: they
//! read with it as `None` instead of failing as corrupt.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::PaymentState;
use crate::model::lineage::Lineage;

const FIELDS: &[&str] = &[
    "payment",
    "status",
    "reason",
    "completed_at_ms",
    "lineage",
    "submitted_by",
    "waiting_for",
];

impl<'de> Deserialize<'de> for PaymentState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct("PaymentState", FIELDS, RowVisitor)
    }
}

struct RowVisitor;

fn required<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
    seq: &mut A,
    index: usize,
) -> Result<T, A::Error> {
    seq.next_element()?
        .ok_or_else(|| de::Error::invalid_length(index, &"a payments row"))
}

impl<'de> Visitor<'de> for RowVisitor {
    type Value = PaymentState;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a payments row")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PaymentState, A::Error> {
        Ok(PaymentState {
            payment: required(&mut seq, 0)?,
            status: required(&mut seq, 1)?,
            reason: required(&mut seq, 2)?,
            completed_at_ms: required(&mut seq, 3)?,
            lineage: required::<Lineage, _>(&mut seq, 4)?.0,
            // The end of a row written before attribution: postcard reports
            // it as an error, which here means "absent".
            submitted_by: seq.next_element().unwrap_or(None).flatten(),
            waiting_for: seq.next_element().unwrap_or(None).flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PaymentRef, PaymentStatus, Submitter};
    use serde::Serialize;

    /// The row as it was written before `submitted_by` existed.
    #[derive(Serialize)]
    struct OldRow<'a> {
        payment: &'a PaymentRef,
        status: PaymentStatus,
        reason: Option<crate::model::Reason>,
        completed_at_ms: Option<i64>,
        #[serde(with = "crate::model::lineage")]
        lineage: Vec<crate::model::Hop>,
    }

    fn row(submitted_by: Option<Submitter>) -> PaymentState {
        PaymentState {
            payment: PaymentRef {
                id: "p-1".into(),
                from: "a".into(),
                to: "b".into(),
                amount_cents: 5,
                accepted_at_ms: 7,
            },
            status: PaymentStatus::Confirmed,
            reason: None,
            completed_at_ms: Some(9),
            lineage: vec![],
            submitted_by,
            waiting_for: None,
        }
    }

    // New rows round-trip with and without a submitter; rows written before the field read with None; a cut row is refused.
    #[test]
    fn rows_old_and_new_decode() {
        let by = Submitter {
            principal: "teller#0".into(),
            source: "10.0.0.7:5100".into(),
            tag: None,
        };
        for state in [row(Some(by)), row(None)] {
            let bytes = postcard::to_allocvec(&state).unwrap();
            assert_eq!(postcard::from_bytes::<PaymentState>(&bytes).unwrap(), state);
        }
        let new = row(None);
        let old = postcard::to_allocvec(&OldRow {
            payment: &new.payment,
            status: new.status,
            reason: new.reason,
            completed_at_ms: new.completed_at_ms,
            lineage: vec![],
        })
        .unwrap();
        assert_eq!(postcard::from_bytes::<PaymentState>(&old).unwrap(), new);
        assert!(postcard::from_bytes::<PaymentState>(&old[..old.len() - 2]).is_err());
    }
}
