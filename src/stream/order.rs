//! Per-key ordering within one consumer (`order_by` / `order_by_json`): entries with the
//! same key run one at a time, in the order this consumer received them (stream order).
//!
//! A key is *held* by the one entry of it the loop has in hand (running, waiting for its
//! retry, or being dead-lettered). Later entries of a held key wait here, behind it,
//! without a read slot; when the holder is settled for good (acked, dead-lettered, or
//! gone to another consumer) the next one becomes the holder and is *ready*: it runs as
//! soon as a read slot is free. An entry without a key is not ordered.

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
        let Some(key) = key_of(&self.source, &self.payload_field, &entry) else {
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
            held.waiting.push_back(Waiting {
                entry,
                attempt,
                since: Instant::now(),
            });
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

    /// The next ready entry and how long it waited.
    pub(crate) fn next_ready(&mut self) -> Option<(Entry, u64, std::time::Duration)> {
        let w = self.ready.pop_front()?;
        Some((w.entry, w.attempt, w.since.elapsed()))
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
