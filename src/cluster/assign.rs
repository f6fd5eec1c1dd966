//! How the leader divides the partitions: [`assign`], a pure function
//! (every partition exactly once, counts that differ by at most one, each
//! member keeping as many of its previous partitions as that balance allows,
//! the same answer for the same members in any order), and [`plan`], which
//! feeds it what the members said when they joined.
//!
//! Rebalances are eager: a member releases everything before it rejoins,
//! and says which generation it released. A member that has not rejoined
//! yet when the leader plans (its metadata is older than the generation the
//! leader last saw it in) may still be working on its partitions: it keeps
//! exactly those (it is *pinned*), and the rest is divided among the others.
//! It gets its fair share at the next rebalance.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::protocol::JoinMetadata;
use super::{Assignment, MemberView};

/// Divides partitions `0..partitions` among `members` (member id, the
/// partitions it owned before). A partition claimed by several members
/// stays with the first of them by id; claims beyond `partitions` are ignored.
pub fn assign(partitions: u32, members: &[(String, Vec<u32>)]) -> BTreeMap<String, Vec<u32>> {
    let all: Vec<u32> = (0..partitions).collect();
    assign_among(&all, members)
}

/// [`assign`] over any set of partitions.
fn assign_among(partitions: &[u32], members: &[(String, Vec<u32>)]) -> BTreeMap<String, Vec<u32>> {
    let mut by_id: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (id, previous) in members {
        by_id.entry(id).or_default().extend(previous);
    }
    if by_id.is_empty() {
        return BTreeMap::new();
    }
    let available: BTreeSet<u32> = partitions.iter().copied().collect();
    // What each member may keep: its claims that no member before it took.
    let mut claimed = BTreeSet::new();
    let mut kept: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, previous) in &by_id {
        let mine = previous
            .iter()
            .filter(|p| available.contains(p) && claimed.insert(**p))
            .copied()
            .collect();
        kept.insert(id, mine);
    }
    // Quotas: the members keeping most get the larger ones.
    let (base, extra) = (available.len() / by_id.len(), available.len() % by_id.len());
    let mut ranked: Vec<&str> = by_id.keys().copied().collect();
    ranked.sort_by_key(|id| (Reverse(kept[id].len()), *id));
    let quota: BTreeMap<&str, usize> = ranked
        .iter()
        .enumerate()
        .map(|(rank, id)| (*id, base + usize::from(rank < extra)))
        .collect();
    for (id, mine) in kept.iter_mut() {
        mine.truncate(quota[id]);
    }
    let taken: BTreeSet<u32> = kept.values().flatten().copied().collect();
    let mut free = available.difference(&taken).copied();
    for (id, mine) in kept.iter_mut() {
        while mine.len() < quota[id] {
            match free.next() {
                Some(partition) => mine.push(partition),
                None => break,
            }
        }
        mine.sort_unstable();
    }
    kept.into_iter()
        .map(|(id, mine)| (id.to_owned(), mine))
        .collect()
}

/// One member as the leader sees it in the JoinGroup answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    /// Its member id.
    pub id: String,
    /// What it said, or `None` when its metadata did not decode.
    pub metadata: Option<JoinMetadata>,
}

/// The membership of the next generation: `members` as they joined, and
/// `last`, the leader's own view of the generation before (if it had one),
/// which tells who may still hold partitions.
pub fn plan(partitions: u32, members: &[Joined], last: Option<&Assignment>) -> Vec<MemberView> {
    let held = |id: &str| -> Option<&Vec<u32>> {
        let last = last?;
        let view = last.members.iter().find(|m| m.id == id)?;
        let released = members
            .iter()
            .find(|m| m.id == id)
            .and_then(|m| m.metadata.as_ref())
            .is_some_and(|m| m.generation >= last.generation);
        (!released).then_some(&view.partitions)
    };
    let pinned: BTreeMap<&str, Vec<u32>> = members
        .iter()
        .filter_map(|m| held(&m.id).map(|p| (m.id.as_str(), p.clone())))
        .collect();
    let taken: BTreeSet<u32> = pinned.values().flatten().copied().collect();
    let free: Vec<u32> = (0..partitions).filter(|p| !taken.contains(p)).collect();
    let fresh: Vec<&Joined> = members
        .iter()
        .filter(|m| !pinned.contains_key(m.id.as_str()))
        .collect();
    let mut owners: BTreeMap<String, Vec<u32>> = if fresh.is_empty() {
        // Everyone may still hold something: spread the rest over them.
        let idle: Vec<(String, Vec<u32>)> = pinned
            .keys()
            .map(|id| ((*id).to_owned(), Vec::new()))
            .collect();
        assign_among(&free, &idle)
    } else {
        assign_among(&free, &previous_owners(&fresh))
    };
    for (id, partitions) in &pinned {
        let mine = owners.entry((*id).to_owned()).or_default();
        mine.extend(partitions);
        mine.sort_unstable();
    }
    let mut views: BTreeMap<&str, MemberView> = BTreeMap::new();
    for m in members {
        views.entry(&m.id).or_insert_with(|| MemberView {
            id: m.id.clone(),
            url: m
                .metadata
                .as_ref()
                .map(|d| d.url.clone())
                .unwrap_or_default(),
            partitions: owners.remove(&m.id).unwrap_or_default(),
        });
    }
    views.into_values().collect()
}

