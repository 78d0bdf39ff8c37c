//! Redis connections and the stream commands the daemon speaks.
//!
//! Owns the fred clients and the translation between Redis replies and our types. Every
//! payload stays bytes from the wire to the handler: nothing here assumes UTF-8 except
//! entry ids, which Redis defines as `<ms>-<seq>` text.
//!
//! Two kinds of client exist: one *reader* per stream, which spends its life inside
//! `XREADGROUP BLOCK` (fred queues any other command sent on a client that is blocked, so
//! a shared one would stall acks for up to `block`), and one shared *command* client for
//! acks, claims and dead-letter writes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientInterface, ClientLike, Config as FredConfig, Error as FredError,
    EventInterface, ReconnectPolicy, StreamsInterface, TransactionInterface,
};
use fred::types::{ClientUnblockFlag, Value};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::identity::Consumer;

/// Errors from talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis url: {0}")]
    Url(String),
    #[error("redis unreachable for {waited:?} (connect_timeout): {last}")]
    ConnectTimeout { waited: Duration, last: String },
    #[error("stopped while connecting to redis")]
    Stopped,
    #[error(transparent)]
    Command(#[from] FredError),
    #[error("unexpected reply to {command}: {reply}")]
    Reply {
        command: &'static str,
        reply: String,
    },
}

impl RedisError {
    /// The group (or its stream) was deleted under us: recreate it.
    pub fn is_nogroup(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("NOGROUP"))
    }

    /// The key holds something other than a stream: a configuration mistake that no
    /// retry can fix.
    pub fn is_wrongtype(&self) -> bool {
        matches!(self, RedisError::Command(e) if e.details().starts_with("WRONGTYPE"))
    }
}

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

/// Connects a new client, retrying with backoff until it works, `connect_timeout` passes
/// or `stop` is cancelled. Once connected, the client reconnects by itself forever, and
/// commands sent meanwhile wait for the connection to come back.
pub async fn connect(cfg: &RedisConfig, stop: &CancellationToken) -> Result<Client, RedisError> {
    let fred_config = FredConfig::from_url(&cfg.url).map_err(|e| {
        // fred's message may quote the URL; never let the password reach a log line.
        RedisError::Url(format!("{} ({:?})", cfg.redacted_url(), e.kind()))
    })?;
    let started = Instant::now();
    let mut backoff = Backoff::redis();
    loop {
        let client = Builder::from_config(fred_config.clone())
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            // Each client's event channels are allocated up front; we listen to two,
            // and a lagged receiver is handled. With one client per stream this is
            // most of an idle daemon's per-stream memory.
            .with_performance_config(|perf| perf.broadcast_channel_capacity = 4)
            .build()?;
        let attempt = tokio::select! {
            r = client.init() => r,
            _ = stop.cancelled() => return Err(RedisError::Stopped),
        };
        match attempt {
            Ok(_handle) => return Ok(client),
            Err(e) => {
                let waited = started.elapsed();
                // Never sleep past connect_timeout: the last wait is cut to what is left.
                let left = cfg
                    .connect_timeout
                    .map(|limit| limit.saturating_sub(waited));
                if left.is_some_and(|left| left.is_zero()) {
                    return Err(RedisError::ConnectTimeout {
                        waited,
                        last: e.to_string(),
                    });
                }
                let delay = backoff.fail();
                let delay = left.map_or(delay, |left| delay.min(left));
                tracing::warn!(
                    redis = %cfg.redacted_url(),
                    error = %e,
                    retry_in = ?delay,
                    "redis unreachable, retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(RedisError::Stopped),
                }
            }
        }
    }
}

