//! The checks every topology test makes, tolerant of failovers (a Redis error is "not
//! yet", never a panic): entries pushed with retries, stream and group state read through
//! the cluster-aware test client, "every entry handled or dead-lettered, nothing pending,
//! nothing lost", progress, log lines and metrics.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::{done_records, payload};
use crate::common::*;

// ---------------------------------------------------------------------------------------

/// A command routed by the argument at `key_at` (0-based, after the command name).
pub async fn keyed(
    c: &TestClient,
    name: &'static str,
    key_at: usize,
    args: Vec<Value>,
) -> Result<Value, Error> {
    c.client
        .custom::<Value, Value>(
            CustomCommand::new_static(name, ClusterHash::Offset(key_at), false),
            args,
        )
        .await
}

/// `XADD stream * payload <p>`, retried (for up to [`LONG`]) while the topology heals.
/// A retry after a lost reply may add the entry twice: the checks use the stream's own
/// contents, not this count.
pub async fn xadd_retry(c: &TestClient, stream: &str, p: &str) -> String {
    let end = Instant::now() + LONG;
    loop {
        let args = vec![stream.into(), "*".into(), "payload".into(), p.into()];
        match keyed(c, "XADD", 0, args).await {
            Ok(v) => {
                if let Some(id) = v.as_string() {
                    return id;
                }
            }
            Err(e) if Instant::now() > end => panic!("XADD {stream} kept failing: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pushes payloads `from..to` (see [`payload`]) to `stream`; returns the ids.
pub async fn push_range(
    c: &TestClient,
    stream: &str,
    from: usize,
    to: usize,
    poison_every: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(to - from);
    for i in from..to {
        ids.push(xadd_retry(c, stream, &payload(i, poison_every)).await);
    }
    ids
}

/// Ids of every entry in `stream` (XRANGE - +), None on an error.
pub async fn stream_ids(c: &TestClient, stream: &str) -> Option<Vec<String>> {
    let v = keyed(c, "XRANGE", 0, vec![stream.into(), "-".into(), "+".into()])
        .await
        .ok()?;
    Some(
        v.into_array()
            .into_iter()
            .filter_map(|e| e.into_array().into_iter().next()?.as_string())
            .collect(),
    )
}

/// `dlq_source_id` of every entry in `dlq`, None on an error.
pub async fn dlq_sources(c: &TestClient, dlq: &str) -> Option<Vec<String>> {
    let v = keyed(c, "XRANGE", 0, vec![dlq.into(), "-".into(), "+".into()])
        .await
        .ok()?;
    let mut out = Vec::new();
    for e in v.into_array() {
        let mut parts = e.into_array().into_iter();
        let fields = parts.nth(1).map(|f| f.into_array()).unwrap_or_default();
        let src = fields
            .chunks(2)
            .find(|kv| kv[0].as_string().as_deref() == Some("dlq_source_id"))
            .and_then(|kv| kv.get(1)?.as_string());
        out.push(src.unwrap_or_default());
    }
    Some(out)
}

/// `(last-delivered-id, pending)` of `group` on `stream` from XINFO GROUPS; None on an
/// error or without the group.
pub async fn group_state(c: &TestClient, stream: &str, group: &str) -> Option<(String, u64)> {
    let v = keyed(c, "XINFO", 1, vec!["GROUPS".into(), stream.into()])
        .await
        .ok()?;
    for g in v.into_array() {
        let pairs: Vec<(String, Value)> = match g {
            Value::Map(m) => m
                .inner()
                .into_iter()
                .map(|(k, v)| (k.as_str_lossy().into_owned(), v))
                .collect(),
            other => other
                .into_array()
                .chunks(2)
                .filter(|kv| kv.len() == 2)
                .map(|kv| (kv[0].as_string().unwrap_or_default(), kv[1].clone()))
                .collect(),
        };
        let field = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if field("name").and_then(|v| v.as_string()).as_deref() == Some(group) {
            let last = field("last-delivered-id")?.as_string()?;
            let pending = field("pending")?.as_u64()?;
            return Some((last, pending));
        }
    }
    None
}

/// One stream under test and its dead-letter stream.
#[derive(Debug, Clone)]
pub struct Watched {
    pub stream: String,
    pub dlq: String,
}

impl Watched {
    /// `stream` with the default dead-letter stream `<stream>:dlq`.
    pub fn new(stream: &str) -> Watched {
        Watched {
            stream: stream.to_owned(),
            dlq: format!("{stream}:dlq"),
        }
    }
}

/// What is still wrong with a run, empty when it is complete: for every watched stream,
/// every entry in it (XRANGE, the ground truth) was delivered to `group` and is settled
/// (nothing pending), handled successfully (in `done_file`) or dead-lettered, and every id
/// in `pushed` is still in the stream (nothing lost). With `exactly_once`, no entry ran to
/// success twice, none was dead-lettered twice, and none both.
pub async fn problems(
    c: &TestClient,
    watched: &[Watched],
    group: &str,
    done_file: &Path,
    pushed: &HashMap<String, Vec<String>>,
    exactly_once: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let done = done_records(done_file);
    for w in watched {
        let Some(ids) = stream_ids(c, &w.stream).await else {
            out.push(format!("{}: XRANGE failed", w.stream));
            continue;
        };
        let Some(dlq) = dlq_sources(c, &w.dlq).await else {
            out.push(format!("{}: XRANGE failed", w.dlq));
            continue;
        };
        match (ids.last(), group_state(c, &w.stream, group).await) {
            (_, None) => out.push(format!("{}: no group state", w.stream)),
            (Some(last), Some((delivered, _))) if !id_le(last, &delivered) => out.push(format!(
                "{}: delivered through {delivered}, last entry {last}",
                w.stream
            )),
            (_, Some((_, pending))) if pending > 0 => {
                out.push(format!("{}: {pending} pending", w.stream))
            }
            _ => {}
        }
        let mut ran: HashMap<&str, usize> = HashMap::new();
        for (_, id) in done.iter().filter(|(s, _)| *s == w.stream) {
            *ran.entry(id.as_str()).or_default() += 1;
        }
        let dead: HashSet<&str> = dlq.iter().map(String::as_str).collect();
        let unsettled: Vec<&String> = ids
            .iter()
            .filter(|id| !ran.contains_key(id.as_str()) && !dead.contains(id.as_str()))
            .collect();
        if !unsettled.is_empty() {
            out.push(format!(
                "{}: {} entries neither handled nor dead-lettered, e.g. {:?}",
                w.stream,
                unsettled.len(),
                &unsettled[..unsettled.len().min(5)]
            ));
        }
        let present: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let lost: Vec<&String> = pushed
            .get(&w.stream)
            .map(|p| {
                p.iter()
                    .filter(|id| !present.contains(id.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        if !lost.is_empty() {
            out.push(format!("{}: {} pushed entries lost", w.stream, lost.len()));
        }
        if exactly_once {
            out.extend(duplicates(&w.stream, &ran, &dlq));
        }
    }
    out
}

fn duplicates(stream: &str, ran: &HashMap<&str, usize>, dlq: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let twice: BTreeSet<&&str> = ran
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    if !twice.is_empty() {
        out.push(format!(
            "{stream}: {} ids ran twice: {twice:?}",
            twice.len()
        ));
    }
    let mut seen = HashSet::new();
    let dup_dlq: Vec<&String> = dlq.iter().filter(|id| !seen.insert(*id)).collect();
    if !dup_dlq.is_empty() {
        out.push(format!("{stream}: dead-lettered twice: {dup_dlq:?}"));
    }
    let both: Vec<&String> = dlq
        .iter()
        .filter(|id| ran.contains_key(id.as_str()))
        .collect();
    if !both.is_empty() {
        out.push(format!(
            "{stream}: both handled and dead-lettered: {both:?}"
        ));
    }
    out
}

/// Waits until [`problems`] is empty; panics with the last list and the daemons' logs.
pub async fn wait_complete(
    c: &TestClient,
    watched: &[Watched],
    group: &str,
    done_file: &Path,
    pushed: &HashMap<String, Vec<String>>,
    daemons: &[&Daemon],
) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let p = problems(c, watched, group, done_file, pushed, false).await;
        if p.is_empty() {
            return;
        }
        if Instant::now() > end {
            let logs: Vec<String> = daemons.iter().map(|d| d.log_tail()).collect();
            panic!("run not complete after 120s: {p:#?}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Number of lines of the done file: successful handler runs so far.
pub fn done_count(done_file: &Path) -> usize {
    read_lines(done_file).len()
}

/// Waits until at least `n` handler runs succeeded (progress), with the logs on failure.
pub async fn wait_done_at_least(done_file: &Path, n: usize, daemons: &[&Daemon]) {
    let end = Instant::now() + LONG;
    while done_count(done_file) < n {
        if Instant::now() > end {
            let logs: Vec<String> = daemons.iter().map(|d| d.log_tail()).collect();
            panic!(
                "only {} of {n} handler runs after {LONG:?}\n{}",
                done_count(done_file),
                logs.join("\n")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Lines of the daemon's log that contain `needle`.
pub fn log_lines_with(d: &Daemon, needle: &str) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Waits until the daemon logged that every consume loop runs (its `ready` line).
pub async fn wait_ready(d: &Daemon) {
    d.wait_until(LONG, "daemon ready", || async {
        d.log().contains("ready streams=")
    })
    .await;
}

/// `GET path` on 127.0.0.1:`port`: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Waits until the daemon's `/metrics` on `port` satisfy `cond` (scrape text).
pub async fn wait_metrics(d: &Daemon, port: u16, what: &str, cond: impl Fn(&str) -> bool) {
    let cond = &cond;
    d.wait_until(LONG, what, || async move {
        http_get(port, "/metrics").is_some_and(|(status, scrape)| status == 200 && cond(&scrape))
    })
    .await;
}

/// True when `redis_streamd_redis_primary` is 1 for `127.0.0.1:<port>`.
pub fn primary_gauge_is(scrape: &str, port: u16) -> bool {
    let label = format!("address=\"127.0.0.1:{port}\"");
    scrape.lines().any(|l| {
        l.starts_with("redis_streamd_redis_primary{") && l.contains(&label) && l.ends_with(" 1")
    })
}

/// Sum of every sample of `metric` (any labels) in a Prometheus text scrape.
pub fn metric_sum(scrape: &str, metric: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
