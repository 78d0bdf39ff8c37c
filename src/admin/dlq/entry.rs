//! One dead-letter entry as the daemon writes it (`stream::dlq::dlq_fields`): the source
//! entry's fields in their order, then the daemon's `dlq_*` block starting at
//! `dlq_source_stream`. The block is found from the end, so an original entry that itself
//! carries `dlq_*` fields (e.g. copied by hand from a DLQ) keeps them as original fields.
//!
//! Replaying restores the original fields in order, with the loop guard
//! `redis_streamd_replays` set to one more than before (added at the end the first time)
//! and `redis_streamd_replayed_from` set to `<dlq>/<dlq id>`.

use bytes::Bytes;
use serde_json::{Map, Value as Json, json};

use crate::admin::output::{escape, put_bytes};
use crate::admin::timefmt::{id_ms, rfc3339};
use crate::redis::Entry;

/// The field counting how often an entry was replayed (the loop guard).
pub(crate) const REPLAYS_FIELD: &str = "redis_streamd_replays";
/// The field naming the DLQ entry a replayed entry came from, `<dlq>/<id>`.
pub(crate) const REPLAYED_FROM_FIELD: &str = "redis_streamd_replayed_from";
/// The first field of the daemon's block.
const BLOCK_START: &[u8] = b"dlq_source_stream";

/// A parsed DLQ entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DlqEntry {
    /// The dead-letter stream it is in.
    pub(crate) dlq: String,
    /// Its id there.
    pub(crate) id: String,
    /// The source entry's fields, in order.
    pub(crate) original: Vec<(Bytes, Bytes)>,
    /// The daemon's `dlq_*` fields, in order (empty if this is not a daemon DLQ entry).
    pub(crate) meta: Vec<(Bytes, Bytes)>,
}

impl DlqEntry {
    /// Splits an entry read from `dlq`. `None` for an entry without fields (deleted).
    pub(crate) fn parse(dlq: &str, entry: Entry) -> Option<DlqEntry> {
        let mut fields = entry.fields?;
        let start = fields
            .iter()
            .rposition(|(k, _)| k.as_ref() == BLOCK_START)
            .unwrap_or(fields.len());
        let meta = fields.split_off(start);
        Some(DlqEntry {
            dlq: dlq.to_owned(),
            id: entry.id,
            original: fields,
            meta,
        })
    }