/// Logs connection loss and recovery of `client` until it is dropped, and tells
/// `on_change` (false: lost, true: connected again), e.g. for health and metrics.
pub fn watch_connection(
    client: &Client,
    role: &'static str,
    on_change: impl Fn(bool) + Send + 'static,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                e = errors.recv() => match e {
                    Ok((error, _)) => {
                        tracing::warn!(role, %error, "redis connection lost");
                        on_change(false);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                r = reconnects.recv() => match r {
                    Ok(_) => {
                        tracing::info!(role, "redis connection restored");
                        on_change(true);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
}

/// The stream commands for one (stream, group, consumer).
#[derive(Clone)]
pub struct StreamCommands {
    client: Client,
    /// The consumer these commands act as.
    pub(crate) who: Consumer,
}

impl StreamCommands {
    pub(crate) fn new(client: Client, who: Consumer) -> Self {
        StreamCommands { client, who }
    }

    /// `XGROUP CREATE ... MKSTREAM`; an existing group is fine. Returns true if created.
    pub async fn ensure_group(&self, start_id: &str) -> Result<bool, RedisError> {
        let created: Result<Value, FredError> = self
            .client
            .xgroup_create(&self.who.stream, &self.who.group, start_id, true)
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if e.details().starts_with("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS key id`. `id` is `>` for new
    /// entries or an id to page through our own pending list.
    pub async fn read(
        &self,
        count: usize,
        block: Option<Duration>,
        id: &str,
    ) -> Result<Vec<Entry>, RedisError> {
        let block_ms = block.map(|b| (b.as_millis() as u64).max(1));
        let reply: Value = self
            .client
            .xreadgroup(
                &self.who.group,
                &self.who.name,
                Some(count as u64),
                block_ms,
                false,
                &self.who.stream,
                id,
            )
            .await?;
        parse_read_reply(reply)
    }

    /// Ends a blocking read on this client's connection early, as if its BLOCK had timed
    /// out (no entries delivered). fred sends `CLIENT UNBLOCK id TIMEOUT` on a side
    /// connection. Not being blocked is fine.
    pub async fn unblock(&self) {
        if let Err(error) = self
            .client
            .unblock_self(Some(ClientUnblockFlag::Timeout))
            .await
        {
            tracing::trace!(%error, "CLIENT UNBLOCK");
        }
    }

    /// Hears about every reconnect of this client's connection.
    pub fn reconnects(&self) -> tokio::sync::broadcast::Receiver<fred::types::config::Server> {
        self.client.reconnect_rx()
    }

    /// Confirms `id` is still ours by claiming it to ourselves with JUSTID (delivery
    /// counter untouched, idle time reset), only if it has been idle at least `min_idle`:
    /// a claim by anyone else since then makes this a no-op. Returns whether it is ours.
    pub async fn reclaim_quietly(&self, id: &str, min_idle: Duration) -> Result<bool, RedisError> {
        let reply = self.xclaim(id, min_idle, true).await?;
        Ok(matches!(reply, Value::Array(ids) if !ids.is_empty()))
    }

    /// The entry `id` read with XRANGE (no effect on the pending list). `fields` is
    /// `None` when it was deleted from the stream.
    pub async fn entry(&self, id: &str) -> Result<Entry, RedisError> {
        let reply: Value = self
            .client
            .xrange(&self.who.stream, id, id, Some(1))
            .await?;
        let found = parse_entries(reply, "XRANGE")?.into_iter().next();
        Ok(found.unwrap_or_else(|| Entry {
            id: id.to_owned(),
            fields: None,
        }))
    }

    /// Closes this client's connection (bounded: Redis may be down).
    pub async fn quit(&self) {
        if tokio::time::timeout(Duration::from_secs(5), self.client.quit())
            .await
            .is_err()
        {
            tracing::debug!(stream = %self.who.stream, "redis connection did not close in time");
        }
    }

    /// `XACK` for a batch of ids. Returns how many were still pending.
    pub async fn ack(&self, ids: &[String]) -> Result<u64, RedisError> {
        Ok(self
            .client
            .xack(&self.who.stream, &self.who.group, ids.to_vec())
            .await?)
    }

    /// The pending-list row of one entry, if it is still pending in the group.
    pub async fn pending_entry(&self, id: &str) -> Result<Option<PendingEntry>, RedisError> {
        let reply: Value = self
            .client
            .xpending(&self.who.stream, &self.who.group, (id, id, 1))
            .await?;
        Ok(parse_pending_reply(reply)?.into_iter().next())
    }

    /// This consumer's pending rows between `start` and `end` (inclusive), at most `count`.
    pub async fn my_pending(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, RedisError> {
        let reply: Value = self
            .client
            .xpending(
                &self.who.stream,
                &self.who.group,
                (start, end, count as u64, self.who.name.as_str()),
            )
            .await?;
        parse_pending_reply(reply)
    }

    /// Takes `id` over for this consumer if it has been idle at least `min_idle` (so a
    /// concurrent claim by someone else makes this one a no-op), incrementing its delivery
    /// counter and returning its fields. `None` when the claim did not happen or the entry
    /// was deleted.
    pub async fn claim(&self, id: &str, min_idle: Duration) -> Result<Option<Entry>, RedisError> {
        let reply = self.xclaim(id, min_idle, false).await?;
        Ok(parse_entries(reply, "XCLAIM")?
            .into_iter()
            .find(|e| e.fields.is_some()))
    }

    /// `XCLAIM key group <us> <min_idle> <ids...> [JUSTID]`: takes entries idle at least
    /// `min_idle` to this consumer. Without JUSTID their delivery counters go up and the
    /// entries come back; with it only their ids, counters untouched.
    async fn xclaim(
        &self,
        ids: impl Into<fred::types::streams::MultipleIDs> + Send,
        min_idle: Duration,
        justid: bool,
    ) -> Result<Value, RedisError> {
        Ok(self
            .client
            .xclaim(
                &self.who.stream,
                &self.who.group,
                &self.who.name,
                min_idle.as_millis() as u64,
                ids,
                None,
                None,
                None,
                false,
                justid,
            )
            .await?)
    }

    /// Resets the idle time of entries whose handlers are running here (`XCLAIM ... JUSTID`
    /// to ourselves), so other consumers' XAUTOCLAIM never takes a healthy entry. JUSTID
    /// leaves the delivery counter alone.
    pub async fn touch(&self, ids: Vec<String>) -> Result<(), RedisError> {
        self.xclaim(ids, Duration::ZERO, true).await?;
        Ok(())
    }

    /// One `XAUTOCLAIM` step from `cursor`: entries idle at least `min_idle` move to us
    /// (delivery counters + 1). Returns the next cursor (`0-0` when the scan is complete),
    /// the claimed entries, and the ids Redis found deleted from the stream (Redis 7 drops
    /// those from the pending list by itself; fred's typed helper loses this third part).
    pub async fn autoclaim(
        &self,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<AutoClaim, RedisError> {
        let reply: Value = self
            .client
            .xautoclaim(
                &self.who.stream,
                &self.who.group,
                &self.who.name,
                min_idle.as_millis() as u64,
                cursor,
                Some(count as u64),
                false,
            )
            .await?;
        parse_autoclaim_reply(reply)
    }

    /// `(pending, lag)` of our group from `XINFO GROUPS`; lag is `None` when Redis cannot
    /// tell (it may not after trims or deletions; Redis 6.2 has no lag at all).
    pub async fn group_stats(&self) -> Result<Option<(u64, Option<u64>)>, RedisError> {
        const CMD: &str = "XINFO GROUPS";
        let reply: Value = self.client.xinfo_groups(&self.who.stream).await?;
        for row in rows_of_pairs(reply, CMD)? {
            let mut name = None;
            let (mut pending, mut lag) = (0, None);
            for (key, value) in row {
                match key.as_str() {
                    "name" => name = Some(text(value, CMD)?),
                    "pending" => pending = integer(value, CMD)?,
                    "lag" => lag = integer(value, CMD).ok(),
                    _ => {}
                }
            }
            if name.as_deref() == Some(self.who.group.as_str()) {
                return Ok(Some((pending, lag)));
            }
        }
        Ok(None)
    }

    /// Consumers of the group: (name, pending, idle_ms).
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>, RedisError> {
        let reply: Value = self
            .client
            .xinfo_consumers(&self.who.stream, &self.who.group)
            .await?;
        parse_consumers_reply(reply)
    }

    /// `XGROUP DELCONSUMER`; returns how many pending entries the consumer had.
    pub async fn delete_consumer(&self, name: &str) -> Result<u64, RedisError> {
        Ok(self
            .client
            .xgroup_delconsumer(&self.who.stream, &self.who.group, name)
            .await?)
    }

    /// Writes `fields` to the dead-letter stream and acks `id` in one MULTI/EXEC, so the
    /// entry is never both dead-lettered and pending (no duplicate DLQ entries on retry).
    pub async fn dead_letter(
        &self,
        dlq: &str,
        id: &str,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<(), RedisError> {
        let tx = self.client.multi();
        let _: Value = tx.xadd(dlq, false, None::<()>, "*", fields).await?;
        let _: Value = tx.xack(&self.who.stream, &self.who.group, id).await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }
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
/// or a map, as (key, value) pairs.
fn rows_of_pairs(
    reply: Value,
    command: &'static str,
) -> Result<Vec<Vec<(String, Value)>>, RedisError> {
    let Value::Array(rows) = reply else {
        return Err(unexpected(command, &reply));
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

fn text(value: Value, command: &'static str) -> Result<String, RedisError> {
    let raw = bytes(value, command)?;
    String::from_utf8(raw.to_vec()).map_err(|_| RedisError::Reply {
        command,
        reply: "non-UTF-8 id or name".into(),
    })
}

fn integer(value: Value, command: &'static str) -> Result<u64, RedisError> {
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

fn unexpected(command: &'static str, value: &Value) -> RedisError {
    let mut reply = format!("{value:?}");
    reply.truncate(200);
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
