//! Payments newest first, by acceptance time, for `GET /api/v1/payments`.
//!
//! No index is written for it: a page merges what is already there, on
//! each partition this instance owns:
//! - the task's cached rows and the rows of their own (payments not over),
//! - the blocks of payments that are over, whose heads carry each row's
//!   acceptance time: the index keeps each block's oldest and newest, so a
//!   page reads the blocks newest first and stops once no unread block can
//!   hold a payment newer than the page's last,
//! - the payments accepted and not admitted yet (the ingest path's own list).
//!
//! A filter that matches few payments reads more blocks for a page; at most
//! [`MAX_BLOCKS_PER_PAGE`], then the page ends early, with a cursor where
//! it stopped (`next_after`), and may be short or empty.

use std::collections::{BTreeMap, HashSet};

use super::{Runtime, RuntimeError};
use crate::model::{partition_for, PaymentRef, PaymentStatus, Submitter};
use crate::pipeline::inflight::{Inflight, PaymentState};
use crate::pipeline::Processor;
use crate::store::{decode_row, plain_entries, row_key};

/// Most blocks of payments one page reads (about 15 payments each).
pub const MAX_BLOCKS_PER_PAGE: usize = 2_000;

/// What a listing keeps: every given condition must hold.
#[derive(Debug, Clone, Default)]
pub struct PaymentFilter {
    pub status: Option<PaymentStatus>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Accepted at or after, ms since the epoch.
    pub since_ms: Option<i64>,
    /// Accepted at or before, ms since the epoch.
    pub until_ms: Option<i64>,
}

/// A place in the newest-first order: a page after it holds the payments
/// accepted before `at_ms`, and those accepted at `at_ms` whose id sorts
/// before `id`. As text, `<at_ms>.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub at_ms: i64,
    pub id: String,
}

impl Cursor {
    pub fn parse(text: &str) -> Option<Self> {
        let (at, id) = text.split_once('.')?;
        let at_ms = at.parse::<i64>().ok().filter(|at| *at >= 0)?;
        Some(Self {
            at_ms,
            id: id.to_owned(),
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.at_ms, self.id)
    }
}

/// One payment of a page.
pub enum Listed {
    /// As the inflight processor has it.
    Row(PaymentState),
    /// Accepted, not admitted yet.
    Accepted(PaymentRef, Option<Submitter>),
}

impl Listed {
    fn payment(&self) -> &PaymentRef {
        match self {
            Self::Row(row) => &row.payment,
            Self::Accepted(payment, _) => payment,
        }
    }

    fn status(&self) -> PaymentStatus {
        match self {
            Self::Row(row) => row.status,
            Self::Accepted(..) => PaymentStatus::Accepted,
        }
    }
}

pub struct PaymentPage {
    pub items: Vec<Listed>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// The page being filled: the newest `limit + 1` payments seen that pass.
struct Filling<'a> {
    filter: &'a PaymentFilter,
    /// Exclusive: only payments before it.
    before: Cursor,
    limit: usize,
    found: BTreeMap<(i64, String), Listed>,
    /// Ids already offered from a fresher copy.
    seen: HashSet<String>,
}

impl Filling<'_> {
    fn offer(&mut self, item: Listed) {
        let payment = item.payment();
        if !self.seen.insert(payment.id.clone()) {
            return;
        }
        let filter = self.filter;
        let at = payment.accepted_at_ms;
        let passes = at >= filter.since_ms.unwrap_or(i64::MIN)
            && (at, payment.id.as_str()) < (self.before.at_ms, self.before.id.as_str())
            && filter.status.is_none_or(|s| s == item.status())
            && filter.from.as_ref().is_none_or(|f| *f == payment.from)
            && filter.to.as_ref().is_none_or(|t| *t == payment.to);
        if passes {
            self.found.insert((at, payment.id.clone()), item);
            if self.found.len() > self.limit + 1 {
                self.found.pop_first();
            }
        }
    }

    /// The oldest acceptance time a payment may have to make the page.
    fn floor_ms(&self) -> i64 {
        match self.found.first_key_value() {
            Some(((at, _), _)) if self.found.len() > self.limit => *at,
            _ => self.filter.since_ms.unwrap_or(i64::MIN),
        }
    }
}

