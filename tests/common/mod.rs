//! Shared harness for the end-to-end tests.
//!
//! Every test gets its own throwaway `redis-server` on its own loopback port (so tests run
//! in parallel), a binary-safe test client built on fred, the real daemon binary as a child
//! process with its output in a log file, polling helpers with generous deadlines, and small
//! `sh` handler scripts. Nothing here asserts on elapsed time.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The daemon binary built by cargo for this test run.
pub const DAEMON_BIN: &str = env!("CARGO_BIN_EXE_redis-streamd");
/// Deadline for anything the daemon has to get done (busy 2-core machine: be generous).
pub const LONG: Duration = Duration::from_secs(60);
/// Deadline for prompt things (exit on a config error, exit on SIGTERM).
pub const MEDIUM: Duration = Duration::from_secs(30);
/// Polling interval of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(50);
/// Consumer name every test config gives the daemon.
pub const CONSUMER: &str = "tester";
/// EX_CONFIG
pub const EX_CONFIG: i32 = 78;

// ---------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------

/// A throwaway redis-server on a free loopback port, killed (and waited for) on drop.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    log_path: PathBuf,
    aof: bool,
    extra_args: Vec<String>,
    child: Option<Child>,
}

enum SpawnError {
    PortInUse,
    Other(String),
}

impl RedisServer {
    /// No persistence at all.
    pub fn start() -> RedisServer {
        RedisServer::start_inner(false, &[])
    }

    /// AOF persistence with `appendfsync always`, so that [`RedisServer::kill9`] followed by
    /// [`RedisServer::start_again`] keeps every acknowledged write.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_inner(true, &[])
    }

    /// No persistence, extra `redis-server` arguments (e.g. `["--requirepass", "pw"]`).
    pub fn start_with_args(args: &[&str]) -> RedisServer {
        RedisServer::start_inner(false, args)
    }

    fn start_inner(aof: bool, args: &[&str]) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("streamd-redis-")
            .tempdir()
            .expect("tempdir for redis");
        let log_path = dir.path().join("redis.log");
        let mut server = RedisServer {
            port: 0,
            dir,
            log_path,
            aof,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        let mut last = String::new();
        for _ in 0..10 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(SpawnError::PortInUse) => {
                    last = format!("port {} was taken", server.port);
                    continue;
                }
                Err(SpawnError::Other(msg)) => panic!("redis-server did not start: {msg}"),
            }
        }
        panic!("redis-server did not start after 10 ports: {last}");
    }

    fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        assert!(self.child.is_none(), "redis-server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("redis log file");
        let log_len_before = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path());
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| SpawnError::Other(format!("spawn redis-server: {e}")))?;
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log_now = self.log_since(log_len_before);
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                let log_now = self.log_since(log_len_before);
                if log_now.contains("Address already in use") {
                    return Err(SpawnError::PortInUse);
                }
                return Err(SpawnError::Other(format!(
                    "exited with {status} on port {}; log:\n{log_now}",
                    self.port
                )));
            }
            // The log line proves that *our* server owns the port, PING that it serves.
            if log_now.contains("Ready to accept connections") && ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut child = self.child.take().unwrap();
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::Other(format!(
                    "no PONG on port {} within 20s; log:\n{log_now}",
                    self.port
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        let start = (offset as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.log_since(0)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM and wait (SIGKILL after 20 s). With AOF on, everything is on disk after this.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
    }

    /// SIGKILL and wait: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (after `stop` or `kill9`).
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(SpawnError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(SpawnError::PortInUse) => {
                    panic!("port {} stayed in use; cannot restart redis", self.port)
                }
                Err(SpawnError::Other(msg)) => panic!("redis-server did not restart: {msg}"),
            }
        }
    }

    /// `stop` then `start_again`.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn ping(port: u16) -> bool {
    let addr = ([127, 0, 0, 1], port).into();
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    match stream.read(&mut buf) {
        // NOAUTH: a server started with --requirepass is up too.
        Ok(n) if n > 0 => buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Test-side Redis client (binary-safe)
// ---------------------------------------------------------------------------------------

/// One stream entry, fields as raw bytes in Redis order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// The value of the first field with this name.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Like [`Entry::get`], lossily decoded (for messages and text fields only).
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// `(id, fields)` as a tuple.
    pub fn into_tuple(self) -> RawEntry {
        (self.id, self.fields)
    }
}

