//! Keys held across a consumer group (`order_scope = "group"`): which consumer runs the
//! entries of a key, kept in Redis next to the stream, and the Lua steps that change it.
//!
//! **Lease.** The consumer holding a key has a hash `<prefix>:lease:<group>:<key>` with
//! its name (`@h`), the end of its hold (`@t`, Redis time in ms) and, as fields, the ids
//! of every pending entry of the key. The lease exists exactly while the group has
//! pending entries of the key: the step that acks the last one deletes it. `<prefix>` is
//! the stream name if it has a hash tag (`{...}`, not empty), else `{<stream>}`, so
//! leases and inboxes share the stream's hash slot (Redis Cluster). Every lease and inbox
//! also expires by itself after the backstop time ([`backstop`]) without a renewal:
//! nothing stays behind after a crash between two steps.
//!
//! **Delivery and decision in one step.** New entries are read inside the `read` script
//! (XREADGROUP `>` in Lua), which decides about each at once: no key → it runs; key free
//! or ours → ours (hold it, add the id); held by a live consumer → *hand-over*: `XCLAIM
//! ... JUSTID` to the holder (delivery counter kept: no attempt used) and an entry in the
//! holder's inbox `<prefix>:inbox:<group>:<consumer>` (a stream); held by a consumer whose
//! hold ran out (`claim_idle` without renewal: presumed dead) → *takeover*: every pending
//! entry of the key moves to us and runs here, in id order, before the new one. Reading
//! and deciding in one step is what keeps the order: XREADGROUP hands out entries in id
//! order, so for each key the decisions are taken in id order too, whichever consumers
//! read them. (Deciding after the read, in a second step, would let a later entry of a key
//! read by one consumer be decided, and run, before an earlier one read just before by
//! another consumer.) Blocking is done by `XREAD BLOCK` on the stream and our inbox after
//! an empty `read` (scripts cannot block); it delivers nothing, it only wakes us up.
//!
//! **Other arrivals.** Entries that reach us otherwise (our own pending entries at start,
//! XAUTOCLAIM, entries whose delivery was lost with a connection) are decided by the
//! `admit` step; their leases already list them, so they join their holder. Entries
//! handed to us come from our inbox in the `read` step. Every step that gives us entries
//! runs on the loop's own connection, one after the other, so the loop learns about a
//! key's entries in the order Redis decided them; each joins its key's queue in id order
//! ([`super::order`]).
//!
//! **Renewal.** Every `claim_idle / 3` the `renew` step pushes out the end of every lease
//! we hold and keeps its entries (running, waiting, retrying) and those in our inbox fresh
//! (`XCLAIM ... JUSTID` to ourselves), so XAUTOCLAIM never takes them while we live. A
//! lease found in another consumer's hands is reported *lost* (we were presumed dead):
//! its waiting entries are that consumer's now.
//!
//! **Done.** Acks go through the `done` step: `XACK`, then each keyed id is removed from
//! its lease (if still ours); an empty lease is deleted, which frees the key. So another
//! consumer can start the next entry of a key only once the previous one is acked (or
//! dead-lettered) in Redis.
//!
//! **Stopping** (shutdown, reload): entries waiting here stay pending in our pending
//! list and in their leases; once running handlers are done, the `expire` step ends our
//! leases, so the next consumer to meet one of those keys takes its entries over at once
//! (a restart under the same name takes them back the same way).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::{LuaInterface, StreamsInterface};
use fred::prelude::{Client, Error as FredError};
use fred::types::Value;

use crate::config::{OrderKey, OrderScope, StreamConfig};
use crate::identity::Consumer;
use crate::redis::{Entry, RedisError};
use crate::stream::order::HeldKey;

/// The Lua steps (one script, the step is an argument).
const SCRIPT: &str = include_str!("lease.lua");

/// How long a lease and an inbox live without any renewal or use: long enough that a
/// dead holder's entries are taken over before (XAUTOCLAIM gets them after `claim_idle`,
/// scanning every `claim_interval`), short enough that a key whose last step was lost in
/// a crash does not stay for long.
pub(crate) fn backstop(cfg: &StreamConfig) -> Duration {
    (cfg.claim_idle + cfg.claim_interval).saturating_mul(10)
}

