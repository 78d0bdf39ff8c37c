//! The Redis side of the operator commands: one client from [`crate::redis::connect`]
//! (so every deployment the daemon supports works here too), bounded waits (an operator
//! command never hangs on an outage: it fails with exit 69), and the few commands the
//! commands need, binary-safe.
//!
//! Only fred's client API is used, never a node address: in Cluster each command goes to
//! the slot of its key. The one multi-key operation, the atomic replay script, runs only
//! where both keys share a slot (see [`Conn::atomic_replay_possible`]).

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::Options;
use fred::prelude::{Client, ClientLike, StreamsInterface};
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio_util::sync::CancellationToken;

use super::AdminError;
use crate::config::RedisConfig;
use crate::redis::reply::{rows_of_pairs as rows, text as redis_text, unexpected};
use crate::redis::{ConsumerInfo, Entry, RedisError, parse_consumers_reply, parse_entries};

/// A reply's text, or an error naming the command.
fn text(v: Value, command: &'static str) -> Result<String, AdminError> {
    Ok(redis_text(v, command)?)
}

/// An unexpected reply to `command`.
fn unexpected_reply(command: &'static str, value: &Value) -> AdminError {
    AdminError::Redis(unexpected(command, value))
}

/// How long an operator command waits for Redis at start when the config sets no
/// shorter `connect_timeout`.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long one command may take before the operator command gives up (exit 69).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// The atomic replay: re-adds the entry to its source stream and deletes it from the
/// DLQ, only if it is still in the DLQ (so a retried or repeated call never adds twice).
/// KEYS: dlq, source. ARGV: dlq id, then field, value, ...
const REPLAY_SCRIPT: &str = "\
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id";

/// One group of `XINFO GROUPS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupInfo {
    pub(crate) name: String,
    pub(crate) pending: u64,
    /// `None` when Redis cannot tell (after some deletions; Redis 6.2).
    pub(crate) lag: Option<u64>,
    pub(crate) last_delivered: String,
}

/// The summary form of `XPENDING`: count and the oldest pending id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PendingSummary {
    pub(crate) count: u64,
    pub(crate) oldest: Option<String>,
}

/// A connected client with bounded commands.
pub(crate) struct Conn {
    client: Client,
    /// Reads and idempotent writes: bounded, retried by fred after a reconnect.
    normal: Options,
    /// A write that must not be repeated behind our back (XADD): one attempt only, so
    /// an error means "maybe written", which the caller resolves.
    once: Options,
}

impl Conn {
    /// Connects, waiting at most `connect_timeout` (or [`CONNECT_WAIT`] when that is
    /// unset or longer).
    pub(crate) async fn connect(cfg: &RedisConfig) -> Result<Conn, AdminError> {
        let mut cfg = cfg.clone();
        cfg.connect_timeout = Some(
            cfg.connect_timeout
                .map_or(CONNECT_WAIT, |t| t.min(CONNECT_WAIT)),
        );
        let client = crate::redis::connect(&cfg, &CancellationToken::new())
            .await
            .map_err(|e| match e {
                // A URL or TLS file the daemon would refuse too (it exits 78 on them).
                e if e.is_config() => AdminError::Config(e.to_string()),
                other => AdminError::Unavailable(other.to_string()),
            })?;
        let normal = Options {
            timeout: Some(COMMAND_TIMEOUT),
            ..Default::default()
        };
        let once = Options {
            max_attempts: Some(1),
            ..normal.clone()
        };
        Ok(Conn {
            client,
            normal,
            once,
        })
    }

