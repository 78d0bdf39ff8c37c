//! Per-key ordering within one consumer (`order_by` / `order_by_json`): entries with the
//! same key run one at a time, in the order this consumer received them (stream order).
//!
//! A key is *held* by the one entry of it the loop has in hand (running, waiting for its
//! retry, or being dead-lettered). Later entries of a held key wait here, behind it,
//! without a read slot; when the holder is settled for good (acked, dead-lettered, or
//! gone to another consumer) the next one becomes the holder and is *ready*: it runs as
//! soon as a read slot is free. An entry without a key is not ordered.
//!
//! With `order_scope = "group"` the same queues hold the keys this consumer holds in the
//! group (see [`super::lease`] for how keys are held across consumers): the key of an
//! entry is then the one the lease scripts computed ([`Order::admit_keyed`]), entries
//! join their key's queue in id order (they may come from other consumers, handed over,
//! or from a consumer presumed dead), and a key taken over by another consumer is
//! dropped with its waiting entries ([`Order::lose`]).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tokio::time::Instant;

use crate::config::OrderKey as KeySource;
use crate::redis::Entry;

/// The ordering key of `entry`, or `None` when it has none (field missing, payload not
/// JSON, pointer not found). A JSON string is its text; other JSON values are their JSON
/// text (`42`, `true`, `{"a":1}`).
pub(crate) fn key_of(source: &KeySource, payload_field: &str, entry: &Entry) -> Option<Bytes> {
    match source {
        KeySource::Field(name) => entry.field(name.as_bytes()).cloned(),
        KeySource::JsonPointer(pointer) => {
            let raw = entry.field(payload_field.as_bytes())?;
            let doc: serde_json::Value = serde_json::from_slice(raw).ok()?;
            match doc.pointer(pointer)? {
                serde_json::Value::String(s) => Some(Bytes::from(s.clone())),
                other => Some(Bytes::from(other.to_string())),
            }
        }
    }
}

/// An entry waiting for its key.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) entry: Entry,
    pub(crate) attempt: u64,
    since: Instant,
}

/// One held key.
#[derive(Debug)]
struct Held {
    /// The id of the entry in hand.
    holder: String,
    waiting: VecDeque<Waiting>,
}

/// The keys of one stream's entries in hand, and the entries waiting behind them.
#[derive(Debug)]
pub(crate) struct Order {
    source: KeySource,
    payload_field: String,
    max_waiting: usize,
    held: HashMap<Bytes, Held>,
    /// The key each holder holds, by id.
    key_of_holder: HashMap<String, Bytes>,
    /// Holders whose turn came, waiting for a read slot.
    ready: VecDeque<Waiting>,
    /// Entries waiting behind a held key (not counting `ready`).
    waiting: usize,
}

/// A key held here, for renewing its lease (`order_scope = "group"`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeldKey {
    pub(crate) key: Bytes,
    /// The entry holding it (running, retrying, being dead-lettered, or ready).
    pub(crate) holder: String,
    /// The holder and the entries waiting behind it.
    pub(crate) ids: Vec<String>,
}

/// A stream entry id (`<ms>-<seq>`) as a pair of numbers, for ordering; ids that do not
/// parse sort last.
pub(crate) fn id_number(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or((u64::MAX, u64::MAX))
}

/// What [`Order::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admitted {
    /// Run it now (it holds its key, or it has none).
    Run {
        entry: Entry,
        attempt: u64,
        keyed: bool,
    },
    /// It waits behind the entry holding its key.
    Queued,
}

impl Order {
    pub(crate) fn new(source: KeySource, payload_field: &str, max_waiting: usize) -> Self {
        Order {
            source,
            payload_field: payload_field.to_owned(),
            max_waiting,
            held: HashMap::new(),
            key_of_holder: HashMap::new(),
            ready: VecDeque::new(),
            waiting: 0,
        }
    }

    /// How many more entries may be read: room left for waiting entries.
    pub(crate) fn room(&self) -> usize {
        self.max_waiting
            .saturating_sub(self.waiting + self.ready.len())
    }

