//! The dead-letter write: XADD to the DLQ, then XACK of the source entry, only if the
//! XADD worked.
//!
//! A MULTI/EXEC cannot do this: Redis does not roll a transaction back when one of its
//! commands fails at EXEC time, so an XADD refused with `WRONGTYPE` (the DLQ key holds a
//! string) still let the XACK run, and the entry was in neither the pending list nor the
//! DLQ. A Lua script stops at the first failing `redis.call`, so [`DEAD_LETTER_SCRIPT`]
//! is that step, atomically. It first checks that the entry is still pending for this
//! consumer, which makes it idempotent: fred re-sends a command that was in flight when
//! a connection dropped, and our own retry after an ambiguous failure does the same; a
//! second run finds the entry no longer pending and writes nothing.
//!
//! A script must name every key it touches, and in a Redis Cluster they must hash to one
//! slot. When the source and DLQ keys do not (no shared hash tag), or the entry has more
//! fields than a Lua call can take, the write is made in two steps instead
//! ([`DlqWrite::Split`]): check, XADD, then XACK. A crash between the last two leaves the
//! entry pending and dead-lettered, so it is dead-lettered again: a duplicate DLQ entry,
//! never a lost one.

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, LuaInterface, StreamsInterface};
use fred::types::Value;
use fred::util::redis_keyslot;

use super::RedisError;
use super::commands::StreamCommands;

/// KEYS: dlq, source stream. ARGV: group, id, consumer, then the DLQ entry's field/value
/// pairs. Returns `{dlq_id, xack_reply}` when written (the XACK reply being its count or,
/// if it failed, its error text), `{false, why}` when the entry is not pending for us.
const DEAD_LETTER_SCRIPT: &str = r#"
local pending = redis.pcall('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if type(pending) == 'table' and pending.err then
  return {false, pending.err}
end
local row = pending[1]
if row == nil then
  return {false, 'no longer pending'}
end
if row[2] ~= ARGV[3] then
  return {false, 'now pending for consumer ' .. row[2]}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
local acked = redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[2])
if type(acked) == 'table' and acked.err then
  return {id, acked.err}
end
return {id, acked}
"#;

/// Lua's `unpack` fails beyond about 8,000 values (LUAI_MAXCSTACK); entries with more
/// fields than this are written in two steps.
const MAX_SCRIPT_FIELDS: usize = 3_500;

/// How one entry's dead-letter write is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqWrite {
    /// One script: XADD and XACK atomically.
    Atomic,
    /// XADD, then XACK (keys in different cluster slots, or a huge entry).
    Split,
}

/// What a dead-letter write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetter {
    /// Written to the DLQ and acked.
    Done,
    /// Written to the DLQ, but the XACK failed (e.g. the group was deleted): the text.
    AckFailed(String),
    /// Not written, because the entry is no longer pending for this consumer: already
    /// dead-lettered (a re-sent write), acked, taken over by another consumer, or its
    /// group is gone. Why.
    Skipped(String),
}

impl StreamCommands {
    /// See [`split_slots`].
    pub(crate) fn split_slots(&self, dlq: &str) -> Option<(u16, u16)> {
        split_slots(&self.client, &self.who.stream, dlq)
    }

    /// How the dead-letter write of an entry with `fields` pairs goes to `dlq`.
    pub(crate) fn dlq_write(&self, dlq: &str, fields: usize) -> DlqWrite {
        if self.split_slots(dlq).is_some() || fields > MAX_SCRIPT_FIELDS {
            DlqWrite::Split
        } else {
            DlqWrite::Atomic
        }
    }