    /// Closes the connection (bounded).
    pub(crate) async fn quit(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.quit()).await;
    }

    /// Whether an entry of `dlq` can go back to `source` in one atomic script: always on
    /// one server, in Cluster only when both keys hash to the same slot.
    pub(crate) fn atomic_replay_possible(&self, dlq: &str, source: &str) -> bool {
        !self.client.is_clustered()
            || fred::util::redis_keyslot(dlq.as_bytes())
                == fred::util::redis_keyslot(source.as_bytes())
    }

    async fn custom(
        &self,
        name: &'static str,
        hash: ClusterHash,
        args: Vec<Value>,
        opts: &Options,
    ) -> Result<Value, AdminError> {
        let cmd = CustomCommand::new_static(name, hash, false);
        Ok(self
            .client
            .with_options(opts)
            .custom::<Value, Value>(cmd, args)
            .await
            .map_err(RedisError::from)?)
    }

    /// `XRANGE key start end COUNT n`, binary-safe; entries without fields are dropped.
    pub(crate) async fn range(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: u64,
    ) -> Result<Vec<Entry>, AdminError> {
        let reply: Value = self
            .client
            .with_options(&self.normal)
            .xrange(key, start, end, Some(count))
            .await
            .map_err(RedisError::from)?;
        Ok(parse_entries(reply, "XRANGE")?)
    }

    /// The entry `id` of `key`, if it exists.
    pub(crate) async fn entry(&self, key: &str, id: &str) -> Result<Option<Entry>, AdminError> {
        Ok(self
            .range(key, id, id, 1)
            .await?
            .into_iter()
            .find(|e| e.fields.is_some()))
    }

    /// The newest entry of `key`.
    pub(crate) async fn newest(&self, key: &str) -> Result<Option<Entry>, AdminError> {
        let reply: Value = self
            .client
            .with_options(&self.normal)
            .xrevrange(key, "+", "-", Some(1))
            .await
            .map_err(RedisError::from)?;
        Ok(parse_entries(reply, "XREVRANGE")?.into_iter().next())
    }

    pub(crate) async fn xlen(&self, key: &str) -> Result<u64, AdminError> {
        Ok(self
            .client
            .with_options(&self.normal)
            .xlen(key)
            .await
            .map_err(RedisError::from)?)
    }

    /// `XADD key * fields...`, one attempt: an error means it may or may not be written.
    pub(crate) async fn xadd_once(
        &self,
        key: &str,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<String, AdminError> {
        let mut args: Vec<Value> = vec![key.into(), "*".into()];
        push_fields(&mut args, fields);
        let reply = self
            .custom("XADD", ClusterHash::FirstKey, args, &self.once)
            .await?;
        text(reply, "XADD")
    }

    /// Appends an audit entry (text fields).
    pub(crate) async fn xadd_text(
        &self,
        key: &str,
        fields: &[(&str, String)],
    ) -> Result<String, AdminError> {
        let mut args: Vec<Value> = vec![key.into(), "*".into()];
        for (k, v) in fields {
            args.push((*k).into());
            args.push(v.as_str().into());
        }
        let reply = self
            .custom("XADD", ClusterHash::FirstKey, args, &self.once)
            .await?;
        text(reply, "XADD")
    }

    /// `XDEL key ids...`; returns how many existed.
    pub(crate) async fn xdel(&self, key: &str, ids: &[String]) -> Result<u64, AdminError> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(self
            .client
            .with_options(&self.normal)
            .xdel(key, ids.to_vec())
            .await
            .map_err(RedisError::from)?)
    }

    /// The atomic replay script: `Some(new id)`, or `None` when the entry was no longer in
    /// the DLQ (someone else moved or purged it).
    pub(crate) async fn replay_atomic(
        &self,
        dlq: &str,
        source: &str,
        id: &str,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<Option<String>, AdminError> {
        let mut args: Vec<Value> = vec![
            REPLAY_SCRIPT.into(),
            2.into(),
            dlq.into(),
            source.into(),
            id.into(),
        ];
        push_fields(&mut args, fields);
        let slot = fred::util::redis_keyslot(dlq.as_bytes());
        // Idempotent (it checks the DLQ first), so fred may retry it after a reconnect.
        let reply = self
            .custom("EVAL", ClusterHash::Custom(slot), args, &self.normal)
            .await?;
        match reply {
            Value::Null | Value::Boolean(false) => Ok(None),
            other => text(other, "EVAL").map(Some),
        }
    }

    /// `HSET key field value` (the replay in-flight marker).
    pub(crate) async fn hset(&self, key: &str, field: &str, value: &str) -> Result<(), AdminError> {
        self.custom(
            "HSET",
            ClusterHash::FirstKey,
            vec![key.into(), field.into(), value.into()],
            &self.normal,
        )
        .await?;
        Ok(())
    }

    /// `HDEL key field`.
    pub(crate) async fn hdel(&self, key: &str, field: &str) -> Result<(), AdminError> {
        self.custom(
            "HDEL",
            ClusterHash::FirstKey,
            vec![key.into(), field.into()],
            &self.normal,
        )
        .await?;
        Ok(())
    }

    /// `HGETALL key` as text pairs.
    pub(crate) async fn hgetall(&self, key: &str) -> Result<Vec<(String, String)>, AdminError> {
        let reply = self
            .custom(
                "HGETALL",
                ClusterHash::FirstKey,
                vec![key.into()],
                &self.normal,
            )
            .await?;
        let flat = match reply {
            Value::Null => Vec::new(),
            Value::Array(items) => items,
            Value::Map(map) => map
                .inner()
                .into_iter()
                .flat_map(|(k, v)| [Value::from(k), v])
                .collect(),
            other => return Err(unexpected_reply("HGETALL", &other)),
        };
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((text(k, "HGETALL")?, text(v, "HGETALL")?));
        }
        Ok(out)
    }

    /// `XINFO GROUPS key`; empty when the key does not exist.
    pub(crate) async fn groups(&self, key: &str) -> Result<Vec<GroupInfo>, AdminError> {
        let reply = self
            .client
            .with_options(&self.normal)
            .xinfo_groups::<Value, _>(key)
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) if e.details().starts_with("ERR no such key") => return Ok(Vec::new()),
            Err(e) => return Err(RedisError::from(e).into()),
        };
        let mut out = Vec::new();
        for row in rows(reply, "XINFO GROUPS")? {
            let mut g = GroupInfo::default();
            for (k, v) in row {
                match k.as_str() {
                    "name" => g.name = text(v, "XINFO GROUPS")?,
                    "pending" => g.pending = int(&v).unwrap_or(0),
                    "lag" => g.lag = int(&v),
                    "last-delivered-id" => g.last_delivered = text(v, "XINFO GROUPS")?,
                    _ => {}
                }
            }
            out.push(g);
        }
        Ok(out)
    }

    /// `XINFO CONSUMERS key group`.
    pub(crate) async fn consumers(
        &self,
        key: &str,
        group: &str,
    ) -> Result<Vec<ConsumerInfo>, AdminError> {
        let reply: Value = self
            .client
            .with_options(&self.normal)
            .xinfo_consumers(key, group)
            .await
            .map_err(RedisError::from)?;
        Ok(parse_consumers_reply(reply)?)
    }

    /// The summary form of `XPENDING key group`.
    pub(crate) async fn pending_summary(
        &self,
        key: &str,
        group: &str,
    ) -> Result<PendingSummary, AdminError> {
        let reply: Value = self
            .client
            .with_options(&self.normal)
            .xpending(key, group, ())
            .await
            .map_err(RedisError::from)?;
        let Value::Array(parts) = reply else {
            return Err(unexpected_reply("XPENDING", &reply));
        };
        let mut parts = parts.into_iter();
        let count = parts.next().as_ref().and_then(int).unwrap_or(0);
        let oldest = match parts.next() {
            Some(Value::Null) | None => None,
            Some(v) => Some(text(v, "XPENDING")?),
        };
        Ok(PendingSummary { count, oldest })
    }
}

fn push_fields(args: &mut Vec<Value>, fields: Vec<(Bytes, Bytes)>) {
    for (k, v) in fields {
        args.push(Value::Bytes(k));
        args.push(Value::Bytes(v));
    }
}

/// `XINFO` rows: each a flat `[k, v, ...]` array (RESP2) or a map (RESP3).
fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        other => other
            .as_bytes()
            .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}