    /// The first `dlq_*` field called `name`.
    pub(crate) fn meta(&self, name: &str) -> Option<&Bytes> {
        self.meta
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v)
    }

    fn meta_text(&self, name: &str) -> Option<String> {
        self.meta(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The first original field called `name`.
    pub(crate) fn field(&self, name: &[u8]) -> Option<&Bytes> {
        self.original
            .iter()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v)
    }

    pub(crate) fn source_stream(&self) -> Option<String> {
        self.meta_text("dlq_source_stream")
    }

    pub(crate) fn source_id(&self) -> Option<String> {
        self.meta_text("dlq_source_id")
    }

    pub(crate) fn reason(&self) -> String {
        self.meta_text("dlq_reason").unwrap_or_default()
    }

    pub(crate) fn attempts(&self) -> Option<u64> {
        self.meta_text("dlq_attempts")?.parse().ok()
    }

    pub(crate) fn stderr(&self) -> &[u8] {
        self.meta("dlq_stderr").map_or(&[][..], |v| v.as_ref())
    }

    /// When it was dead-lettered: `dlq_failed_at`, else the time in its DLQ id.
    pub(crate) fn failed_at_ms(&self) -> u64 {
        self.meta_text("dlq_failed_at")
            .and_then(|t| t.parse().ok())
            .or_else(|| id_ms(&self.id))
            .unwrap_or(0)
    }

    /// The handler's exit code: `dlq_exit_code` if present, else from the reason
    /// (`exit code 3`, or a worker's `... (exit code 3)`).
    pub(crate) fn exit_code(&self) -> Option<i32> {
        if let Some(code) = self
            .meta_text("dlq_exit_code")
            .and_then(|c| c.trim().parse().ok())
        {
            return Some(code);
        }
        exit_code_of(&self.reason())
    }

    /// How often it was replayed before (the loop guard field, 0 when absent).
    pub(crate) fn replays(&self) -> u64 {
        self.field(REPLAYS_FIELD.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The payload's first bytes for listings: the `payload` field, else the first field.
    pub(crate) fn payload_preview(&self) -> String {
        let value = self
            .field(b"payload")
            .or_else(|| self.original.first().map(|(_, v)| v));
        let value = value.map_or(&[][..], |v| v.as_ref());
        escape(&value[..value.len().min(200)])
    }

    /// The fields to add back to the source stream: the original ones in order, the
    /// replay count one higher, the replayed-from field set.
    pub(crate) fn replay_fields(&self) -> Vec<(Bytes, Bytes)> {
        let count = Bytes::from((self.replays() + 1).to_string());
        let from = Bytes::from(format!("{}/{}", self.dlq, self.id));
        let mut out = Vec::with_capacity(self.original.len() + 2);
        let (mut count_set, mut from_set) = (false, false);
        for (k, v) in &self.original {
            if k.as_ref() == REPLAYS_FIELD.as_bytes() {
                if !count_set {
                    out.push((k.clone(), count.clone()));
                    count_set = true;
                }
            } else if k.as_ref() == REPLAYED_FROM_FIELD.as_bytes() {
                if !from_set {
                    out.push((k.clone(), from.clone()));
                    from_set = true;
                }
            } else {
                out.push((k.clone(), v.clone()));
            }
        }
        if !count_set {
            out.push((Bytes::from_static(REPLAYS_FIELD.as_bytes()), count));
        }
        if !from_set {
            out.push((Bytes::from_static(REPLAYED_FROM_FIELD.as_bytes()), from));
        }
        out
    }

    /// Every field as one JSON object (binary values as `*_base64`).
    pub(crate) fn to_json(&self, now_ms: u64) -> Json {
        let failed_at = self.failed_at_ms();
        let mut obj = Map::new();
        obj.insert("dlq".into(), json!(self.dlq));
        obj.insert("id".into(), json!(self.id));
        obj.insert("source_stream".into(), json!(self.source_stream()));
        obj.insert("source_id".into(), json!(self.source_id()));
        obj.insert("group".into(), json!(self.meta_text("dlq_group")));
        obj.insert("consumer".into(), json!(self.meta_text("dlq_consumer")));
        obj.insert("attempts".into(), json!(self.attempts()));
        obj.insert("reason".into(), json!(self.reason()));
        obj.insert("exit_code".into(), json!(self.exit_code()));
        put_bytes(&mut obj, "stderr", self.stderr());
        obj.insert("failed_at".into(), json!(rfc3339(failed_at)));
        obj.insert("failed_at_ms".into(), json!(failed_at));
        obj.insert("age_ms".into(), json!(now_ms.saturating_sub(failed_at)));
        obj.insert("replays".into(), json!(self.replays()));
        obj.insert("fields".into(), Json::Array(pairs_json(&self.original)));
        obj.insert("dlq_fields".into(), Json::Array(pairs_json(&self.meta)));
        Json::Object(obj)
    }
}

/// `[{"name": ..., "value": ...}, ...]`, binary names or values as `*_base64`.
pub(crate) fn pairs_json(pairs: &[(Bytes, Bytes)]) -> Vec<Json> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut obj = Map::new();
            put_bytes(&mut obj, "name", k);
            put_bytes(&mut obj, "value", v);
            Json::Object(obj)
        })
        .collect()
}