    /// The atomic dead-letter write (see the module doc).
    pub async fn dead_letter(
        &self,
        dlq: &str,
        id: &str,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<DeadLetter, RedisError> {
        let mut args: Vec<Value> = Vec::with_capacity(3 + 2 * fields.len());
        args.push(self.who.group.as_str().into());
        args.push(id.into());
        args.push(self.who.name.as_str().into());
        for (k, v) in fields {
            args.push(Value::Bytes(k));
            args.push(Value::Bytes(v));
        }
        let reply: Value = self
            .client
            .eval(
                DEAD_LETTER_SCRIPT,
                vec![dlq.to_owned(), self.who.stream.clone()],
                args,
            )
            .await?;
        parse_script_reply(reply)
    }

    /// Step one of a split write: `Some(why)` if the entry is no longer pending for this
    /// consumer, else the XADD of `fields` to `dlq`.
    pub(crate) async fn dead_letter_add(
        &self,
        dlq: &str,
        id: &str,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<Option<String>, RedisError> {
        match self.pending_entry(id).await? {
            None => return Ok(Some("no longer pending".to_string())),
            Some(row) if row.consumer != self.who.name => {
                return Ok(Some(format!("now pending for consumer {}", row.consumer)));
            }
            Some(_) => {}
        }
        let _: Value = self
            .client
            .xadd(dlq, false, None::<()>, "*", fields)
            .await?;
        Ok(None)
    }
}

/// Whether `stream` and `dlq` can be written by one script: always, except in a Redis
/// Cluster when they hash to different slots. Returns the two slots then.
pub(crate) fn split_slots(client: &Client, stream: &str, dlq: &str) -> Option<(u16, u16)> {
    if !client.is_clustered() {
        return None;
    }
    let (source_slot, dlq_slot) = (
        redis_keyslot(stream.as_bytes()),
        redis_keyslot(dlq.as_bytes()),
    );
    (source_slot != dlq_slot).then_some((source_slot, dlq_slot))
}

/// `{dlq_id, xack}` or `{nil, why}` (Lua's false is a nil reply).
fn parse_script_reply(reply: Value) -> Result<DeadLetter, RedisError> {
    let unexpected = |reply: &Value| RedisError::Reply {
        command: "EVAL (dead-letter)",
        reply: format!("{reply:?}").chars().take(200).collect(),
    };
    let Value::Array(parts) = &reply else {
        return Err(unexpected(&reply));
    };
    match parts.as_slice() {
        [Value::Null, why] => Ok(DeadLetter::Skipped(
            why.as_str().map(|s| s.into_owned()).unwrap_or_default(),
        )),
        [_, Value::Integer(_)] => Ok(DeadLetter::Done),
        [_, error] => Ok(DeadLetter::AckFailed(
            error.as_str().map(|s| s.into_owned()).unwrap_or_default(),
        )),
        _ => Err(unexpected(&reply)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fred::prelude::{Builder, KeysInterface};

    use super::*;
    use crate::identity::Consumer;
    use crate::test_support::RedisServer as Server;

    fn s(text: &str) -> Value {
        Value::String(text.into())
    }

    #[test]
    fn script_replies() {
        let done = Value::Array(vec![s("5-0"), Value::Integer(1)]);
        assert_eq!(parse_script_reply(done).ok(), Some(DeadLetter::Done));
        let ack_failed = Value::Array(vec![s("5-0"), s("NOGROUP no group")]);
        assert_eq!(
            parse_script_reply(ack_failed).ok(),
            Some(DeadLetter::AckFailed("NOGROUP no group".into()))
        );
        let skipped = Value::Array(vec![Value::Null, s("no longer pending")]);
        assert_eq!(
            parse_script_reply(skipped).ok(),
            Some(DeadLetter::Skipped("no longer pending".into()))
        );
        assert!(parse_script_reply(Value::Integer(1)).is_err());
        assert!(parse_script_reply(Value::Array(vec![])).is_err());
    }

    async fn client(server: &Server) -> Client {
        let client =
            Builder::from_config(fred::prelude::Config::from_url(&server.url()).expect("url"))
                .build()
                .expect("client");
        client.init().await.expect("connect");
        client
    }

    /// `s` with group `g`, one entry delivered to consumer `c`; its id.
    async fn delivered(client: &Client, consumer: &str) -> String {
        let _: Value = client
            .xgroup_create("s", "g", "$", true)
            .await
            .expect("group");
        let id: String = client
            .xadd("s", false, None::<()>, "*", vec![("payload", "x")])
            .await
            .expect("xadd");
        let _: Value = client
            .xreadgroup("g", consumer, Some(1), None, false, "s", ">")
            .await
            .expect("read");
        id
    }

    fn fields() -> Vec<(Bytes, Bytes)> {
        vec![(Bytes::from_static(b"payload"), Bytes::from_static(b"x"))]
    }

    async fn pending(client: &Client) -> u64 {
        let summary: Vec<Value> = client.xpending("s", "g", ()).await.expect("xpending");
        summary.first().and_then(|v| v.as_u64()).unwrap_or(0)
    }

    #[tokio::test]
    async fn acks_only_what_it_wrote_and_writes_once() {
        let server = Server::start();
        let client = client(&server).await;
        let id = delivered(&client, "c").await;
        let cmds = StreamCommands::new(client.clone(), Consumer::new("s", "g", "c"));
        assert_eq!(cmds.dlq_write("s:dlq", 1), DlqWrite::Atomic);

        // The DLQ key holds a string: the XADD fails and the entry stays pending.
        let _: () = client
            .set("s:dlq", "x", None, None, false)
            .await
            .expect("set");
        let error = cmds.dead_letter("s:dlq", &id, fields()).await;
        assert!(
            matches!(&error, Err(e) if e.to_string().contains("WRONGTYPE")),
            "{error:?}"
        );
        assert_eq!(pending(&client).await, 1);

        let _: i64 = client.del("s:dlq").await.expect("del");
        let done = cmds
            .dead_letter("s:dlq", &id, fields())
            .await
            .expect("write");
        assert_eq!(done, DeadLetter::Done);
        assert_eq!(pending(&client).await, 0);
        // Sent again (a retry after a lost reply): nothing more is written.
        let again = cmds
            .dead_letter("s:dlq", &id, fields())
            .await
            .expect("write");
        assert_eq!(again, DeadLetter::Skipped("no longer pending".into()));
        let len: u64 = client.xlen("s:dlq").await.expect("xlen");
        assert_eq!(len, 1);
    }

    #[tokio::test]
    async fn an_entry_another_consumer_took_is_left_to_it() {
        let server = Server::start();
        let client = client(&server).await;
        let id = delivered(&client, "other").await;
        let cmds = StreamCommands::new(client.clone(), Consumer::new("s", "g", "c"));
        let outcome = cmds
            .dead_letter("s:dlq", &id, fields())
            .await
            .expect("write");
        assert_eq!(
            outcome,
            DeadLetter::Skipped("now pending for consumer other".into())
        );
        assert_eq!(
            cmds.dead_letter_add("s:dlq", &id, fields())
                .await
                .expect("add"),
            Some("now pending for consumer other".into())
        );
        let len: u64 = client.xlen("s:dlq").await.expect("xlen");
        assert_eq!((len, pending(&client).await), (0, 1));
    }

    #[tokio::test]
    async fn entries_too_large_for_a_script_are_written_in_two_steps() {
        let server = Server::start();
        let client = client(&server).await;
        let cmds = StreamCommands::new(client.clone(), Consumer::new("s", "g", "c"));
        assert_eq!(
            cmds.dlq_write("s:dlq", MAX_SCRIPT_FIELDS + 1),
            DlqWrite::Split
        );
        // The script itself handles the largest entries it is given.
        let id = delivered(&client, "c").await;
        let many: Vec<(Bytes, Bytes)> = (0..MAX_SCRIPT_FIELDS)
            .map(|i| (Bytes::from(format!("f{i}")), Bytes::from_static(b"v")))
            .collect();
        let done = tokio::time::timeout(
            Duration::from_secs(30),
            cmds.dead_letter("s:dlq", &id, many),
        )
        .await
        .expect("in time")
        .expect("write");
        assert_eq!(done, DeadLetter::Done);
    }
}
