//! Support for the topology tests (tests/cluster.rs, tests/sentinel.rs, tests/tls_unix.rs):
//! redis-server and sentinel processes on free loopback ports in temp dirs with no
//! persistence ([`Node`]), a 3-primary / 3-replica Cluster ([`cluster::Cluster`]), a
//! Sentinel set ([`sentinel::SentinelSet`]), test certificates ([`tls::Certs`]), and the
//! checks every such test makes: every entry handled or dead-lettered, nothing pending.
//!
//! Every process is SIGKILLed and waited for on drop, frozen (`kill -STOP`) ones included,
//! so a failing test leaves nothing behind. Built on the shared harness in
//! tests/common/mod.rs (`TestClient`, `Daemon`, `wait_until`, scripts), used read-only.
#![allow(dead_code)]

pub mod cluster;
pub mod resp;
pub mod sentinel;
pub mod tls;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

/// Deadline for a topology to form or heal (cluster create, promotion, sentinel discovery).
pub const FORM: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// One redis-server or sentinel process
// ---------------------------------------------------------------------------------------

/// A redis-server (or `--sentinel`) process on 127.0.0.1, with its own directory and log.
/// Killed with SIGKILL and waited for on drop (also when frozen with SIGSTOP).
pub struct Node {
    pub name: String,
    port: u16,
    spare_port: u16,
    dir: PathBuf,
    log_path: PathBuf,
    pid: u32,
    child: Option<Child>,
    frozen: bool,
}