/// The exit code in a reason: `exit code 3` or `worker exited (exit code 3)`.
pub(crate) fn exit_code_of(reason: &str) -> Option<i32> {
    let digits = |s: &str| -> Option<i32> {
        let end = s
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
            .map_or(s.len(), |(i, _)| i);
        s[..end].parse().ok()
    };
    if let Some(rest) = reason.strip_prefix("exit code ") {
        return digits(rest);
    }
    let at = reason.find("(exit code ")?;
    digits(&reason[at + "(exit code ".len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn daemon_entry(original: &[(&str, &str)], reason: &str) -> Entry {
        let mut fields: Vec<(Bytes, Bytes)> = original.iter().map(|(k, v)| (b(k), b(v))).collect();
        for (k, v) in [
            ("dlq_source_stream", "orders"),
            ("dlq_source_id", "5-0"),
            ("dlq_group", "g"),
            ("dlq_consumer", "c"),
            ("dlq_attempts", "3"),
            ("dlq_reason", reason),
            ("dlq_stderr", "boom\n"),
            ("dlq_failed_at", "1700000000000"),
        ] {
            fields.push((b(k), b(v)));
        }
        Entry {
            id: "9-0".into(),
            fields: Some(fields),
        }
    }

    #[test]
    fn splits_original_fields_from_the_daemon_block() {
        let e = DlqEntry::parse(
            "orders:dlq",
            daemon_entry(&[("payload", "x"), ("dlq_reason", "mine")], "exit code 3"),
        )
        .expect("entry");
        assert_eq!(
            e.original,
            vec![(b("payload"), b("x")), (b("dlq_reason"), b("mine"))]
        );
        assert_eq!(e.reason(), "exit code 3");
        assert_eq!(e.source_stream().as_deref(), Some("orders"));
        assert_eq!(e.attempts(), Some(3));
        assert_eq!(e.exit_code(), Some(3));
        assert_eq!(e.failed_at_ms(), 1_700_000_000_000);
        assert_eq!(e.replays(), 0);
    }

    #[test]
    fn replay_fields_keep_order_and_count_replays() {
        let e = DlqEntry::parse("d", daemon_entry(&[("a", "1"), ("b", "2")], "x")).expect("entry");
        assert_eq!(
            e.replay_fields(),
            vec![
                (b("a"), b("1")),
                (b("b"), b("2")),
                (b(REPLAYS_FIELD), b("1")),
                (b(REPLAYED_FROM_FIELD), b("d/9-0")),
            ]
        );
        let again = DlqEntry::parse(
            "d",
            daemon_entry(
                &[
                    ("a", "1"),
                    (REPLAYS_FIELD, "1"),
                    (REPLAYED_FROM_FIELD, "d/1-0"),
                    ("b", "2"),
                ],
                "x",
            ),
        )
        .expect("entry");
        assert_eq!(again.replays(), 1);
        assert_eq!(
            again.replay_fields(),
            vec![
                (b("a"), b("1")),
                (b(REPLAYS_FIELD), b("2")),
                (b(REPLAYED_FROM_FIELD), b("d/9-0")),
                (b("b"), b("2")),
            ]
        );
    }

    #[test]
    fn entries_not_written_by_the_daemon_are_all_original() {
        let e = DlqEntry::parse(
            "d",
            Entry {
                id: "1700000000001-0".into(),
                fields: Some(vec![(b("k"), b("v"))]),
            },
        )
        .expect("entry");
        assert!(e.meta.is_empty());
        assert_eq!(e.source_stream(), None);
        assert_eq!(e.failed_at_ms(), 1_700_000_000_001);
        assert!(
            DlqEntry::parse(
                "d",
                Entry {
                    id: "1-0".into(),
                    fields: None
                }
            )
            .is_none()
        );
    }

    #[test]
    fn exit_codes_from_reasons() {
        assert_eq!(exit_code_of("exit code 3"), Some(3));
        assert_eq!(exit_code_of("exit code -1"), Some(-1));
        assert_eq!(exit_code_of("worker exited (exit code 12)"), Some(12));
        assert_eq!(exit_code_of("killed by signal 9"), None);
        assert_eq!(exit_code_of("timeout after 30s"), None);
    }
}