/// The key prefix that puts a key in the same hash slot as `stream`.
pub(crate) fn slot_prefix(stream: &str) -> String {
    let tagged = stream
        .find('{')
        .and_then(|open| stream[open + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if tagged {
        stream.to_owned()
    } else {
        format!("{{{stream}}}")
    }
}

/// The reference tokens of a JSON Pointer (RFC 6901), unescaped: `"/a~1b/~0"` → `["a/b",
/// "~"]`; `""` (the whole document) has none.
pub(crate) fn pointer_tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// What became of an entry that reached us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// It has no key: it runs like an entry of an unordered stream.
    Free,
    /// We hold its key.
    Mine,
    /// We took its key over from this consumer (presumed dead), with its entries.
    TakenOver(String),
    /// This consumer holds its key: the entry is that consumer's now.
    Handed(String),
}

/// An entry that is ours to run (or to queue behind its key).
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) entry: Entry,
    pub(crate) key: Option<Bytes>,
    /// Its delivery counter: the attempt it runs as.
    pub(crate) attempt: u64,
}

/// What the `read` step brought.
#[derive(Debug, Default)]
pub(crate) struct ReadReply {
    /// New entries (attempt 1) and what became of each.
    pub(crate) read: Vec<(Arrival, Decision)>,
    /// Entries other consumers handed to us.
    pub(crate) handed_in: Vec<Arrival>,
    /// Entries of keys we took over.
    pub(crate) taken: Vec<Arrival>,
    /// Nothing came: the stream's last id, to wait for newer entries from.
    pub(crate) tail: Option<String>,
    /// Keys taken over.
    pub(crate) takeovers: u64,
}

/// What the `admit` step decided.
#[derive(Debug, Default)]
pub(crate) struct AdmitReply {
    /// By id: the key and what became of the entry.
    pub(crate) decided: Vec<(String, Option<Bytes>, Decision)>,
    pub(crate) taken: Vec<Arrival>,
    pub(crate) takeovers: u64,
}

/// The lease steps of one (stream, group, consumer). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Lease {
    /// The loop's own connection: every step that gives us entries, and the blocking wait.
    reader: Client,
    /// The shared connection: renewals, acks, expiry.
    cmds: Client,
    /// KEYS: the stream and our inbox.
    keys: Arc<[String; 2]>,
    /// ARGV before the step.
    header: Arc<Vec<Value>>,
    /// SHA1 of [`SCRIPT`] once Redis told us (SCRIPT LOAD).
    sha: Arc<Mutex<Option<String>>>,
}

impl Lease {
    /// The lease steps for `cfg`'s stream, or `None` unless it is ordered in group scope.
    pub(crate) fn new(
        cfg: &StreamConfig,
        who: &Consumer,
        reader: Client,
        cmds: Client,
    ) -> Option<Lease> {
        let order = cfg.order.as_ref()?;
        if order.scope != OrderScope::Group {
            return None;
        }
        let prefix = slot_prefix(&who.stream);
        let inboxes = format!("{prefix}:inbox:{}:", who.group);
        let ms = |d: Duration| Value::Integer(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut header = vec![
            Value::from(who.group.as_str()),
            Value::from(who.name.as_str()),
            ms(cfg.claim_idle),
            ms(backstop(cfg)),
            Value::from(format!("{prefix}:lease:{}:", who.group)),
            Value::from(inboxes.as_str()),
        ];
        match &order.key {
            OrderKey::Field(name) => header.extend([
                Value::from("f"),
                Value::from(name.as_str()),
                Value::Integer(0),
            ]),
            OrderKey::JsonPointer(pointer) => {
                let tokens = pointer_tokens(pointer);
                header.extend([
                    Value::from("j"),
                    Value::from(cfg.payload_field.as_str()),
                    Value::Integer(tokens.len() as i64),
                ]);
                header.extend(tokens.into_iter().map(Value::from));
            }
        }
        Some(Lease {
            reader,
            cmds,
            keys: Arc::new([who.stream.clone(), format!("{inboxes}{}", who.name)]),
            header: Arc::new(header),
            sha: Arc::new(Mutex::new(None)),
        })
    }

    /// Runs `step` with `args` on `client`: EVALSHA, loading the script first if we do not
    /// know its SHA yet, and EVAL where Redis does not have it (restarted, failed over,
    /// another cluster node).
    async fn call(
        &self,
        client: &Client,
        step: &str,
        args: Vec<Value>,
    ) -> Result<Value, RedisError> {
        let mut argv = Vec::with_capacity(self.header.len() + 1 + args.len());
        argv.extend(self.header.iter().cloned());
        argv.push(Value::from(step));
        argv.extend(args);
        let keys: Vec<String> = self.keys.to_vec();
        let known = self.sha.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sha = match known {
            Some(sha) => sha,
            None => {
                let sha: String = client.script_load(SCRIPT).await?;
                *self.sha.lock().unwrap_or_else(|p| p.into_inner()) = Some(sha.clone());
                sha
            }
        };
        let reply: Result<Value, FredError> = client.evalsha(sha, keys.clone(), argv.clone()).await;
        match reply {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                Ok(client.eval(SCRIPT, keys, argv).await?)
            }
            other => Ok(other?),
        }
    }