impl Runtime {
    /// A page of the payments of the partitions `keep` admits, newest
    /// first, after `after`.
    pub fn payments_page(
        &self,
        filter: &PaymentFilter,
        after: Option<&Cursor>,
        limit: usize,
        keep: impl Fn(u32) -> bool,
    ) -> Result<PaymentPage, RuntimeError> {
        let until = filter.until_ms.map(|until| Cursor {
            at_ms: until.saturating_add(1),
            id: String::new(),
        });
        let before = [after.cloned(), until].into_iter().flatten().min();
        let before = before.unwrap_or(Cursor {
            at_ms: i64::MAX,
            id: String::new(),
        });
        let mut page = Filling {
            filter,
            before,
            limit,
            found: BTreeMap::new(),
            seen: HashSet::new(),
        };
        let partitions = self.core.config.log.partitions;
        let owned: Vec<u32> = (0..partitions).filter(|p| keep(*p)).collect();
        // Freshest first: cached rows, then rows of their own, then blocks
        // (listed last, so a row moved into one meanwhile is still found).
        for &p in &owned {
            let rows = self.core.inflight[p as usize]
                .rows
                .read()
                .expect("rows lock");
            rows.values()
                .for_each(|row| page.offer(Listed::Row(row.value.clone())));
        }
        self.offer_own_rows(&mut page, |id| {
            owned.contains(&partition_for(id, partitions))
        })?;
        let frontier = self.offer_blocks(&mut page, &owned)?;
        for (payment, by) in self.ingest().recent(|p| owned.contains(&p)) {
            let task = &self.core.inflight[partition_for(&payment.id, partitions) as usize];
            if !page.seen.contains(&payment.id) && task.get(&self.core, &payment.id)?.is_none() {
                page.offer(Listed::Accepted(payment, by));
            }
        }
        let mut found = page.found;
        if let Some(frontier) = &frontier {
            // Unread blocks may hold payments at or below the frontier.
            found
                .retain(|(at, id), _| (*at, id.as_str()) >= (frontier.at_ms, frontier.id.as_str()));
        }
        let more = found.len() > limit;
        if more {
            found.pop_first();
        }
        // More than a page: after the last one; else where the blocks stopped, if they did.
        let next = match found.first_key_value() {
            Some(((at_ms, id), _)) if more => Some(Cursor {
                at_ms: *at_ms,
                id: id.clone(),
            }),
            _ => frontier,
        };
        Ok(PaymentPage {
            items: found.into_values().rev().collect(),
            next,
        })
    }

    /// Offers the payments stored as rows of their own (those not over).
    fn offer_own_rows(
        &self,
        page: &mut Filling,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(), RuntimeError> {
        let mut after: Option<String> = None;
        loop {
            let rows =
                self.core
                    .store
                    .scan::<PaymentState>(Inflight::TABLE, after.as_deref(), 512)?;
            let done = rows.len() < 512;
            after = rows.last().map(|(id, _)| id.clone());
            for (id, row) in rows {
                if keep(&id) {
                    page.offer(Listed::Row(row));
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Offers the payments in blocks, newest block first, until no unread
    /// block can hold one for the page. Returns where it stopped when it
    /// read [`MAX_BLOCKS_PER_PAGE`] first.
    fn offer_blocks(
        &self,
        page: &mut Filling,
        owned: &[u32],
    ) -> Result<Option<Cursor>, RuntimeError> {
        let since = page.filter.since_ms.unwrap_or(i64::MIN);
        let mut blocks: Vec<(i64, u32, u64)> = Vec::new();
        for &p in owned {
            let index = self.core.inflight[p as usize]
                .blocks
                .read()
                .expect("blocks lock");
            let overlapping = index.overlapping(since, page.before.at_ms);
            blocks.extend(
                overlapping
                    .into_iter()
                    .map(|(newest, seq)| (newest, p, seq)),
            );
        }
        blocks.sort_unstable_by(|a, b| b.cmp(a));
        for (read, (newest_ms, partition, seq)) in blocks.into_iter().enumerate() {
            if newest_ms < page.floor_ms() {
                break;
            }
            if read == MAX_BLOCKS_PER_PAGE {
                return Ok(Some(Cursor {
                    at_ms: newest_ms.saturating_add(1),
                    id: String::new(),
                }));
            }
            let task = &self.core.inflight[partition as usize];
            let Some(bytes) = self
                .core
                .store
                .block_bytes(Inflight::TABLE, partition, seq)?
            else {
                continue; // Forgotten by retention since the index was read.
            };
            let block = crate::store::block_key(Inflight::TABLE, partition, seq);
            for (id, row) in plain_entries(&block, &bytes)? {
                if page.seen.contains(&id) {
                    continue;
                }
                // An older copy of a row written again is not the row.
                let newest = task.blocks.read().expect("blocks lock").candidates(&id);
                if newest.first() != Some(&seq)
                    && task.find_in_blocks(&self.core, &id)?.map(|(s, _)| s) != Some(seq)
                {
                    continue;
                }
                let state: PaymentState = decode_row(&row_key(Inflight::TABLE, &id), &row)?;
                page.offer(Listed::Row(state));
            }
        }
        Ok(None)
    }
}