    /// Entries waiting for their key, ready ones included.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting + self.ready.len()
    }

    /// Whether an entry's turn came and it waits for a read slot.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Keys held now.
    pub(crate) fn keys_held(&self) -> usize {
        self.held.len()
    }

    /// Ids of the entries waiting here (they are ours and must be kept fresh).
    pub(crate) fn waiting_ids(&self) -> impl Iterator<Item = &String> {
        self.held
            .values()
            .flat_map(|h| h.waiting.iter())
            .chain(self.ready.iter())
            .map(|w| &w.entry.id)
    }

    /// Whether `id` is waiting here.
    pub(crate) fn is_waiting(&self, id: &str) -> bool {
        self.waiting_ids().any(|w| w == id)
    }

    /// Takes an entry the loop received: it runs now if its key is free (and then holds
    /// it) or it has none; otherwise it waits behind its key's holder.
    pub(crate) fn admit(&mut self, entry: Entry, attempt: u64) -> Admitted {
        let key = key_of(&self.source, &self.payload_field, &entry);
        self.admit_with(entry, attempt, key, false)
    }

    /// [`Order::admit`] with the key already known (`order_scope = "group"`: the lease
    /// scripts compute it). A waiting entry joins its key's queue in id order.
    pub(crate) fn admit_keyed(
        &mut self,
        entry: Entry,
        attempt: u64,
        key: Option<Bytes>,
    ) -> Admitted {
        self.admit_with(entry, attempt, key, true)
    }

    fn admit_with(
        &mut self,
        entry: Entry,
        attempt: u64,
        key: Option<Bytes>,
        in_id_order: bool,
    ) -> Admitted {
        let Some(key) = key else {
            return Admitted::Run {
                entry,
                attempt,
                keyed: false,
            };
        };
        if let Some(held) = self.held.get_mut(&key) {
            // A re-delivery of the holder itself (a retry's claim) runs as the holder.
            if held.holder == entry.id {
                return Admitted::Run {
                    entry,
                    attempt,
                    keyed: true,
                };
            }
            let at = if in_id_order {
                let id = id_number(&entry.id);
                held.waiting
                    .iter()
                    .position(|w| id_number(&w.entry.id) > id)
                    .unwrap_or(held.waiting.len())
            } else {
                held.waiting.len()
            };
            held.waiting.insert(
                at,
                Waiting {
                    entry,
                    attempt,
                    since: Instant::now(),
                },
            );
            self.waiting += 1;
            return Admitted::Queued;
        }
        self.key_of_holder.insert(entry.id.clone(), key.clone());
        self.held.insert(
            key,
            Held {
                holder: entry.id.clone(),
                waiting: VecDeque::new(),
            },
        );
        Admitted::Run {
            entry,
            attempt,
            keyed: true,
        }
    }

    /// The entry `id` is settled for good (acked, dead-lettered, deleted, or taken over by
    /// another consumer): its key passes to the next entry waiting, which becomes ready.
    /// Nothing happens for an id that holds no key.
    pub(crate) fn settled(&mut self, id: &str) {
        let Some(key) = self.key_of_holder.remove(id) else {
            return;
        };
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        match held.waiting.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                held.holder = next.entry.id.clone();
                self.key_of_holder.insert(next.entry.id.clone(), key);
                self.ready.push_back(next);
            }
            None => {
                self.held.remove(&key);
            }
        }
    }

    /// An entry [`Order::admit_keyed`] said to run, for which there is no read slot now:
    /// it keeps its key and runs as soon as a slot is free, before anything read later.
    pub(crate) fn push_ready(&mut self, entry: Entry, attempt: u64) {
        self.ready.push_back(Waiting {
            entry,
            attempt,
            since: Instant::now(),
        });
    }

    /// The key the entry `id` holds, if it holds one.
    pub(crate) fn key_held_by(&self, id: &str) -> Option<&Bytes> {
        self.key_of_holder.get(id)
    }

    /// Ids of entries without a key waiting for a read slot ([`Order::push_ready`]).
    pub(crate) fn unkeyed_ready_ids(&self) -> impl Iterator<Item = &String> {
        self.ready
            .iter()
            .map(|w| &w.entry.id)
            .filter(|id| !self.key_of_holder.contains_key(*id))
    }

    /// Every held key with the id of the entry holding it (running, retrying, being
    /// dead-lettered, or ready to run) and the ids waiting behind it.
    pub(crate) fn held_keys(&self) -> Vec<HeldKey> {
        self.held
            .iter()
            .map(|(key, held)| HeldKey {
                key: key.clone(),
                holder: held.holder.clone(),
                ids: std::iter::once(held.holder.clone())
                    .chain(held.waiting.iter().map(|w| w.entry.id.clone()))
                    .collect(),
            })
            .collect()
    }

    /// The key was taken over by another consumer while `holder` held it here (we were
    /// presumed dead): the entries waiting for it, and the holder itself if it has not
    /// started yet, are that consumer's now and are dropped. A holder that runs finishes
    /// (then [`Order::settled`] frees the key). Nothing happens when another entry holds
    /// the key by now (the report is older than that): `None`. Returns how many were
    /// dropped.
    pub(crate) fn lose(&mut self, key: &Bytes, holder: &str) -> Option<usize> {
        let held = self.held.get_mut(key)?;
        if held.holder != holder {
            return None;
        }
        let dropped = held.waiting.len();
        held.waiting.clear();
        self.waiting -= dropped;
        let before = self.ready.len();
        self.ready.retain(|w| w.entry.id != holder);
        if self.ready.len() < before {
            self.key_of_holder.remove(holder);
            self.held.remove(key);
            return Some(dropped + 1);
        }
        Some(dropped)
    }

    /// The next ready entry and how long it waited.
    pub(crate) fn next_ready(&mut self) -> Option<(Entry, u64, std::time::Duration)> {
        let w = self.ready.pop_front()?;
        Some((w.entry, w.attempt, w.since.elapsed()))
    }

    /// The loop stops (group scope): entries waiting for their key, ready ones included,
    /// are forgotten (they stay pending, ours, and in their keys' leases); entries in hand
    /// keep their keys until settled, so their acks release them. Returns how many
    /// entries were waiting.
    pub(crate) fn clear_waiting(&mut self) -> usize {
        let waiting = self.waiting();
        for held in self.held.values_mut() {
            held.waiting.clear();
        }
        self.waiting = 0;
        for w in self.ready.drain(..) {
            if let Some(key) = self.key_of_holder.remove(&w.entry.id) {
                self.held.remove(&key);
            }
        }
        waiting
    }

    /// Forgets everything (the loop stops: waiting entries stay pending, in our pending
    /// list, and are read again in stream order at the next start). Returns how many
    /// entries were waiting.
    pub(crate) fn clear(&mut self) -> usize {
        let waiting = self.waiting();
        self.held.clear();
        self.key_of_holder.clear();
        self.ready.clear();
        self.waiting = 0;
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &str)]) -> Entry {
        Entry {
            id: id.into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
                    .collect(),
            ),
        }
    }

    fn run_id(a: Admitted) -> String {
        match a {
            Admitted::Run { entry, .. } => entry.id,
            Admitted::Queued => panic!("queued"),
        }
    }

    #[test]
    fn keys_from_a_field_or_a_json_pointer() {
        let by_field = KeySource::Field("ch".into());
        let e = entry(
            "1-0",
            &[("ch", "a"), ("payload", r#"{"ch":{"id":7},"s":"x"}"#)],
        );
        assert_eq!(key_of(&by_field, "payload", &e).as_deref(), Some(&b"a"[..]));
        let ptr = |p: &str| KeySource::JsonPointer(p.into());
        assert_eq!(
            key_of(&ptr("/ch/id"), "payload", &e).as_deref(),
            Some(&b"7"[..])
        );
        assert_eq!(
            key_of(&ptr("/s"), "payload", &e).as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(key_of(&ptr("/nope"), "payload", &e), None);
        assert_eq!(
            key_of(&KeySource::Field("nope".into()), "payload", &e),
            None
        );
        let not_json = entry("1-1", &[("payload", "{not json")]);
        assert_eq!(key_of(&ptr("/ch"), "payload", &not_json), None);
        assert_eq!(key_of(&ptr("/ch"), "missing", &e), None);
    }

    #[test]
    fn one_entry_per_key_in_hand_the_rest_wait_in_order() {
        let mut o = Order::new(KeySource::Field("k".into()), "payload", 10);
        assert_eq!(run_id(o.admit(entry("1", &[("k", "a")]), 1)), "1");
        assert_eq!(run_id(o.admit(entry("2", &[("k", "b")]), 1)), "2");
        assert!(matches!(
            o.admit(entry("3", &[("k", "a")]), 1),
            Admitted::Queued
        ));
        assert!(matches!(
            o.admit(entry("4", &[("k", "a")]), 1),
            Admitted::Queued
        ));
        assert!(matches!(
            o.admit(entry("5", &[("other", "x")]), 1),
            Admitted::Run { keyed: false, .. }
        ));
        assert_eq!((o.waiting(), o.keys_held(), o.room()), (2, 2, 8));
        assert!(o.is_waiting("3") && !o.is_waiting("1"));
        assert!(o.next_ready().is_none());
        // Settling an entry that holds nothing changes nothing.
        o.settled("5");
        o.settled("1");
        let (next, attempt, _) = o.next_ready().expect("3 is ready");
        assert_eq!((next.id.as_str(), attempt), ("3", 1));
        // 3 holds `a` now: a re-delivery of 3 (its retry) runs, 4 still waits.
        assert_eq!(run_id(o.admit(entry("3", &[("k", "a")]), 2)), "3");
        o.settled("3");
        assert_eq!(o.next_ready().map(|r| r.0.id), Some("4".into()));
        o.settled("4");
        o.settled("2");
        assert_eq!((o.waiting(), o.keys_held()), (0, 0));
    }

    #[test]
    fn group_scope_keys_are_given_and_arrivals_wait_in_id_order() {
        let mut o = Order::new(KeySource::Field("unused".into()), "payload", 10);
        let k = || Some(Bytes::from_static(b"a"));
        let e = |id: &str| entry(id, &[]);
        assert_eq!(run_id(o.admit_keyed(e("5-0"), 1, k())), "5-0");
        // Handed over later but with lower ids than one waiting already: id order.
        assert!(matches!(o.admit_keyed(e("9-0"), 1, k()), Admitted::Queued));
        assert!(matches!(o.admit_keyed(e("10-0"), 1, k()), Admitted::Queued));
        assert!(matches!(o.admit_keyed(e("7-3"), 2, k()), Admitted::Queued));
        assert!(matches!(
            o.admit_keyed(e("6-0"), 1, None),
            Admitted::Run { keyed: false, .. }
        ));
        let held = o.held_keys();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].holder, "5-0");
        assert_eq!(held[0].ids, ["5-0", "7-3", "9-0", "10-0"]);
        assert_eq!(o.key_held_by("5-0").map(|k| &k[..]), Some(&b"a"[..]));
        o.settled("5-0");
        let (next, attempt, _) = o.next_ready().expect("7-3 is ready");
        assert_eq!((next.id.as_str(), attempt), ("7-3", 2));
        // No slot for it: it waits as ready and keeps its key.
        o.push_ready(next, attempt);
        assert!(o.has_ready());
        assert_eq!(o.unkeyed_ready_ids().count(), 0);
        o.push_ready(e("6-0"), 1);
        assert_eq!(o.unkeyed_ready_ids().collect::<Vec<_>>(), ["6-0"]);
        assert_eq!(o.held_keys()[0].holder, "7-3");
    }

    #[test]
    fn a_lost_key_drops_what_waits_unless_another_entry_holds_it_by_now() {
        let mut o = Order::new(KeySource::Field("unused".into()), "payload", 10);
        let a = Bytes::from_static(b"a");
        let e = |id: &str| entry(id, &[]);
        o.admit_keyed(e("1-0"), 1, Some(a.clone()));
        o.admit_keyed(e("2-0"), 1, Some(a.clone()));
        o.admit_keyed(e("3-0"), 1, Some(a.clone()));
        // A report about an older holder changes nothing.
        assert_eq!(o.lose(&a, "0-1"), None);
        // The running holder stays (it finishes); the waiting ones go.
        assert_eq!(o.lose(&a, "1-0"), Some(2));
        assert_eq!((o.waiting(), o.keys_held()), (0, 1));
        o.settled("1-0");
        assert_eq!(o.keys_held(), 0);
        // A ready holder that has not started goes with its key.
        o.admit_keyed(e("4-0"), 1, Some(a.clone()));
        o.admit_keyed(e("5-0"), 1, Some(a.clone()));
        o.settled("4-0");
        assert!(o.has_ready());
        assert_eq!(o.lose(&a, "5-0"), Some(1));
        assert!(!o.has_ready());
        assert_eq!((o.waiting(), o.keys_held()), (0, 0));
    }

    #[test]
    fn ids_order_numerically() {
        assert!(id_number("9-0") < id_number("10-0"));
        assert!(id_number("10-2") < id_number("10-10"));
        assert_eq!(id_number("nonsense"), (u64::MAX, u64::MAX));
    }

    #[test]
    fn room_shrinks_with_waiting_entries_and_clear_forgets() {
        let mut o = Order::new(KeySource::Field("k".into()), "payload", 2);
        o.admit(entry("1", &[("k", "a")]), 1);
        o.admit(entry("2", &[("k", "a")]), 1);
        o.admit(entry("3", &[("k", "a")]), 1);
        assert_eq!(o.room(), 0);
        o.settled("1");
        assert_eq!(o.room(), 0, "a ready entry still counts until it runs");
        o.next_ready();
        assert_eq!(o.room(), 1);
        assert_eq!(o.clear(), 1);
        assert_eq!((o.room(), o.keys_held()), (2, 0));
    }
}