/// An entry as `(id, [(field, value)])`, all bytes.
pub type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// One row of the extended XPENDING form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

pub struct TestClient {
    pub client: Client,
}

impl TestClient {
    pub async fn connect(url: &str) -> TestClient {
        let config = Config::from_url(url).expect("redis url");
        let client = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(30))
            .set_policy(ReconnectPolicy::new_constant(0, 100))
            .build()
            .expect("build fred client");
        client.init().await.expect("connect test client to redis");
        TestClient { client }
    }

    /// Any command, raw reply.
    pub async fn cmd(&self, name: &'static str, args: Vec<Value>) -> Result<Value, Error> {
        self.client
            .custom::<Value, Value>(
                CustomCommand::new_static(name, ClusterHash::FirstKey, false),
                args,
            )
            .await
    }

    /// `XADD stream * field value ...`, returns the new id.
    pub async fn xadd(&self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        let mut args: Vec<Value> = vec![stream.into(), "*".into()];
        for (k, v) in fields {
            args.push((*k).into());
            args.push(Value::Bytes(bytes::Bytes::copy_from_slice(v)));
        }
        let reply = self.cmd("XADD", args).await.expect("XADD");
        reply.as_string().expect("XADD reply is an id")
    }

    /// `XADD` with binary field names too.
    pub async fn xadd_raw(&self, stream: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> String {
        let mut args: Vec<Value> = vec![stream.into(), "*".into()];
        for (k, v) in fields {
            args.push(Value::Bytes(bytes::Bytes::copy_from_slice(k)));
            args.push(Value::Bytes(bytes::Bytes::copy_from_slice(v)));
        }
        let reply = self.cmd("XADD", args).await.expect("XADD");
        reply.as_string().expect("XADD reply is an id")
    }

    pub async fn xlen(&self, stream: &str) -> u64 {
        let reply = self.cmd("XLEN", vec![stream.into()]).await.expect("XLEN");
        reply.as_u64().expect("XLEN reply is an integer")
    }

    /// `XRANGE stream - +`, binary-safe.
    pub async fn xrange_all(&self, stream: &str) -> Vec<Entry> {
        let reply = self
            .cmd("XRANGE", vec![stream.into(), "-".into(), "+".into()])
            .await
            .expect("XRANGE");
        parse_entries(reply)
    }

    /// XPENDING summary: number of pending entries of the group. Panics on NOGROUP.
    pub async fn pending_count(&self, stream: &str, group: &str) -> u64 {
        let reply = self
            .cmd("XPENDING", vec![stream.into(), group.into()])
            .await
            .unwrap_or_else(|e| panic!("XPENDING {stream} {group}: {e}"));
        match reply {
            Value::Array(items) => items
                .first()
                .and_then(|v| v.as_u64())
                .expect("XPENDING count"),
            other => panic!("unexpected XPENDING reply {other:?}"),
        }
    }

    /// XPENDING extended form: every pending entry with consumer, idle and delivery count.
    pub async fn pending_entries(&self, stream: &str, group: &str) -> Vec<PendingEntry> {
        let reply = self
            .cmd(
                "XPENDING",
                vec![
                    stream.into(),
                    group.into(),
                    "-".into(),
                    "+".into(),
                    "100000".into(),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - +: {e}"));
        reply
            .into_array()
            .into_iter()
            .map(|row| {
                let row = row.into_array();
                assert_eq!(row.len(), 4, "XPENDING row {row:?}");
                PendingEntry {
                    id: row[0].as_string().expect("id"),
                    consumer: row[1].as_string().expect("consumer"),
                    idle_ms: row[2].as_u64().expect("idle"),
                    deliveries: row[3].as_u64().expect("delivery count"),
                }
            })
            .collect()
    }

    /// Fields of `XINFO GROUPS stream` for one group, or None when the group (or the key)
    /// does not exist.
    pub async fn group_info(&self, stream: &str, group: &str) -> Option<Vec<(String, Value)>> {
        let reply = self
            .cmd("XINFO", vec!["GROUPS".into(), stream.into()])
            .await
            .ok()?;
        for g in reply.into_array() {
            let pairs = flat_pairs(g);
            let is_it = pairs
                .iter()
                .any(|(k, v)| k == "name" && v.as_bytes() == Some(group.as_bytes()));
            if is_it {
                return Some(pairs);
            }
        }
        None
    }

    pub async fn group_exists(&self, stream: &str, group: &str) -> bool {
        self.group_info(stream, group).await.is_some()
    }

    /// The group's last-delivered-id ("0-0" for a fresh group), None without the group.
    pub async fn last_delivered_id(&self, stream: &str, group: &str) -> Option<String> {
        let info = self.group_info(stream, group).await?;
        info.into_iter()
            .find(|(k, _)| k == "last-delivered-id")
            .and_then(|(_, v)| v.as_string())
    }

    /// True once every entry up to `id` was delivered to the group and nothing is pending:
    /// the daemon handled and acked everything so far.
    pub async fn all_acked_through(&self, stream: &str, group: &str, id: &str) -> bool {
        let Some(last) = self.last_delivered_id(stream, group).await else {
            return false;
        };
        id_le(id, &last) && self.pending_count(stream, group).await == 0
    }

    /// `XGROUP CREATE stream group id MKSTREAM`.
    pub async fn create_group(&self, stream: &str, group: &str, id: &str) {
        self.cmd(
            "XGROUP",
            vec![
                "CREATE".into(),
                stream.into(),
                group.into(),
                id.into(),
                "MKSTREAM".into(),
            ],
        )
        .await
        .expect("XGROUP CREATE");
    }

    /// `XREADGROUP GROUP group consumer COUNT n STREAMS stream id` (non-blocking).
    pub async fn xreadgroup(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: u64,
        id: &str,
    ) -> Vec<Entry> {
        let reply = self
            .cmd(
                "XREADGROUP",
                vec![
                    "GROUP".into(),
                    group.into(),
                    consumer.into(),
                    "COUNT".into(),
                    count.to_string().into(),
                    "STREAMS".into(),
                    stream.into(),
                    id.into(),
                ],
            )
            .await
            .expect("XREADGROUP");
        if reply.is_null() {
            return Vec::new();
        }
        // [[stream, [entries...]]]
        let mut out = Vec::new();
        for s in reply.into_array() {
            let mut parts = s.into_array();
            assert_eq!(parts.len(), 2, "XREADGROUP stream reply");
            out.extend(parse_entries(parts.pop().unwrap()));
        }
        out
    }
}

fn parse_entries(reply: Value) -> Vec<Entry> {
    reply
        .into_array()
        .into_iter()
        .map(|e| {
            let mut parts = e.into_array().into_iter();
            let id = parts.next().and_then(|v| v.as_string()).expect("entry id");
            let fields_value = parts.next().unwrap_or(Value::Null);
            let flat: Vec<Value> = if fields_value.is_null() {
                Vec::new()
            } else {
                fields_value.into_array()
            };
            assert!(flat.len().is_multiple_of(2), "odd field list in entry {id}");
            let fields = flat
                .chunks(2)
                .map(|kv| (value_bytes(&kv[0]), value_bytes(&kv[1])))
                .collect();
            Entry { id, fields }
        })
        .collect()
}

/// Bytes of a bulk string reply, whether fred decoded it as `String` or kept `Bytes`.
pub fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Integer(i) => i.to_string().into_bytes(),
        other => other
            .as_bytes()
            .unwrap_or_else(|| panic!("expected a bulk string, got {other:?}"))
            .to_vec(),
    }
}

