//! Decoding Redis replies into our types.
//!
//! Every payload stays bytes from the wire to the handler: nothing here assumes UTF-8
//! except entry ids and names, which Redis defines as text. Replies are walked by hand
//! (never fred's `*_map` helpers): field order and duplicate names are kept, deleted
//! entries (`[id, nil]`) are kept, and a malformed reply is an error, never a panic.

use bytes::Bytes;
use fred::types::Value;

use super::RedisError;

/// One stream entry as read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    /// Field/value pairs in stream order, as bytes. `None` for an entry that is still in
    /// our pending list but was deleted from the stream (XDEL/XTRIM): Redis then returns
    /// nil fields, and there is nothing to hand to a handler.
    pub fields: Option<Vec<(Bytes, Bytes)>>,
}

impl Entry {
    /// The value of the first field called `name`.
    pub fn field(&self, name: &[u8]) -> Option<&Bytes> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v)
    }
}

/// One row of `XPENDING key group start end count` (the extended form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    /// Redis's delivery counter: how many times the entry was handed to a consumer.
    pub deliveries: u64,
}

/// The parts of an `XAUTOCLAIM` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoClaim {
    pub next_cursor: String,
    pub entries: Vec<Entry>,
    pub deleted: Vec<String>,
}

/// One row of `XINFO CONSUMERS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// Parses `[cursor, entries, deleted-ids]` (Redis 7) or `[cursor, entries]` (6.2).
pub fn parse_autoclaim_reply(reply: Value) -> Result<AutoClaim, RedisError> {
    const CMD: &str = "XAUTOCLAIM";
    let Value::Array(parts) = reply else {
        return Err(unexpected(CMD, &reply));
    };
    let mut parts = parts.into_iter();
    let next_cursor = text(parts.next().unwrap_or(Value::Null), CMD)?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Null), CMD)?;
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids
            .into_iter()
            .map(|id| text(id, CMD))
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    Ok(AutoClaim {
        next_cursor,
        entries,
        deleted,
    })
}

/// Parses `XINFO CONSUMERS`.
pub fn parse_consumers_reply(reply: Value) -> Result<Vec<ConsumerInfo>, RedisError> {
    const CMD: &str = "XINFO CONSUMERS";
    let mut out = Vec::new();
    for row in rows_of_pairs(reply, CMD)? {
        let mut info = ConsumerInfo {
            name: String::new(),
            pending: 0,
            idle_ms: 0,
        };
        for (key, value) in row {
            match key.as_str() {
                "name" => info.name = text(value, CMD)?,
                "pending" => info.pending = integer(value, CMD)?,
                "idle" => info.idle_ms = integer(value, CMD)?,
                _ => {}
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// The `XINFO` reply shape: a list of rows, each a flat `[k, v, k, v...]` array (RESP2)
/// or a map, as (key, value) pairs. Nil is no rows.
pub(crate) fn rows_of_pairs(
    reply: Value,
    command: &'static str,
) -> Result<Vec<Vec<(String, Value)>>, RedisError> {
    let rows = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(rows) => rows,
        other => return Err(unexpected(command, &other)),
    };
    rows.into_iter()
        .map(|row| match row {
            Value::Array(flat) => {
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                let mut iter = flat.into_iter();
                while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                    pairs.push((text(k, command)?, v));
                }
                Ok(pairs)
            }
            Value::Map(map) => Ok(map
                .inner()
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(k.as_bytes()).into_owned(), v))
                .collect()),
            other => Err(unexpected(command, &other)),
        })
        .collect()
}

/// Parses an `XREADGROUP` reply: `[[key, [[id, [f, v, ...]], ...]]]` (RESP2) or a map of
/// key to entries (RESP3). Nil means the block timed out.
pub fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, RedisError> {
    match reply {
        Value::Null => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for stream in streams {
                match stream {
                    Value::Array(mut pair) if pair.len() == 2 => out.extend(parse_entries(
                        pair.pop().unwrap_or(Value::Null),
                        "XREADGROUP",
                    )?),
                    other => return Err(unexpected("XREADGROUP", &other)),
                }
            }
            Ok(out)
        }
        Value::Map(map) => {
            let mut out = Vec::new();
            for (_, entries) in map.inner() {
                out.extend(parse_entries(entries, "XREADGROUP")?);
            }
            Ok(out)
        }
        other => Err(unexpected("XREADGROUP", &other)),
    }
}

/// Parses a list of entries `[[id, [f, v, ...] | nil], ...]`.
pub fn parse_entries(reply: Value, command: &'static str) -> Result<Vec<Entry>, RedisError> {
    let items = list(reply, command)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(unexpected(command, &item));
        };
        if pair.len() != 2 {
            return Err(unexpected(command, &Value::Array(pair)));
        }
        let raw_fields = pair.pop().unwrap_or(Value::Null);
        let id = text(pair.pop().unwrap_or(Value::Null), command)?;
        let fields = match raw_fields {
            Value::Null => None,
            Value::Array(flat) if flat.len() % 2 == 0 => {
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut iter = flat.into_iter();
                while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                    fields.push((bytes(k, command)?, bytes(v, command)?));
                }
                Some(fields)
            }
            Value::Map(map) => {
                let mut fields = Vec::new();
                for (k, v) in map.inner() {
                    fields.push((Bytes::copy_from_slice(k.as_bytes()), bytes(v, command)?));
                }
                Some(fields)
            }
            other => return Err(unexpected(command, &other)),
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

