//! A lineage's binary form, used by log records and state rows (postcard),
//! never by JSON: each hop is (stage, partition, offset, time out, time in)
//! with its time out as the change from the previous hop's (the first hop's
//! from 0) and its time in as the change from its own time out. Postcard
//! writes signed integers as zigzag varints, so a hop a few milliseconds
//! after the previous one takes 7 or 8 bytes instead of about 18 with the
//! absolute times. Differences wrap, so every `i64` round-trips.
//!
//! Use as `#[serde(with = "crate::model::lineage")]` on a `Vec<Hop>` field.

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use super::{Hop, Stage};

/// One hop as written: (stage, partition, offset, Δ time out, Δ time in).
type Packed = (Stage, u32, u64, i64, i64);

pub fn serialize<S: Serializer>(hops: &[Hop], serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        return hops.serialize(serializer);
    }
    let mut seq = serializer.serialize_seq(Some(hops.len()))?;
    let mut previous = 0i64;
    for hop in hops {
        let packed: Packed = (
            hop.stage,
            hop.partition,
            hop.offset,
            hop.at_ms.wrapping_sub(previous),
            hop.received_at_ms.wrapping_sub(hop.at_ms),
        );
        seq.serialize_element(&packed)?;
        previous = hop.at_ms;
    }
    seq.end()
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Hop>, D::Error> {
    if deserializer.is_human_readable() {
        return Vec::<Hop>::deserialize(deserializer);
    }
    deserializer.deserialize_seq(PackedVisitor)
}

/// A lineage decoded from its binary form, for hand-written row decoders.
pub struct Lineage(pub Vec<Hop>);

impl<'de> Deserialize<'de> for Lineage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Lineage)
    }
}

struct PackedVisitor;

impl<'de> Visitor<'de> for PackedVisitor {
    type Value = Vec<Hop>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a lineage")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Hop>, A::Error> {
        // The length comes from the input: bound what is reserved up front.
        let mut hops = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        let mut previous = 0i64;
        while let Some((stage, partition, offset, at, received)) = seq.next_element::<Packed>()? {
            let at_ms = previous.wrapping_add(at);
            hops.push(Hop {
                stage,
                partition,
                offset,
                at_ms,
                received_at_ms: at_ms.wrapping_add(received),
            });
            previous = at_ms;
        }
        Ok(hops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Carrier {
        #[serde(with = "super")]
        lineage: Vec<Hop>,
    }

    fn hop(stage: Stage, offset: u64, at_ms: i64, received_at_ms: i64) -> Hop {
        Hop {
            stage,
            partition: 3,
            offset,
            at_ms,
            received_at_ms,
        }
    }

    // A typical lineage takes under half the bytes of the plain form, and JSON keeps the plain form.
    #[test]
    fn packed_is_smaller_and_json_is_unchanged() {
        let t = 1_795_880_000_000;
        let lineage = vec![
            hop(Stage::Submitted, 120_345, t, t),
            hop(Stage::Admitted, 120_345, t + 2, t),
            hop(Stage::Debited, 98_001, t + 4, t + 3),
            hop(Stage::Credited, 97_555, t + 7, t + 5),
            hop(Stage::Completed, 118_002, t + 9, t + 8),
        ];
        let packed = postcard::to_allocvec(&Carrier {
            lineage: lineage.clone(),
        })
        .unwrap();
        let plain = postcard::to_allocvec(&lineage).unwrap();
        assert!(
            packed.len() * 2 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        let back: Carrier = postcard::from_bytes(&packed).unwrap();
        assert_eq!(back.lineage, lineage);
        let json = serde_json::to_value(Carrier {
            lineage: lineage.clone(),
        })
        .unwrap();
        assert_eq!(json["lineage"], serde_json::to_value(&lineage).unwrap());
    }

    fn arb_stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            Just(Stage::Submitted),
            Just(Stage::Admitted),
            Just(Stage::Debited),
            Just(Stage::Credited),
            Just(Stage::Refunded),
            Just(Stage::Rejected),
            Just(Stage::Completed),
        ]
    }

    proptest! {
        // Any lineage, extreme times included, comes back exactly.
        #[test]
        fn any_lineage_round_trips(hops in proptest::collection::vec(
            (arb_stage(), any::<u32>(), any::<u64>(), any::<i64>(), any::<i64>()), 0..8)
        ) {
            let lineage: Vec<Hop> = hops
                .into_iter()
                .map(|(stage, partition, offset, at_ms, received_at_ms)| Hop {
                    stage, partition, offset, at_ms, received_at_ms,
                })
                .collect();
            let bytes = postcard::to_allocvec(&Carrier { lineage: lineage.clone() }).unwrap();
            let back: Carrier = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back.lineage, lineage);
        }
    }
}