fn flat_pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(map) => map
            .inner()
            .into_iter()
            .map(|(k, v)| (k.as_str_lossy().into_owned(), v))
            .collect(),
        other => {
            let items = other.into_array();
            items
                .chunks(2)
                .filter(|kv| kv.len() == 2)
                .map(|kv| (kv[0].as_string().unwrap_or_default(), kv[1].clone()))
                .collect()
        }
    }
}

/// Stream id order: `a <= b`.
pub fn id_le(a: &str, b: &str) -> bool {
    fn parse(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parse(a) <= parse(b)
}

// ---------------------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------------------

/// The real `redis-streamd` binary, config and log in its own tempdir. Drop: SIGKILL + wait,
/// and SIGKILL to the process groups of handlers it still had running.
pub struct Daemon {
    child: Child,
    dir: TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// `redis-streamd --config FILE --log-level debug`.
    pub fn start(config_toml: &str) -> Daemon {
        Daemon::start_with(config_toml, &["--log-level", "debug"], &[])
    }

    /// `redis-streamd --config FILE <args>` with extra environment.
    pub fn start_with(config_toml: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("streamd-daemon-")
            .tempdir()
            .expect("tempdir for daemon");
        let config_path = dir.path().join("redis-streamd.toml");
        fs::write(&config_path, config_toml).expect("write config");
        let log_path = dir.path().join("daemon.log");
        let log = File::create(&log_path).expect("daemon log");
        let mut cmd = Command::new(DAEMON_BIN);
        cmd.arg("--config").arg(&config_path).args(args);
        clean_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn redis-streamd");
        Daemon {
            child,
            dir,
            config_path,
            log_path,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the daemon wrote so far (stdout and stderr), lossily decoded.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The last ~12 KiB of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        let start = bytes.len().saturating_sub(12 * 1024);
        format!(
            "---- daemon log {} (last {} of {} bytes) ----\n{}\n---- end of daemon log ----",
            self.log_path.display(),
            bytes.len() - start,
            bytes.len(),
            String::from_utf8_lossy(&bytes[start..])
        )
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        }
    }

    /// SIGKILL and wait (handlers it ran are left alone, as after a real crash).
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait daemon");
        self.status = Some(s);
        s
    }

    /// Exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait daemon");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits for the daemon to exit; panics with the log tail after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            if Instant::now() > end {
                panic!(
                    "daemon (pid {}) did not exit within {:?}\n{}",
                    self.pid(),
                    deadline,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `deadline`. Returns the exit
    /// status when it exited on its own, None when it had to be killed.
    pub fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.sigterm();
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(POLL);
        }
        self.kill9();
        None
    }

    /// Panics with the log tail unless the daemon is still running.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_exit() {
            panic!("daemon exited unexpectedly with {s}\n{}", self.log_tail());
        }
    }

    /// [`wait_until`] with this daemon's log tail in the failure message.
    pub async fn wait_until<F, Fut>(&self, deadline: Duration, what: &str, cond: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_until(deadline, what, Some(self), cond).await
    }

    /// Waits until [`TestClient::all_acked_through`] `last`: every entry up to it was
    /// delivered to `group` and nothing is pending (handled and acked, or dead-lettered).
    pub async fn wait_settled(&self, c: &TestClient, stream: &str, group: &str, last: &str) {
        let what = format!("{stream} settled through {last}");
        self.wait_until(LONG, &what, || c.all_acked_through(stream, group, last))
            .await;
    }

    /// Waits until the daemon has created `group` on `stream`.
    pub async fn wait_group(&self, c: &TestClient, stream: &str, group: &str) {
        let what = format!("group {group} on {stream} created");
        self.wait_until(LONG, &what, || c.group_exists(stream, group))
            .await;
    }

    /// Peak resident memory (VmHWM) of the daemon process, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let groups: Vec<i32> = children_of(self.child.id())
                .into_iter()
                .map(|(_, pgid)| pgid)
                .collect();
            let _ = self.child.kill();
            let _ = self.child.wait();
            for pgid in groups {
                if pgid > 1 && pgid as u32 != std::process::id() {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
            }
        }
    }
}