/// Parses the extended `XPENDING` reply: `[[id, consumer, idle, deliveries], ...]`.
pub fn parse_pending_reply(reply: Value) -> Result<Vec<PendingEntry>, RedisError> {
    const CMD: &str = "XPENDING";
    let items = list(reply, CMD)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(row) = item else {
            return Err(unexpected(CMD, &item));
        };
        let [id, consumer, idle, deliveries]: [Value; 4] = row
            .try_into()
            .map_err(|row: Vec<Value>| unexpected(CMD, &Value::Array(row)))?;
        out.push(PendingEntry {
            id: text(id, CMD)?,
            consumer: text(consumer, CMD)?,
            idle_ms: integer(idle, CMD)?,
            deliveries: integer(deliveries, CMD)?,
        });
    }
    Ok(out)
}

/// A reply that is a list, where nil means an empty one.
fn list(reply: Value, command: &'static str) -> Result<Vec<Value>, RedisError> {
    match reply {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => Ok(items),
        other => Err(unexpected(command, &other)),
    }
}

fn bytes(value: Value, command: &'static str) -> Result<Bytes, RedisError> {
    match value {
        Value::Bytes(b) => Ok(b),
        Value::String(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Value::Integer(i) => Ok(Bytes::from(i.to_string())),
        Value::Double(d) => Ok(Bytes::from(d.to_string())),
        other => Err(unexpected(command, &other)),
    }
}

pub(crate) fn text(value: Value, command: &'static str) -> Result<String, RedisError> {
    let raw = bytes(value, command)?;
    String::from_utf8(raw.to_vec()).map_err(|_| RedisError::Reply {
        command,
        reply: "non-UTF-8 id or name".into(),
    })
}

pub(super) fn integer(value: Value, command: &'static str) -> Result<u64, RedisError> {
    match value {
        Value::Integer(i) if i >= 0 => Ok(i as u64),
        other => {
            let raw = bytes(other, command)?;
            std::str::from_utf8(&raw)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| RedisError::Reply {
                    command,
                    reply: "expected an integer".into(),
                })
        }
    }
}

/// At most this many characters of an unexpected reply go into the error.
const REPLY_EXCERPT_CHARS: usize = 200;

pub(crate) fn unexpected(command: &'static str, value: &Value) -> RedisError {
    // Cut at a character, never at a byte: the reply is foreign text.
    let reply = format!("{value:?}")
        .chars()
        .take(REPLY_EXCERPT_CHARS)
        .collect();
    RedisError::Reply { command, reply }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn read_reply_keeps_bytes_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    b("1-0"),
                    Value::Array(vec![
                        b("payload"),
                        Value::Bytes(Bytes::from_static(&[0, 255])),
                    ]),
                ]),
                Value::Array(vec![b("2-0"), Value::Null]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).expect("parses");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(
            entries[0].field(b"payload").map(|v| v.as_ref()),
            Some(&[0u8, 255][..])
        );
        assert_eq!(entries[1].fields, None);
        assert!(parse_read_reply(Value::Null).expect("nil").is_empty());
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse_read_reply(Value::Integer(3)).is_err());
        assert!(parse_read_reply(Value::Array(vec![Value::Integer(1)])).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![b("1-0")])]), "X").is_err());
        assert!(
            parse_entries(
                Value::Array(vec![Value::Array(vec![
                    b("1-0"),
                    Value::Array(vec![b("odd")])
                ])]),
                "X"
            )
            .is_err()
        );
        assert!(parse_pending_reply(Value::Array(vec![Value::Array(vec![b("1-0")])])).is_err());
    }

    #[test]
    fn unexpected_reply_excerpt_cuts_at_characters() {
        let long = Value::String("é".repeat(300).into());
        match parse_read_reply(long) {
            Err(RedisError::Reply { reply, .. }) => {
                assert_eq!(reply.chars().count(), REPLY_EXCERPT_CHARS)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn autoclaim_reply_with_deleted_ids() {
        let reply = Value::Array(vec![
            b("0-0"),
            Value::Array(vec![Value::Array(vec![
                b("3-0"),
                Value::Array(vec![b("payload"), b("x")]),
            ])]),
            Value::Array(vec![b("2-0")]),
        ]);
        let claim = parse_autoclaim_reply(reply).expect("parses");
        assert_eq!(claim.next_cursor, "0-0");
        assert_eq!(claim.entries.len(), 1);
        assert_eq!(claim.deleted, vec!["2-0".to_string()]);
    }

    #[test]
    fn consumers_reply() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("name"),
            b("w1"),
            b("pending"),
            Value::Integer(2),
            b("idle"),
            Value::Integer(99),
            b("inactive"),
            Value::Integer(5),
        ])]);
        assert_eq!(
            parse_consumers_reply(reply).expect("parses"),
            vec![ConsumerInfo {
                name: "w1".into(),
                pending: 2,
                idle_ms: 99
            }]
        );
    }

    #[test]
    fn pending_reply() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("5-1"),
            b("worker-a"),
            Value::Integer(1500),
            Value::Integer(2),
        ])]);
        assert_eq!(
            parse_pending_reply(reply).expect("parses"),
            vec![PendingEntry {
                id: "5-1".into(),
                consumer: "worker-a".into(),
                idle_ms: 1500,
                deliveries: 2
            }]
        );
    }
}