    /// The `read` step, on the loop's connection: up to `room` entries handed to us and up
    /// to `count` new ones, each decided.
    pub(crate) async fn read(&self, count: usize, room: usize) -> Result<ReadReply, RedisError> {
        let reply = self
            .call(
                &self.reader,
                "read",
                vec![count_value(count), count_value(room)],
            )
            .await?;
        parse_read(reply)
    }

    /// Blocks (on the loop's connection) until the stream has an entry after `tail` or
    /// our inbox has one, or `block` passed. Delivers nothing.
    pub(crate) async fn wait(&self, tail: &str, block: Duration) -> Result<(), RedisError> {
        let block_ms = (block.as_millis() as u64).max(1);
        let _: Value = self
            .reader
            .xread(
                Some(1),
                Some(block_ms),
                self.keys.to_vec(),
                vec![tail, "0-0"],
            )
            .await?;
        Ok(())
    }

    /// The `admit` step, on the loop's connection, for entries pending at us already.
    pub(crate) async fn admit(&self, ids: &[String]) -> Result<AdmitReply, RedisError> {
        let args = ids.iter().map(|id| Value::from(id.as_str())).collect();
        parse_admit(self.call(&self.reader, "admit", args).await?)
    }

    /// The `renew` step: returns the keys no longer ours.
    pub(crate) async fn renew(&self, held: &[HeldKey]) -> Result<Vec<Bytes>, RedisError> {
        let mut args = Vec::new();
        for key in held {
            args.push(Value::Bytes(key.key.clone()));
            args.push(count_value(key.ids.len()));
            args.extend(key.ids.iter().map(|id| Value::from(id.as_str())));
        }
        let reply = self.call(&self.cmds, "renew", args).await?;
        list(reply, "renew")?
            .into_iter()
            .map(|k| bytes(k, "renew"))
            .collect()
    }

    /// The `done` step: XACK `acks`, and drop each (id, key) of `releases` from its lease.
    /// Returns how many ids XACK found pending.
    pub(crate) async fn done(
        &self,
        acks: &[String],
        releases: &[(String, Bytes)],
    ) -> Result<u64, RedisError> {
        let mut args = Vec::with_capacity(1 + acks.len() + 2 * releases.len());
        args.push(count_value(acks.len()));
        args.extend(acks.iter().map(|id| Value::from(id.as_str())));
        for (id, key) in releases {
            args.push(Value::from(id.as_str()));
            args.push(Value::Bytes(key.clone()));
        }
        let reply = self.call(&self.cmds, "done", args).await?;
        integer(reply, "done")
    }

    /// The `expire` step: our leases of `keys` end now.
    pub(crate) async fn expire(&self, keys: Vec<Bytes>) -> Result<(), RedisError> {
        if keys.is_empty() {
            return Ok(());
        }
        let args = keys.into_iter().map(Value::Bytes).collect();
        self.call(&self.cmds, "expire", args).await?;
        Ok(())
    }
}