fn clean_env(cmd: &mut Command) {
    for var in [
        "REDIS_STREAMD_REDIS_URL",
        "REDIS_STREAMD_CONFIG",
        "REDIS_STREAMD_CONSUMER",
        "REDIS_STREAMD_LOG_LEVEL",
        "REDIS_STREAMD_LOG_FORMAT",
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_COLOR", "1");
}

/// Every process on the machine with its stat, read from `/proc`.
pub fn processes() -> Vec<(i32, ProcStat)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| Some((p, proc_stat(p)?)))
        .collect()
}

/// `(pid, pgid)` of the direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<(i32, i32)> {
    processes()
        .into_iter()
        .filter(|(_, st)| st.ppid == pid as i32)
        .map(|(p, st)| (p, st.pgid))
        .collect()
}

/// Pids of zombie children of `pid` (exited, not yet reaped).
pub fn zombie_children(pid: u32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, st)| st.ppid == pid as i32 && st.state == 'Z')
        .map(|(child, _)| child)
        .collect()
}

/// The interesting part of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
}

/// None when the process does not exist (any more).
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp ...; comm may contain spaces and parens.
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let pgid = it.next()?.parse().ok()?;
    Some(ProcStat { state, ppid, pgid })
}

// ---------------------------------------------------------------------------------------
// Running the binary as a CLI (config errors, --check)
// ---------------------------------------------------------------------------------------