impl Node {
    /// Starts `redis-server ARGS` in `parent/name`, where `args(port, spare_port, dir)` gives
    /// the arguments for two free ports (the main port, which must answer PING once ready,
    /// and a spare one for a cluster bus or a TLS port). Retries with new ports when one
    /// was taken meanwhile.
    pub fn start(parent: &Path, name: &str, args: &dyn Fn(u16, u16, &Path) -> Vec<String>) -> Node {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).expect("node dir");
        let log_path = dir.join("redis.log");
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port();
            let spare_port = loop {
                let p = free_port();
                if p != port {
                    break p;
                }
            };
            let argv = args(port, spare_port, &dir);
            match spawn_ready(&argv, &log_path, port) {
                Ok(child) => {
                    return Node {
                        name: name.to_owned(),
                        port,
                        spare_port,
                        dir,
                        log_path,
                        pid: child.id(),
                        child: Some(child),
                        frozen: false,
                    };
                }
                Err((true, msg)) => last = msg,
                Err((false, msg)) => panic!("{name}: redis-server did not start: {msg}"),
            }
        }
        panic!("{name}: redis-server did not start on 10 pairs of ports: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The second port given to the argument builder (cluster bus, TLS port).
    pub fn spare_port(&self) -> u16 {
        self.spare_port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// False once killed (by the test, or when it exited on its own).
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL and wait: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -STOP`: the process stays, its sockets stay open, nothing answers.
    pub fn freeze(&mut self) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGSTOP);
            self.frozen = true;
        }
    }

    /// `kill -CONT` after [`Node::freeze`].
    pub fn thaw(&mut self) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGCONT);
            self.frozen = false;
        }
    }

    /// Frozen with [`Node::freeze`] and not thawed yet.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// `ROLE`'s first element (`master`, `slave`, `sentinel`), None when it does not answer.
    pub fn role(&self) -> Option<String> {
        resp::call(self.port, &["ROLE"])
            .ok()?
            .items()
            .first()
            .and_then(|r| r.text())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The arguments every data node gets: loopback only, no persistence, its own directory.
pub fn server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        dir.to_str().expect("utf-8 dir"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Spawns redis-server and waits until it answers PING on `port`. `Err((retry, why))`:
/// `retry` when a port was taken.
fn spawn_ready(argv: &[String], log_path: &Path, port: u16) -> Result<Child, (bool, String)> {
    let log = File::create(log_path).expect("node log");
    let mut child = Command::new("redis-server")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .map_err(|e| (false, format!("spawn redis-server: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&fs::read(log_path).unwrap_or_default()).into_owned();
        if let Ok(Some(status)) = child.try_wait() {
            let in_use = text.contains("Address already in use");
            return Err((in_use, format!("exited with {status}; log:\n{text}")));
        }
        let started =
            text.contains("Ready to accept connections") || text.contains("Running mode=sentinel");
        if started && pong(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err((false, format!("no PONG on {port} within 20s; log:\n{text}")));
        }
        std::thread::sleep(POLL);
    }
}

fn pong(port: u16) -> bool {
    matches!(resp::call_timeout(port, &["PING"], Duration::from_secs(1)), Ok(resp::Reply::Status(s)) if s == "PONG")
}

/// Polls the synchronous `cond` until true; panics with `what` (and `detail()`) after
/// `deadline`.
pub fn wait_sync(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let end = Instant::now() + deadline;
    while !cond() {
        if Instant::now() > end {
            panic!(
                "timed out after {deadline:?} waiting for: {what}\n{}",
                detail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a synchronous topology call (start, failover, migration) from an async test
/// without stalling the runtime's other tasks (the test client's connection).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------
// Configs and handlers
// ---------------------------------------------------------------------------------------

/// Short recovery settings for the streams of these tests; `dlq_exit_codes = [3]`.
pub const TOPO_FAST: &str = "block = \"500ms\"\nclaim_interval = \"1s\"\nclaim_idle = \"3s\"\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\ndlq_exit_codes = [3]";

/// `[redis]` (url plus `redis_extra` lines), `[daemon]` (consumer plus `daemon_extra`
/// lines), then `streams`.
pub fn daemon_config(
    url: &str,
    redis_extra: &str,
    consumer: &str,
    daemon_extra: &str,
    streams: &str,
) -> String {
    format!(
        "[redis]\nurl = {}\n{}\n\n[daemon]\nconsumer = {}\nshutdown_timeout = \"10s\"\n{}\n\n{}\n",
        toml_str(url),
        redis_extra,
        toml_str(consumer),
        daemon_extra,
        streams
    )
}

/// A `[[streams]]` table with [`TOPO_FAST`] and `extra` lines.
pub fn topo_stream(name: &str, group: &str, script: &Path, extra: &str) -> String {
    stream_table(name, group, script, &format!("{TOPO_FAST}\n{extra}"))
}

/// A handler that exits 3 (dead-letter at once) for payloads starting with `poison` and
/// otherwise appends `<stream> <id> <consumer>` to `$D/done` after running `work` (shell, may be
/// empty). Reads its payload with the `read` builtin: no extra process per entry.
pub fn recording_handler(dir: &Path, work: &str) -> (PathBuf, PathBuf) {
    let script = write_script(
        dir,
        "record.sh",
        &format!(
            "IFS= read -r p || :\n\
             case \"$p\" in poison*) exit 3;; esac\n\
             {work}\n\
             echo \"$REDIS_STREAMD_STREAM $REDIS_STREAMD_ID $REDIS_STREAMD_CONSUMER\" >> \"$D/done\""
        ),
    );
    (dir.join("done"), script)
}

/// `(stream, id)` of each record of a done file, in order.
pub fn done_records(path: &Path) -> Vec<(String, String)> {
    read_lines(path)
        .into_iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect()
}

/// How many records of a done file `consumer` wrote.
pub fn done_by(path: &Path, consumer: &str) -> usize {
    read_lines(path)
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some(consumer))
        .count()
}

/// The payload of entry number `i`: every `poison_every`-th one is a poison entry.
pub fn payload(i: usize, poison_every: usize) -> String {
    if poison_every > 0 && i % poison_every == poison_every - 1 {
        format!("poison {i}")
    } else {
        format!("job {i}")
    }
}

// ---------------------------------------------------------------------------------------
// Redis state, tolerant of failovers (errors are "not yet", never a panic)
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