/// What each member owned before, each partition given to the member that
/// owned it most recently (a member dropped and replaced still says it
/// owned its old partitions, but its successor's claim is newer).
fn previous_owners(members: &[&Joined]) -> Vec<(String, Vec<u32>)> {
    let mut newest: BTreeMap<u32, (i32, &str)> = BTreeMap::new();
    for member in members {
        let Some(metadata) = &member.metadata else {
            continue;
        };
        for &partition in &metadata.owned {
            let claim = (metadata.generation, member.id.as_str());
            let entry = newest.entry(partition).or_insert(claim);
            // The newer generation wins; at equal generations, the first id.
            if claim.0 > entry.0 || (claim.0 == entry.0 && claim.1 < entry.1) {
                *entry = claim;
            }
        }
    }
    members
        .iter()
        .map(|m| {
            let mine = newest
                .iter()
                .filter(|(_, (_, id))| *id == m.id)
                .map(|(partition, _)| *partition)
                .collect();
            (m.id.clone(), mine)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(id: &str, previous: &[u32]) -> (String, Vec<u32>) {
        (id.to_owned(), previous.to_vec())
    }

    fn counts(assignment: &BTreeMap<String, Vec<u32>>) -> Vec<usize> {
        assignment.values().map(Vec::len).collect()
    }

    /// Every partition of `0..partitions` exactly once, counts within one.
    fn assert_exact_and_balanced(partitions: u32, assignment: &BTreeMap<String, Vec<u32>>) {
        let mut all: Vec<u32> = assignment.values().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..partitions).collect::<Vec<_>>(), "{assignment:?}");
        let counts = counts(assignment);
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            max.zip(min).is_none_or(|(max, min)| max - min <= 1),
            "{assignment:?}"
        );
    }

    // Two new members split eight partitions four and four, in ranges.
    #[test]
    fn new_members_split_evenly() {
        let assignment = assign(8, &[member("b", &[]), member("a", &[])]);
        assert_eq!(assignment["a"], vec![0, 1, 2, 3]);
        assert_eq!(assignment["b"], vec![4, 5, 6, 7]);
    }

    // A third member takes two partitions and the others keep three of their four each.
    #[test]
    fn a_third_member_moves_only_two_partitions() {
        let before = [member("a", &[0, 1, 2, 3]), member("b", &[4, 5, 6, 7])];
        let after = assign(8, &[before[0].clone(), before[1].clone(), member("c", &[])]);
        assert_exact_and_balanced(8, &after);
        assert_eq!(counts(&after), vec![3, 3, 2]);
        assert_eq!(after["a"], vec![0, 1, 2]);
        assert_eq!(after["b"], vec![4, 5, 6]);
        assert_eq!(after["c"], vec![3, 7]);
    }

    // When a member leaves, the others keep theirs and share its partitions.
    #[test]
    fn a_leaving_members_partitions_are_shared() {
        let after = assign(8, &[member("a", &[0, 1, 2]), member("c", &[3, 7])]);
        assert_eq!(after["a"], vec![0, 1, 2, 4]);
        assert_eq!(after["c"], vec![3, 5, 6, 7]);
    }

    // Double claims, claims beyond the partitions and repeated ids are tolerated.
    #[test]
    fn bad_claims_are_ignored() {
        let after = assign(
            4,
            &[
                member("a", &[0, 1, 9]),
                member("b", &[1, 2]),
                member("a", &[]),
            ],
        );
        assert_exact_and_balanced(4, &after);
        assert_eq!(after["a"], vec![0, 1]);
        assert_eq!(after["b"], vec![2, 3]);
        assert!(assign(4, &[]).is_empty());
    }

    fn joined(id: &str, generation: i32, owned: &[u32]) -> Joined {
        Joined {
            id: id.to_owned(),
            metadata: Some(JoinMetadata {
                version: 1,
                url: format!("http://{id}"),
                generation,
                owned: owned.to_vec(),
            }),
        }
    }

    fn view(generation: i32, members: &[(&str, &[u32])]) -> Assignment {
        Assignment {
            generation,
            member_id: members[0].0.to_owned(),
            partitions: members[0].1.to_vec(),
            members: members
                .iter()
                .map(|(id, partitions)| MemberView {
                    id: (*id).to_owned(),
                    url: format!("http://{id}"),
                    partitions: partitions.to_vec(),
                })
                .collect(),
        }
    }

    // A member that has not released its partitions yet keeps exactly them; the others share the rest.
    #[test]
    fn a_member_yet_to_release_keeps_its_partitions() {
        let last = view(3, &[("a", &[0, 1, 2, 3]), ("b", &[4, 5, 6, 7])]);
        let members = [
            joined("a", 3, &[0, 1, 2, 3]),
            joined("b", 1, &[0]),
            joined("c", -1, &[]),
        ];
        let planned = plan(8, &members, Some(&last));
        let by_id: BTreeMap<_, _> = planned.iter().map(|m| (m.id.as_str(), m)).collect();
        assert_eq!(by_id["b"].partitions, vec![4, 5, 6, 7]);
        assert_eq!(by_id["a"].partitions, vec![0, 1]);
        assert_eq!(by_id["c"].partitions, vec![2, 3]);
        assert_eq!(by_id["c"].url, "http://c");
        // Once b has released generation 3, the division is even again.
        let members = [
            joined("a", 3, &[0, 1, 2, 3]),
            joined("b", 3, &[4, 5, 6, 7]),
            joined("c", -1, &[]),
        ];
        let counts: Vec<usize> = plan(8, &members, Some(&last))
            .iter()
            .map(|m| m.partitions.len())
            .collect();
        assert_eq!(counts, vec![3, 3, 2]);
    }

    // A member dropped and back claims its old partitions, but their newer owner keeps them.
    #[test]
    fn the_newest_claim_wins() {
        let members = [
            joined("a", 5, &[0, 1, 2, 3, 4, 5]),
            joined("b", 5, &[6, 7]),
            joined("z", 4, &[0, 1, 2]),
        ];
        let planned = plan(8, &members, None);
        assert_eq!(planned[0].partitions, vec![0, 1, 2]);
        assert_eq!(planned[1].partitions, vec![3, 6, 7]);
        assert_eq!(planned[2].partitions, vec![4, 5]);
        // With undecodable metadata a member still gets its share, without a URL.
        let members = [
            joined("a", 5, &[0, 1]),
            Joined {
                id: "b".into(),
                metadata: None,
            },
        ];
        let planned = plan(4, &members, None);
        assert_eq!(planned[1].partitions, vec![2, 3]);
        assert_eq!(planned[1].url, "");
    }

    fn members_strategy() -> impl Strategy<Value = (u32, Vec<(String, Vec<u32>)>)> {
        (1u32..=64, 1usize..=9).prop_flat_map(|(partitions, count)| {
            let member = proptest::collection::vec(0..partitions + 4, 0..12);
            let members = proptest::collection::vec(member, count).prop_map(|previous| {
                previous
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (format!("m{i:02}"), p))
                    .collect::<Vec<_>>()
            });
            (Just(partitions), members)
        })
    }

    proptest! {
        // Any members and claims: every partition exactly once, balanced, the same in any order, and each member keeps at least min(its unique valid claims, the floor share).
        #[test]
        fn assignments_are_exact_balanced_sticky_and_deterministic(
            (partitions, members) in members_strategy(),
            rotate in 0usize..9,
        ) {
            let assignment = assign(partitions, &members);
            assert_exact_and_balanced(partitions, &assignment);
            let mut shuffled = members.clone();
            let k = rotate % shuffled.len();
            shuffled.rotate_left(k);
            shuffled.reverse();
            prop_assert_eq!(&assign(partitions, &shuffled), &assignment);
            let floor = partitions as usize / members.len();
            let mut taken = BTreeSet::new();
            for (id, previous) in &members {
                let unique: BTreeSet<u32> = previous
                    .iter()
                    .filter(|p| **p < partitions && !taken.contains(*p))
                    .copied()
                    .collect();
                taken.extend(unique.iter().copied());
                let kept = assignment[id].iter().filter(|p| unique.contains(p)).count();
                prop_assert!(kept >= unique.len().min(floor), "{id}: {assignment:?}");
            }
        }
    }
}
