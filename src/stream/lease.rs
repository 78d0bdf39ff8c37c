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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HandlerMode, OrderConfig, PayloadMode};
    use fred::prelude::{Builder, ClientLike, Config as FredConfig};
    use fred::types::{ClusterHash, CustomCommand};
    use std::process::{Child, Command, Stdio};

    #[test]
    fn prefixes_share_the_streams_slot() {
        assert_eq!(slot_prefix("orders"), "{orders}");
        assert_eq!(slot_prefix("{orders}"), "{orders}");
        assert_eq!(slot_prefix("eu{orders}:in"), "eu{orders}:in");
        // An empty tag is no tag: the whole name is hashed, so it is wrapped.
        assert_eq!(slot_prefix("a{}b"), "{a{}b}");
        assert_eq!(slot_prefix("a{b"), "{a{b}");
    }

    #[test]
    fn pointer_tokens_are_unescaped() {
        assert!(pointer_tokens("").is_empty());
        assert_eq!(pointer_tokens("/a/b"), ["a", "b"]);
        assert_eq!(pointer_tokens("/a~1b/~0/"), ["a/b", "~", ""]);
        assert_eq!(pointer_tokens("/~01"), ["~1"]);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(parse_read(Value::Integer(1)).is_err());
        let bad_row = Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::from(
            "1-0",
        )])])]);
        assert!(parse_read(bad_row.clone()).is_err());
        assert!(parse_admit(bad_row).is_err());
        let bad_code = Value::Array(vec![Value::Array(vec![Value::Array(vec![
            Value::from("1-0"),
            Value::Null,
            Value::from("maybe"),
            Value::Null,
        ])])]);
        assert!(parse_admit(bad_code).is_err());
        assert!(parse_read(Value::Null).is_ok_and(|r| r.read.is_empty() && r.tail.is_none()));
    }

    /// A throwaway redis-server, killed on drop.
    struct Redis {
        child: Child,
        port: u16,
    }

    impl Redis {
        fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server)");
            Redis { child, port }
        }

        async fn client(&self) -> Client {
            let url = format!("redis://127.0.0.1:{}", self.port);
            for _ in 0..200 {
                let client = Builder::from_config(FredConfig::from_url(&url).expect("url"))
                    .build()
                    .expect("client");
                if client.init().await.is_ok() {
                    return client;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server on port {} did not come up", self.port);
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn cfg(key: OrderKey) -> StreamConfig {
        StreamConfig {
            name: "s".into(),
            group: "g".into(),
            handler: vec!["/bin/true".into()],
            mode: HandlerMode::Exec,
            max_block_read: 4,
            worker_prefetch: 1,
            block: Duration::from_secs(5),
            start_id: "0".into(),
            payload: PayloadMode::Field,
            payload_field: "payload".into(),
            handler_timeout: Duration::from_secs(30),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(3),
            dlq: "s:dlq".into(),
            dlq_exit_codes: vec![],
            env: Default::default(),
            claim_interval: Duration::from_secs(30),
            claim_idle: Duration::from_secs(60),
            reap_idle: Duration::from_secs(3600),
            order: Some(OrderConfig {
                key,
                scope: OrderScope::Group,
                waiting_max: 100,
            }),
        }
    }

    fn lease(client: &Client, cfg: &StreamConfig, name: &str) -> Lease {
        let who = Consumer::new(&cfg.name, &cfg.group, name);
        Lease::new(cfg, &who, client.clone(), client.clone()).expect("group scope")
    }

    async fn add(c: &Client, fields: &[(&str, &str)]) -> String {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        c.xadd("s", false, None::<()>, "*", fields)
            .await
            .expect("XADD")
    }

    async fn owner(c: &Client, id: &str) -> (String, u64) {
        let rows: Vec<(String, String, u64, u64)> =
            c.xpending("s", "g", (id, id, 1)).await.expect("XPENDING");
        let row = rows.into_iter().next().expect("pending");
        (row.1, row.3)
    }

    async fn keys(c: &Client, pattern: &str) -> Vec<String> {
        let cmd = CustomCommand::new_static("KEYS", ClusterHash::FirstKey, false);
        let mut found: Vec<String> = c.custom(cmd, vec![pattern]).await.expect("KEYS");
        found.sort();
        found
    }

    fn ids<'a>(arrivals: impl IntoIterator<Item = &'a Arrival>) -> Vec<&'a str> {
        arrivals.into_iter().map(|a| a.entry.id.as_str()).collect()
    }

    #[tokio::test]
    async fn steps_hand_over_take_over_and_leave_nothing_behind() {
        let redis = Redis::start();
        let c = redis.client().await;
        let _: Value = c.xgroup_create("s", "g", "0", true).await.expect("group");
        let cfg = cfg(OrderKey::Field("k".into()));
        let (a, b) = (lease(&c, &cfg, "a"), lease(&c, &cfg, "b"));
        let e1 = add(&c, &[("k", "x"), ("payload", "1")]).await;
        let e2 = add(&c, &[("k", "x"), ("payload", "2")]).await;
        let e3 = add(&c, &[("k", "y"), ("payload", "3")]).await;
        let e4 = add(&c, &[("payload", "4")]).await;

        let r = a.read(1, 10).await.expect("a reads");
        assert_eq!(r.read[0].0.entry.id, e1);
        assert_eq!(r.read[0].1, Decision::Mine);
        assert_eq!(r.read[0].0.key.as_deref(), Some(&b"x"[..]));
        // b reads e2 (key x, held by a: handed over), e3 (y: b's), e4 (no key).
        let r = b.read(10, 10).await.expect("b reads");
        let got: Vec<(&str, &Decision)> = r
            .read
            .iter()
            .map(|(a, d)| (a.entry.id.as_str(), d))
            .collect();
        assert_eq!(
            got,
            [
                (e2.as_str(), &Decision::Handed("a".into())),
                (e3.as_str(), &Decision::Mine),
                (e4.as_str(), &Decision::Free)
            ]
        );
        assert_eq!(
            owner(&c, &e2).await,
            ("a".to_string(), 1),
            "handed over, counter kept"
        );
        // a finds e2 in its inbox, attempt 1; nothing new: it learns where to wait from.
        let r = a.read(10, 10).await.expect("a reads again");
        assert!(r.read.is_empty());
        assert_eq!(ids(&r.handed_in), [e2.as_str()]);
        assert_eq!(r.handed_in[0].attempt, 1);
        assert_eq!(r.handed_in[0].key.as_deref(), Some(&b"x"[..]));
        assert_eq!(r.tail, None);
        assert!(
            keys(&c, "*inbox*").await.is_empty(),
            "an empty inbox is deleted"
        );
        let r = a.read(10, 10).await.expect("a reads, nothing left");
        assert_eq!(r.tail.as_deref(), Some(e4.as_str()));

        // Acks release: the lease of x goes with its last entry.
        let x = Bytes::from_static(b"x");
        a.done(std::slice::from_ref(&e1), &[(e1.clone(), x.clone())])
            .await
            .expect("done e1");
        assert_eq!(
            keys(&c, "*lease*").await.len(),
            2,
            "x still has e2, y has e3"
        );
        a.done(std::slice::from_ref(&e2), &[(e2.clone(), x.clone())])
            .await
            .expect("done e2");
        assert_eq!(keys(&c, "*lease*").await, ["{s}:lease:g:y"]);

        // b stops: its lease of y ends; a meets y next and takes its entries over.
        b.expire(vec![Bytes::from_static(b"y")])
            .await
            .expect("expire");
        let e5 = add(&c, &[("k", "y"), ("payload", "5")]).await;
        let r = a.read(10, 10).await.expect("a reads e5");
        assert_eq!(r.read[0].1, Decision::TakenOver("b".into()));
        assert_eq!(ids(&r.taken), [e3.as_str()]);
        assert_eq!(
            r.taken[0].attempt, 2,
            "the first entry of a taken key may have run"
        );
        assert_eq!(r.takeovers, 1);
        assert_eq!(owner(&c, &e3).await.0, "a");
        // b's renewal finds y lost.
        let held = HeldKey {
            key: Bytes::from_static(b"y"),
            holder: e3.clone(),
            ids: vec![e3.clone()],
        };
        let lost = b
            .renew(std::slice::from_ref(&held))
            .await
            .expect("b renews");
        assert_eq!(lost, [Bytes::from_static(b"y")]);
        assert!(a.renew(&[held]).await.expect("a renews").is_empty());
        assert_eq!(owner(&c, &e3).await.0, "a", "b's renewal took nothing back");

        let y = Bytes::from_static(b"y");
        let acks = [e3.clone(), e4.clone(), e5.clone()];
        let releases = [(e3.clone(), y.clone()), (e5.clone(), y.clone())];
        assert_eq!(a.done(&acks, &releases).await.expect("done"), 3);
        assert!(keys(&c, "*lease*").await.is_empty());
        assert!(keys(&c, "*inbox*").await.is_empty());
        let pending: Vec<(String, String, u64, u64)> = c
            .xpending("s", "g", ("-", "+", 10))
            .await
            .expect("XPENDING");
        assert!(pending.is_empty(), "{pending:?}");
    }

    #[tokio::test]
    async fn admit_decides_entries_already_ours_and_json_pointer_keys() {
        let redis = Redis::start();
        let c = redis.client().await;
        let _: Value = c.xgroup_create("s", "g", "0", true).await.expect("group");
        let cfg = cfg(OrderKey::JsonPointer("/a/1".into()));
        let (a, b) = (lease(&c, &cfg, "a"), lease(&c, &cfg, "b"));
        let payloads = [
            r#"{"a": [0, "z"]}"#,
            r#"{"a": [0, 42]}"#,
            r#"{"a": {"1": 1.5}}"#,
            r#"{"a": [0, {"q": true}]}"#,
            r#"{"a": [0]}"#,
            "not json",
            r#"{"a": [0, "z"]}"#,
        ];
        let mut ids = Vec::new();
        for p in payloads {
            ids.push(add(&c, &[("payload", p)]).await);
        }
        // b reads the last one (key z) first, through XREADGROUP outside the script, as
        // if its delivery was lost: it is b's but undecided. a reads the rest.
        let r = a.read(6, 10).await.expect("a reads");
        let keys_read: Vec<Option<&[u8]>> = r.read.iter().map(|(a, _)| a.key.as_deref()).collect();
        let want: [Option<&[u8]>; 6] = [
            Some(b"z"),
            Some(b"42"),
            Some(b"1.5"),
            Some(br#"{"q":true}"#),
            None,
            None,
        ];
        assert_eq!(keys_read, want);
        let _: Value = c
            .xreadgroup("g", "b", Some(1), None, false, "s", ">")
            .await
            .expect("plain read");
        // b's admit: key z is a's, so the entry is handed over to a.
        let r = b.admit(&ids[6..]).await.expect("b admits");
        assert_eq!(
            r.decided,
            [(
                ids[6].clone(),
                Some(Bytes::from_static(b"z")),
                Decision::Handed("a".into())
            )]
        );
        assert_eq!(owner(&c, &ids[6]).await, ("a".to_string(), 1));
        // a admits its own first entry again (as at a restart): still its own.
        let r = a.admit(&ids[..1]).await.expect("a admits");
        assert_eq!(r.decided[0].2, Decision::Mine);
    }
}