/// Output of one CLI run; stdout and stderr with ANSI escapes removed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {} (signal {:?})\n---- stdout ----\n{}\n---- stderr ----\n{}\n----",
            self.status,
            self.status.signal(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs the daemon binary with `args` and extra `env` until it exits; panics (after killing
/// it) if it is still running after `deadline`.
pub fn run_cli<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)], deadline: Duration) -> CliOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(DAEMON_BIN);
    cmd.args(args);
    clean_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("spawn redis-streamd");
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = strip_ansi(&String::from_utf8_lossy(
                &fs::read(&out_path).unwrap_or_default(),
            ));
            let stderr = strip_ansi(&String::from_utf8_lossy(
                &fs::read(&err_path).unwrap_or_default(),
            ));
            panic!(
                "redis-streamd {:?} still running after {deadline:?}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}",
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(POLL);
    };
    CliOutput {
        status,
        stdout: strip_ansi(&String::from_utf8_lossy(
            &fs::read(&out_path).unwrap_or_default(),
        )),
        stderr: strip_ansi(&String::from_utf8_lossy(
            &fs::read(&err_path).unwrap_or_default(),
        )),
    }
}

/// Removes ANSI CSI escape sequences (colours) so assertions see plain text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------

/// Polls `cond` every [`POLL`] until it is true; after `deadline` panics with `what` and the
/// daemon's log tail.
pub async fn wait_until<F, Fut>(
    deadline: Duration,
    what: &str,
    daemon: Option<&Daemon>,
    mut cond: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > end {
            let tail = daemon.map(|d| d.log_tail()).unwrap_or_default();
            panic!("timed out after {deadline:?} waiting for: {what}\n{tail}");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// Handler scripts, files, config text
// ---------------------------------------------------------------------------------------

/// A handler body that saves its stdin as `$D/out/<id>.in` (written to a temporary name
/// and renamed, so a file that exists is complete).
pub const SAVE_STDIN: &str = "cat > \"$D/out/$REDIS_STREAMD_ID.tmp\" && mv \"$D/out/$REDIS_STREAMD_ID.tmp\" \"$D/out/$REDIS_STREAMD_ID.in\"";

/// Creates `dir/out` and a handler `dir/save.sh` running [`SAVE_STDIN`]; returns both.
pub fn saving_handler(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("out");
    fs::create_dir(&out).expect("create out dir");
    (out, write_script(dir, "save.sh", SAVE_STDIN))
}

/// Writes an executable `sh` script `dir/name`; the body sees `$D` = `dir`.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = format!("#!/bin/sh\nD='{}'\n{}\n", dir.display(), body);
    fs::write(&tmp, text).expect("write script");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod script");
    fs::rename(&tmp, &path).expect("rename script");
    path
}

/// A shell loop that waits until `$D/<file>` exists (or the test's directory is gone, or
/// about 10 minutes passed, so that a failed test never leaves it spinning).
pub fn sh_wait_for_file(file: &str) -> String {
    format!(
        "i=0; while [ ! -e \"$D/{file}\" ] && [ -d \"$D\" ] && [ $i -lt 12000 ]; do sleep 0.05; i=$((i+1)); done"
    )
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A TOML array of strings.
pub fn toml_array<S: AsRef<str>>(items: &[S]) -> String {
    let v: Vec<&str> = items.iter().map(|s| s.as_ref()).collect();
    serde_json::to_string(&v).expect("array")
}

/// `handler = [...]` value for a script path.
pub fn handler_of(script: &Path) -> String {
    toml_array(&[script.to_str().expect("utf-8 path")])
}

/// `[redis]` + `[daemon]` (consumer = "tester") + the given `[[streams]]` tables.
pub fn config(url: &str, streams: &str) -> String {
    format!(
        "[redis]\nurl = {}\n\n[daemon]\nconsumer = {}\nshutdown_timeout = \"10s\"\n\n{}\n",
        toml_str(url),
        toml_str(CONSUMER),
        streams
    )
}

/// `cfg` (from [`config`] or alike) with `metrics_listen` on 127.0.0.1:`port`.
pub fn with_metrics_listen(cfg: &str, port: u16) -> String {
    cfg.replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    )
}

/// One `[[streams]]` table; `extra` is more `key = value` lines.
pub fn stream_table(name: &str, group: &str, script: &Path, extra: &str) -> String {
    format!(
        "[[streams]]\nname = {}\ngroup = {}\nhandler = {}\n{}\n",
        toml_str(name),
        toml_str(group),
        handler_of(script),
        extra
    )
}

/// File contents, empty when missing.
pub fn read_or_empty(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_default()
}

/// Lines of a text file, empty when missing.
pub fn read_lines(path: &Path) -> Vec<String> {
    String::from_utf8_lossy(&read_or_empty(path))
        .lines()
        .map(|l| l.to_string())
        .collect()
}

/// Number of files in `dir` whose name ends with `suffix`.
pub fn count_files(dir: &Path, suffix: &str) -> usize {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Deterministic pseudo-random bytes (xorshift), for big payloads.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every byte value 0..=255, `repeat` times.
pub fn all_byte_values(repeat: usize) -> Vec<u8> {
    (0..repeat).flat_map(|_| 0u8..=255).collect()
}

/// 1-based number of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
        + 1
}

/// A tempdir for handler scripts and their output files.
pub fn workdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("streamd-work-")
        .tempdir()
        .expect("tempdir")
}

/// `GET path` on 127.0.0.1:port: (status code, body); None unless answered within about
/// 10 s (to connect, and then to read).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The value of the series `name{stream="s",...}` in a scrape.
pub fn sample(scrape: &str, name: &str, stream: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split_once(['{', ' ']).is_some_and(|(n, _)| n == name)
                && l.contains(&format!("stream=\"{stream}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