fn count_value(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn parse_read(reply: Value) -> Result<ReadReply, RedisError> {
    const STEP: &str = "lease read";
    let mut parts = list(reply, STEP)?.into_iter();
    let mut out = ReadReply::default();
    for row in list(parts.next().unwrap_or(Value::Null), STEP)? {
        let [id, fields, key, code, other] = row_of::<5>(row, STEP)?;
        let entry = Entry {
            id: text(id, STEP)?,
            fields: fields_of(fields, STEP)?,
        };
        let arrival = Arrival {
            entry,
            key: optional_bytes(key, STEP)?,
            attempt: 1,
        };
        out.read.push((arrival, decision(code, other, STEP)?));
    }
    out.handed_in = arrivals(parts.next().unwrap_or(Value::Null), STEP)?;
    out.taken = arrivals(parts.next().unwrap_or(Value::Null), STEP)?;
    out.tail = match parts.next().unwrap_or(Value::Null) {
        Value::Null => None,
        tail => Some(text(tail, STEP)?),
    };
    out.takeovers = integer(parts.next().unwrap_or(Value::Integer(0)), STEP)?;
    Ok(out)
}

fn parse_admit(reply: Value) -> Result<AdmitReply, RedisError> {
    const STEP: &str = "lease admit";
    let mut parts = list(reply, STEP)?.into_iter();
    let mut out = AdmitReply::default();
    for row in list(parts.next().unwrap_or(Value::Null), STEP)? {
        let [id, key, code, other] = row_of::<4>(row, STEP)?;
        out.decided.push((
            text(id, STEP)?,
            optional_bytes(key, STEP)?,
            decision(code, other, STEP)?,
        ));
    }
    out.taken = arrivals(parts.next().unwrap_or(Value::Null), STEP)?;
    out.takeovers = integer(parts.next().unwrap_or(Value::Integer(0)), STEP)?;
    Ok(out)
}

/// Rows `{id, fields, key, deliveries}`.
fn arrivals(value: Value, step: &'static str) -> Result<Vec<Arrival>, RedisError> {
    list(value, step)?
        .into_iter()
        .map(|row| {
            let [id, fields, key, deliveries] = row_of::<4>(row, step)?;
            Ok(Arrival {
                entry: Entry {
                    id: text(id, step)?,
                    fields: fields_of(fields, step)?,
                },
                key: optional_bytes(key, step)?,
                attempt: integer(deliveries, step)?.max(1),
            })
        })
        .collect()
}

fn decision(code: Value, other: Value, step: &'static str) -> Result<Decision, RedisError> {
    let code = text(code, step)?;
    let other = || -> Result<String, RedisError> { text(other.clone(), step) };
    Ok(match code.as_str() {
        "free" => Decision::Free,
        "mine" => Decision::Mine,
        "taken" => Decision::TakenOver(other()?),
        "handed" => Decision::Handed(other()?),
        _ => return Err(unexpected(step, &Value::from(code))),
    })
}

/// A flat field/value list, or `None` (nil: the entry was deleted from the stream).
fn fields_of(value: Value, step: &'static str) -> Result<Option<Vec<(Bytes, Bytes)>>, RedisError> {
    match value {
        Value::Null => Ok(None),
        Value::Array(flat) if flat.len() % 2 == 0 => {
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut iter = flat.into_iter();
            while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                fields.push((bytes(k, step)?, bytes(v, step)?));
            }
            Ok(Some(fields))
        }
        other => Err(unexpected(step, &other)),
    }
}

fn row_of<const N: usize>(value: Value, step: &'static str) -> Result<[Value; N], RedisError> {
    let items = list(value, step)?;
    items
        .try_into()
        .map_err(|items: Vec<Value>| unexpected(step, &Value::Array(items)))
}

fn list(value: Value, step: &'static str) -> Result<Vec<Value>, RedisError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => Ok(items),
        other => Err(unexpected(step, &other)),
    }
}

fn optional_bytes(value: Value, step: &'static str) -> Result<Option<Bytes>, RedisError> {
    match value {
        Value::Null | Value::Boolean(false) => Ok(None),
        other => bytes(other, step).map(Some),
    }
}

fn bytes(value: Value, step: &'static str) -> Result<Bytes, RedisError> {
    match value {
        Value::Bytes(b) => Ok(b),
        Value::String(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Value::Integer(i) => Ok(Bytes::from(i.to_string())),
        other => Err(unexpected(step, &other)),
    }
}

fn text(value: Value, step: &'static str) -> Result<String, RedisError> {
    String::from_utf8(bytes(value, step)?.to_vec()).map_err(|_| RedisError::Reply {
        command: step,
        reply: "non-UTF-8 id or name".into(),
    })
}

fn integer(value: Value, step: &'static str) -> Result<u64, RedisError> {
    match value {
        Value::Integer(i) if i >= 0 => Ok(i as u64),
        other => Err(unexpected(step, &other)),
    }
}

fn unexpected(step: &'static str, value: &Value) -> RedisError {
    let reply: String = format!("{value:?}").chars().take(200).collect();
    RedisError::Reply {
        command: step,
        reply,
    }
}
