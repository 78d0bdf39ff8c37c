//! Shared pieces of the benchmark binaries: a throwaway redis-server, a fred client,
//! stream reply parsing, clocks and statistics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use fred::types::config::Config as FredConfig;

pub mod cluster;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// CLOCK_REALTIME in nanoseconds: comparable across processes of this machine (and with
/// redis-server's own timestamps, e.g. MONITOR lines).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A redis-server on a free loopback port, no persistence; stopped (SIGTERM, then SIGKILL)
/// when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts redis-server (from PATH, or `REDIS_SERVER`) with its files in `dir`.
    pub fn start(dir: &Path) -> Result<RedisServer> {
        RedisServer::start_with(dir, |_| Vec::new())
    }

    /// [`RedisServer::start`] with more arguments, made for the port it gets.
    pub fn start_with(dir: &Path, extra: impl Fn(u16) -> Vec<String>) -> Result<RedisServer> {
        let program = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        std::fs::create_dir_all(dir)?;
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let log = std::fs::File::create(dir.join(format!("redis-{port}.log")))?;
            let child = Command::new(&program)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--protected-mode", "no"])
                .arg("--dir")
                .arg(dir)
                .args(extra(port))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start {program}: {e}"))?;
            let mut server = RedisServer { child, port };
            if server.wait_ready(Duration::from_secs(10)) {
                return Ok(server);
            }
            last_error = format!("redis-server on port {port} did not answer PING");
            // Dropping `server` stops it; try another port.
        }
        Err(last_error.into())
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let mut reply = [0u8; 7];
                if conn.write_all(b"PING\r\n").is_ok()
                    && conn.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let started = Instant::now();
    while started.elapsed() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// A connected fred client (RESP2, like the daemon's).
pub async fn connect(url: &str) -> Result<Client> {
    let config = FredConfig::from_url(url)?;
    let client = Builder::from_config(config).build()?;
    client.init().await?;
    Ok(client)
}

/// A Value as text (bulk strings and simple strings).
pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The entry ids of an XREADGROUP reply (one or more streams).
pub fn read_reply_ids(reply: Value) -> Vec<String> {
    let mut ids = Vec::new();
    let streams = match reply {
        Value::Array(streams) => streams,
        _ => return ids, // nil: nothing to read (RESP2, as the daemon speaks)
    };
    for stream in streams {
        // [name, entries]
        let entries = match stream {
            Value::Array(mut parts) if parts.len() == 2 && !matches!(parts[0], Value::Array(_)) => {
                parts.pop().unwrap_or(Value::Null)
            }
            other => other,
        };
        if let Value::Array(entries) = entries {
            for entry in entries {
                if let Value::Array(parts) = entry
                    && let Some(id) = parts.first().and_then(text)
                {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

/// The fields of one consumer group, from XINFO GROUPS.
#[derive(Debug, Clone, Default)]
pub struct GroupInfo {
    pub pending: u64,
    pub last_delivered: String,
    pub entries_read: Option<u64>,
}

/// XINFO GROUPS `stream`, the row of `group`.
pub async fn group_info(client: &Client, stream: &str, group: &str) -> Result<GroupInfo> {
    let reply: Value = client.xinfo_groups(stream).await?;
    parse_group_info(reply, group).ok_or_else(|| format!("no group {group} on {stream}").into())
}

pub fn parse_group_info(reply: Value, group: &str) -> Option<GroupInfo> {
    let Value::Array(groups) = reply else { return None };
    for g in groups {
        let pairs: Vec<(String, Value)> = match g {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((text(&k).unwrap_or_default(), v));
                }
                pairs
            }
            _ => continue,
        };
        let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if get("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        return Some(GroupInfo {
            pending: get("pending").and_then(|v| v.as_u64()).unwrap_or(0),
            last_delivered: get("last-delivered-id").and_then(text).unwrap_or_default(),
            entries_read: get("entries-read").and_then(|v| v.as_u64()),
        });
    }
    None
}

/// Appends `count` entries `payload_field = payload` to `stream` in pipelined batches;
/// returns the last id.
pub async fn preload(
    client: &Client,
    stream: &str,
    field: &str,
    payload: &[u8],
    count: usize,
) -> Result<String> {
    let mut last = String::new();
    let mut left = count;
    while left > 0 {
        let batch = left.min(1000);
        let pipeline = client.pipeline();
        for _ in 0..batch {
            let _: () = pipeline
                .xadd(stream, false, None::<()>, "*", vec![(field, payload)])
                .await?;
        }
        let ids: Vec<Value> = pipeline.all().await?;
        if let Some(id) = ids.last().and_then(text) {
            last = id;
        }
        left -= batch;
    }
    Ok(last)
}

/// `len` bytes of printable text, the payload of every scenario.
pub fn payload(len: usize) -> Vec<u8> {
    let pattern = b"{\"order\":12345,\"sku\":\"ABC-123\",\"qty\":2,\"note\":\"benchmark payload\"} ";
    pattern.iter().copied().cycle().take(len).collect()
}

/// Value `q` (0..=1) of sorted `v` (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time (user + system, seconds) used so far by process `pid` itself, all threads,
/// not counting its children.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (0-based).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU time (user + system, seconds) used so far by the live children of `pid` (e.g. a
/// daemon's workers), read from /proc before they exit.
pub fn children_cpu_secs(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let parent = pid.to_string();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rfind(')')
                    .and_then(|i| stat[i + 2..].split_whitespace().nth(1).map(|pp| pp == parent))
                    .unwrap_or(false)
            })
        })
        .filter_map(|p| {
            // schedstat's first field: ns on a CPU (stat's ticks are too coarse for a
            // worker's few milliseconds).
            let s = std::fs::read_to_string(format!("/proc/{p}/schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(|ns| ns as f64 / 1e9)
        .sum()
}

/// CPU time (user + system, seconds) of this process so far, not counting children.
pub fn self_cpu_secs() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Waits until `path` contains `needle` (a log line), up to `limit`.
pub fn wait_for_text(path: &Path, needle: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(file) = std::fs::File::open(path)
            && BufReader::new(file)
                .lines()
                .map_while(|l| l.ok())
                .any(|l| l.contains(needle))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The directory of the running executable (bench/target/release).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Parses `--name value` style arguments into (flags, trailing argv after `--`).
pub struct Args {
    pub opts: Vec<(String, Option<String>)>,
    pub rest: Vec<String>,
}

impl Args {
    /// `valued` lists the options that take a value.
    pub fn parse(valued: &[&str]) -> Result<Args> {
        let mut opts = Vec::new();
        let mut rest = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            if arg == "--" {
                rest.extend(it.by_ref());
                break;
            }
            if valued.contains(&arg.as_str()) {
                let value = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
                opts.push((arg, Some(value)));
            } else if arg.starts_with("--") {
                opts.push((arg, None));
            } else {
                return Err(format!("unexpected argument {arg:?}").into());
            }
        }
        Ok(Args { opts, rest })
    }

    pub fn flag(&self, name: &str) -> bool {
        self.opts.iter().any(|(k, _)| k == name)
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}: cannot parse {v:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
