//! What a handler reads on stdin, derived from a stream entry.
//!
//! `payload = "field"` passes one field's raw bytes; `payload = "entry"` passes the whole
//! entry as one JSON object. An entry that cannot be turned into stdin can never succeed,
//! so the error here becomes the DLQ reason and the entry is not retried.

use bytes::Bytes;

use crate::config::PayloadMode;
use crate::redis::Entry;

/// Builds the stdin bytes for `entry` of `stream`. `Err` is the DLQ reason.
pub fn stdin_for(
    mode: PayloadMode,
    field: &str,
    stream: &str,
    entry: &Entry,
) -> Result<Bytes, String> {
    match mode {
        PayloadMode::Field => entry
            .field(field.as_bytes())
            .cloned()
            .ok_or_else(|| format!("missing field {field:?}")),
        PayloadMode::Entry => entry_json(stream, entry).map(Bytes::from),
    }
}

fn entry_json(stream: &str, entry: &Entry) -> Result<Vec<u8>, String> {
    let mut fields = serde_json::Map::new();
    for (name, value) in entry.fields.iter().flatten() {
        let name = std::str::from_utf8(name)
            .map_err(|_| format!("field name {} is not valid UTF-8", escape(name)))?;
        let value =
            std::str::from_utf8(value).map_err(|_| format!("field {name:?} is not valid UTF-8"))?;
        fields.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
    }
    let doc = serde_json::json!({ "id": entry.id, "stream": stream, "fields": fields });
    serde_json::to_vec(&doc).map_err(|e| format!("cannot encode entry as JSON: {e}"))
}

fn escape(raw: &[u8]) -> String {
    raw.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&[u8], &[u8])]) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn field_mode_passes_raw_bytes() {
        let e = entry(&[(b"payload", &[0, 159, 255])]);
        let out = stdin_for(PayloadMode::Field, "payload", "s", &e).expect("present");
        assert_eq!(out.as_ref(), &[0, 159, 255]);
        assert_eq!(
            stdin_for(PayloadMode::Field, "body", "s", &e),
            Err("missing field \"body\"".to_string())
        );
    }

    #[test]
    fn entry_mode_is_json_and_rejects_non_utf8() {
        let e = entry(&[(b"a", b"1"), (b"b", "ü".as_bytes())]);
        let out = stdin_for(PayloadMode::Entry, "payload", "orders", &e).expect("json");
        let doc: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(doc["id"], "1-0");
        assert_eq!(doc["stream"], "orders");
        assert_eq!(doc["fields"]["b"], "ü");
        let bad = entry(&[(b"a", &[0xff])]);
        let err = stdin_for(PayloadMode::Entry, "payload", "orders", &bad).unwrap_err();
        assert!(err.contains("not valid UTF-8"), "{err}");
    }
}
