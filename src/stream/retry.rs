//! Failed entries waiting for their next attempt, earliest first.
//!
//! A failed attempt does not hold a read slot while it waits: the loop keeps a timer heap
//! of ids and, when one is due, claims the entry again (`XCLAIM`, which bumps Redis's
//! delivery counter: that counter is the attempt number, so it survives restarts and
//! takeovers). An entry that waits because the daemon lacked resources to start its
//! handler is kept here whole ([`Retry::Rerun`]) and runs again without a claim, so the
//! wait costs it no attempt.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use tokio::time::Instant;

use crate::redis::Entry;

/// What runs when a retry falls due.
#[derive(Debug)]
pub(crate) enum Retry {
    /// Claim the entry again (a new delivery, a new attempt).
    Claim,
    /// Run the same attempt again: the entry never ran.
    Rerun { entry: Entry, attempt: u64 },
}

/// Scheduling an id again replaces its earlier due time (an entry claimed and failed
/// again meanwhile must not get two retries).
#[derive(Default)]
pub(crate) struct RetryQueue {
    heap: BinaryHeap<Reverse<(Instant, String)>>,
    due: HashMap<String, (Instant, Retry)>,
}

impl RetryQueue {
    pub(crate) fn push(&mut self, id: String, due: Instant, retry: Retry) {
        self.heap.push(Reverse((due, id.clone())));
        self.due.insert(id, (due, retry));
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.due.contains_key(id)
    }

    /// Ids of the reruns waiting, in no order: their entries stay ours meanwhile and
    /// must be kept fresh (claims wait unrefreshed: another consumer may take them).
    pub(crate) fn reruns(&self) -> impl Iterator<Item = &String> {
        self.due
            .iter()
            .filter(|(_, (_, retry))| matches!(retry, Retry::Rerun { .. }))
            .map(|(id, _)| id)
    }

    pub(crate) fn next_due(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// The earliest retry due at `now`, if any.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(String, Retry)> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse((_, id)) = self.heap.pop()?;
        let (_, retry) = self.due.remove(&id)?;
        Some((id, retry))
    }

    /// Forgets every waiting retry; returns how many there were.
    pub(crate) fn clear(&mut self) -> usize {
        self.heap.clear();
        self.due.drain().count()
    }

    /// Drops heap tops that were rescheduled since they were pushed.
    fn drop_stale(&mut self) {
        while let Some(Reverse((due, id))) = self.heap.peek() {
            if self.due.get(id).is_some_and(|(d, _)| d == due) {
                return;
            }
            self.heap.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_and_only_when_due() {
        let now = Instant::now();
        let mut q = RetryQueue::default();
        q.push("b".into(), now + Duration::from_secs(2), Retry::Claim);
        q.push("a".into(), now + Duration::from_secs(1), Retry::Claim);
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(1)));
        assert!(q.pop_due(now).is_none());
        let (id, _) = q.pop_due(now + Duration::from_secs(5)).expect("a due");
        assert_eq!(id, "a");
        let (id, _) = q.pop_due(now + Duration::from_secs(5)).expect("b due");
        assert_eq!(id, "b");
        assert!(q.pop_due(now + Duration::from_secs(5)).is_none());
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn rescheduling_replaces_the_earlier_time() {
        let now = Instant::now();
        let mut q = RetryQueue::default();
        q.push("a".into(), now + Duration::from_secs(1), Retry::Claim);
        q.push("a".into(), now + Duration::from_secs(9), Retry::Claim);
        assert!(q.contains("a"));
        assert!(q.pop_due(now + Duration::from_secs(2)).is_none());
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(9)));
        assert!(q.pop_due(now + Duration::from_secs(9)).is_some());
        assert!(!q.contains("a"));
    }

    #[test]
    fn reruns_keep_their_entry_and_attempt() {
        let now = Instant::now();
        let mut q = RetryQueue::default();
        let entry = Entry {
            id: "1-0".into(),
            fields: Some(vec![]),
        };
        q.push("1-0".into(), now, Retry::Rerun { entry, attempt: 2 });
        assert_eq!(q.reruns().count(), 1);
        match q.pop_due(now) {
            Some((id, Retry::Rerun { entry, attempt })) => {
                assert_eq!((id.as_str(), entry.id.as_str(), attempt), ("1-0", "1-0", 2));
            }
            other => panic!("{other:?}"),
        }
        q.push("x".into(), now, Retry::Claim);
        assert_eq!(q.reruns().count(), 0);
        assert_eq!(q.clear(), 1);
        assert!(!q.contains("x"));
    }
}
