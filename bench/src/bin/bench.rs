//! The scenario driver of redis-streamd's benchmark suite (usually run through `bench/run`).
//!
//! Every scenario run starts its own redis-server on a free loopback port (no persistence)
//! and its own daemon, and stops both. Each scenario runs `--runs` times; one line of
//! figures per scenario goes to stdout (medians of the runs, ratios taken within each run),
//! details of every run go to stderr.
//!
//! ```text
//! bench --daemon ../target/release/redis-streamd [--runs 3] [--quick] [--only 1,2,3,4,5]
//!       [--work DIR] [--keep]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bench::cluster::BenchCluster;
use bench::{
    Args, GroupInfo, RedisServer, Result, connect, median, now_ns, parse_group_info, payload,
    percentile, preload, proc_status_kib, terminate, text, wait_for_text,
};
use fred::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[path = "../scenario_order.rs"]
mod scenario_order;

/// Payload size of every scenario (bytes of the `payload` field).
const PAYLOAD_BYTES: usize = 100;
/// The group every scenario uses.
const GROUP: &str = "bench";

struct Opts {
    runs: usize,
    quick: bool,
    daemon: PathBuf,
    bin: PathBuf,
    work: PathBuf,
    only: Vec<String>,
}

impl Opts {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

fn main() -> Result<()> {
    let args = Args::parse(&["--runs", "--daemon", "--work", "--only"])?;
    let quick = args.flag("--quick");
    let bin = bench::exe_dir();
    let daemon = match args.value("--daemon") {
        Some(p) => PathBuf::from(p),
        None => bin.join("../../../target/release/redis-streamd"),
    };
    let daemon = daemon
        .canonicalize()
        .map_err(|e| format!("daemon binary {}: {e}", daemon.display()))?;
    let work = match args.value("--work") {
        Some(p) => PathBuf::from(p),
        None => std::env::temp_dir().join(format!("redis-streamd-bench.{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    let opts = Opts {
        runs: args.parsed("--runs", 3)?,
        quick,
        daemon,
        bin,
        work: work.clone(),
        only: args
            .value("--only")
            .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect())
            .unwrap_or_default(),
    };
    if opts.runs == 0 {
        return Err("--runs must be at least 1".into());
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(run_all(&opts));
    if !args.flag("--keep") {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("# work files kept in {}", work.display());
    }
    result
}

async fn run_all(opts: &Opts) -> Result<()> {
    let n = if opts.quick { 2_000 } else { 20_000 };
    if opts.wants("1") || opts.wants("1a") {
        report(
            "1a",
            throughput(opts, n, &["/bin/true"], "/bin/true").await,
        );
    }
    if opts.wants("1") || opts.wants("1b") {
        report(
            "1b",
            throughput(opts, n, &["sh", "-c", "cat >/dev/null"], "sh -c 'cat >/dev/null'").await,
        );
    }
    if opts.wants("2") {
        let count = if opts.quick { 400 } else { 2_000 };
        report("2", latency(opts, count, 200).await);
    }
    if opts.wants("3") {
        report("3", fan_in(opts, n, 100, 4).await);
    }
    let wn = if opts.quick { 20_000 } else { 200_000 };
    if opts.wants("4") || opts.wants("4a") {
        report("4a", worker(opts, wn, 16).await);
    }
    if opts.wants("4") || opts.wants("4b") {
        report("4b", worker(opts, wn, 100).await);
    }
    if opts.wants("5") {
        report("5", cluster_scale(opts, wn, 16).await);
    }
    if opts.wants("6") || opts.wants("6a") {
        report("6a", scenario_order::ordered(opts, n, false).await);
    }
    if opts.wants("6") || opts.wants("6b") {
        report("6b", scenario_order::ordered(opts, n, true).await);
    }
    Ok(())
}

fn report(scenario: &str, line: Result<String>) {
    match line {
        Ok(line) => println!("{scenario:<2} {line}"),
        Err(e) => println!("{scenario:<2} FAILED: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// The daemon under test

struct StreamSpec {
    name: String,
    handler: Vec<String>,
    max_block_read: usize,
    start_id: &'static str,
    extra: String,
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_config(path: &Path, url: &str, streams: &[StreamSpec]) -> Result<()> {
    write_config_as(path, url, "bench", streams)
}

/// [`write_config`] with another consumer name (several daemons sharing a group).
fn write_config_as(path: &Path, url: &str, consumer: &str, streams: &[StreamSpec]) -> Result<()> {
    let mut toml = String::new();
    let _ = writeln!(toml, "[redis]\nurl = {}\n", toml_str(url));
    let _ = writeln!(
        toml,
        "[daemon]\nconsumer = {}\nshutdown_timeout = \"10s\"\n",
        toml_str(consumer)
    );
    for s in streams {
        let handler: Vec<String> = s.handler.iter().map(|a| toml_str(a)).collect();
        let _ = writeln!(
            toml,
            "[[streams]]\nname = {}\ngroup = {}\nhandler = [{}]\nmax_block_read = {}\nstart_id = {}\n{}",
            toml_str(&s.name),
            toml_str(GROUP),
            handler.join(", "),
            s.max_block_read,
            toml_str(s.start_id),
            s.extra,
        );
    }
    std::fs::write(path, toml)?;
    Ok(())
}

/// A running redis-streamd; SIGTERMed and reaped when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
    /// The profiler attached to it (`BENCH_ATTACH`), if any.
    attached: Option<Child>,
}

/// `BENCH_ATTACH="strace -c -f -o /tmp/s.{pid} -p {pid}"` (or `perf record -g -p {pid} ...`):
/// a command started right after each daemon, `{pid}` replaced by the daemon's pid, and
/// sent SIGINT just before the daemon is stopped (so it covers the measured work). For
/// profiling only: it slows the daemon down, so the figures of such a run are not valid.
fn attach_profiler(pid: u32) -> Option<Child> {
    let template = std::env::var("BENCH_ATTACH").ok().filter(|t| !t.trim().is_empty())?;
    let argv: Vec<String> = template
        .split_whitespace()
        .map(|a| a.replace("{pid}", &pid.to_string()))
        .collect();
    let child = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).spawn();
    match child {
        Ok(child) => {
            // Give it time to attach before the work starts in earnest.
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        }
        Err(e) => {
            eprintln!("BENCH_ATTACH: cannot start {}: {e}", argv[0]);
            None
        }
    }
}

impl Daemon {
    fn start(opts: &Opts, config: &Path, log: &Path) -> Result<Daemon> {
        let file = std::fs::File::create(log)?;
        // BENCH_DAEMON_ARGS: extra daemon arguments for experiments (e.g. "--log-level warn").
        let extra: Vec<String> = std::env::var("BENCH_DAEMON_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let child = Command::new(&opts.daemon)
            .arg("--config")
            .arg(config)
            .args(&extra)
            .env_remove("REDIS_STREAMD_REDIS_URL")
            .env_remove("REDIS_STREAMD_CONSUMER")
            .env_remove("REDIS_STREAMD_LOG_LEVEL")
            .env_remove("REDIS_STREAMD_LOG_FORMAT")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", opts.daemon.display()))?;
        let attached = attach_profiler(child.id());
        Ok(Daemon {
            child,
            log: log.to_owned(),
            attached,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the "ready" log line (every group set up, every loop about to read).
    fn wait_ready(&mut self) -> Result<()> {
        if wait_for_text(&self.log, "ready", Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(format!("daemon not ready after 30 s; log: {}", self.log_tail()).into())
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    fn stop(mut self) -> Result<ExitStatus> {
        if let Some(mut profiler) = self.attached.take() {
            unsafe {
                libc::kill(profiler.id() as libc::pid_t, libc::SIGINT);
            }
            let _ = profiler.wait();
        }
        let status = terminate(&mut self.child, Duration::from_secs(30))
            .ok_or("cannot reap the daemon")?;
        if !status.success() {
            return Err(format!("daemon exited with {status}; log: {}", self.log_tail()).into());
        }
        Ok(status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }
}

/// Polls XINFO GROUPS every `period` until every (stream, last id) is fully delivered and
/// acked: last-delivered-id == last id and pending == 0. Returns when that was seen.
async fn wait_all_acked(
    client: &Client,
    targets: &[(String, String)],
    period: Duration,
    limit: Duration,
) -> Result<Instant> {
    let started = Instant::now();
    let mut left: Vec<&(String, String)> = targets.iter().collect();
    loop {
        let pipeline = client.pipeline();
        for (stream, _) in &left {
            let _: () = pipeline.xinfo_groups(stream.as_str()).await?;
        }
        let replies = pipeline.try_all::<Value>().await;
        let now = Instant::now();
        let mut still = Vec::new();
        for ((stream, last), reply) in left.iter().map(|t| (&t.0, &t.1)).zip(replies) {
            let info: Option<GroupInfo> = reply.ok().and_then(|r| parse_group_info(r, GROUP));
            let done = matches!(&info, Some(i) if i.pending == 0 && &i.last_delivered == last);
            if !done {
                still.push((stream, last));
            }
        }
        left.retain(|t| still.iter().any(|(s, _)| *s == &t.0));
        if left.is_empty() {
            return Ok(now);
        }
        if started.elapsed() > limit {
            return Err(format!("{} streams not fully acked after {limit:?}", left.len()).into());
        }
        tokio::time::sleep(period).await;
    }
}

/// What a helper binary of bench/ printed (`key=value` figures), plus the wall-clock
/// seconds from its spawn to its exit as seen here.
struct Helper {
    figures: std::collections::HashMap<String, f64>,
    wall: f64,
}

impl Helper {
    fn get(&self, key: &str) -> Result<f64> {
        self.figures
            .get(key)
            .copied()
            .ok_or_else(|| format!("helper printed no {key}=").into())
    }
}

fn run_helper(opts: &Opts, name: &str, args: &[String]) -> Result<Helper> {
    let started = Instant::now();
    let out = Command::new(opts.bin.join(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{name} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let figures = stdout
        .split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect();
    Ok(Helper { figures, wall })
}

/// Spawn ceiling: (entries/s from its spawn to its exit, like the daemon's start to last
/// XACK; its own CPU seconds).
fn spawn_ceiling(opts: &Opts, n: usize, concurrency: usize, handler: &[String]) -> Result<(f64, f64)> {
    let mut args = vec![
        "--count".to_owned(),
        n.to_string(),
        "--concurrency".to_owned(),
        concurrency.to_string(),
        "--payload-bytes".to_owned(),
        PAYLOAD_BYTES.to_string(),
        "--".to_owned(),
    ];
    args.extend(handler.iter().cloned());
    let h = run_helper(opts, "spawn-ceiling", &args)?;
    Ok((n as f64 / h.wall, h.get("cpu_s")?))
}

fn run_dir(opts: &Opts, name: &str) -> Result<PathBuf> {
    let dir = opts.work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Measures the daemon and its ceiling back to back, daemon first in even runs and
/// ceiling first in odd ones, so a drift in machine load does not favour one side. Both
/// futures are lazy: nothing runs until it is awaited here.
async fn alternating<D, C>(
    run: usize,
    daemon: impl Future<Output = Result<D>>,
    ceiling: impl Future<Output = Result<C>>,
) -> Result<(D, C)> {
    if run.is_multiple_of(2) {
        let d = daemon.await?;
        Ok((d, ceiling.await?))
    } else {
        let c = ceiling.await?;
        Ok((daemon.await?, c))
    }
}

fn list(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

// ---------------------------------------------------------------------------------------
// Scenario 1: throughput of per-entry handlers vs the spawn ceiling

/// One daemon run over `n` preloaded entries of one stream; entries/s from daemon start to
/// the last XACK.
async fn daemon_throughput(
    opts: &Opts,
    dir: &Path,
    streams: usize,
    n: usize,
    handler: &[String],
    max_block_read: usize,
    poll: Duration,
) -> Result<(f64, u64, f64)> {
    let redis = RedisServer::start(dir)?;
    let client = connect(&redis.url()).await?;
    let body = payload(PAYLOAD_BYTES);
    let mut targets = Vec::new();
    let mut specs = Vec::new();
    for i in 0..streams {
        let name = if streams == 1 { "bench".to_owned() } else { format!("fan:{i}") };
        let share = n / streams + usize::from(i < n % streams);
        let last = preload(&client, &name, "payload", &body, share).await?;
        let _: Value = client.xgroup_create(name.as_str(), GROUP, "0", false).await?;
        targets.push((name.clone(), last));
        specs.push(StreamSpec {
            name,
            handler: handler.to_vec(),
            max_block_read,
            start_id: "0",
            extra: String::new(),
        });
    }
    let config = dir.join("config.toml");
    write_config(&config, &redis.url(), &specs)?;

    let started = Instant::now();
    let daemon = Daemon::start(opts, &config, &dir.join("daemon.log"))?;
    let done = wait_all_acked(&client, &targets, poll, Duration::from_secs(300)).await;
    let hwm = proc_status_kib(daemon.pid(), "VmHWM").unwrap_or(0);
    let cpu = bench::proc_cpu_secs(daemon.pid()).unwrap_or(f64::NAN);
    let done = done.map_err(|e| format!("{e}; daemon log: {}", daemon.log_tail()))?;
    let secs = done.duration_since(started).as_secs_f64();
    daemon.stop()?;
    for (name, _) in &targets {
        let dead: u64 = client.xlen(format!("{name}:dlq")).await?;
        if dead > 0 {
            return Err(format!("{dead} entries of {name} went to the DLQ").into());
        }
    }
    let _ = client.quit().await;
    drop(redis);
    Ok((n as f64 / secs, hwm, cpu))
}

async fn throughput(opts: &Opts, n: usize, handler: &[&str], label: &str) -> Result<String> {
    let handler: Vec<String> = handler.iter().map(|s| s.to_string()).collect();
    let mbr = 16;
    let poll = Duration::from_millis(5);
    let mut rows: Vec<[f64; 5]> = Vec::new();
    for run in 0..opts.runs {
        let dir = run_dir(opts, &format!("s1-{run}"))?;
        let ((d, _, dcpu), (c, ccpu)) = alternating(
            run,
            daemon_throughput(opts, &dir, 1, n, &handler, mbr, poll),
            async { spawn_ceiling(opts, n, mbr, &handler) },
        )
        .await?;
        let (dus, cus) = (dcpu * 1e6 / n as f64, ccpu * 1e6 / n as f64);
        eprintln!(
            "   1 {label} run {}: daemon {d:.0}/s ceiling {c:.0}/s ratio {:.3} | own CPU per entry: daemon {dus:.0} us, ceiling {cus:.0} us",
            run + 1,
            d / c
        );
        rows.push([d, c, d / c, dus, cus]);
    }
    let m = |i: usize| median(&rows.iter().map(|f| f[i]).collect::<Vec<_>>());
    let ratios: Vec<f64> = rows.iter().map(|f| f[2]).collect();
    Ok(format!(
        "throughput {label}, {n} entries, max_block_read {mbr}: daemon {:.0}/s  spawn ceiling {:.0}/s  ratio {:.3} (runs: {})  own CPU/entry daemon {:.0} us, ceiling {:.0} us  target >= 0.90 {}",
        m(0),
        m(1),
        m(2),
        list(&ratios, 3),
        m(3),
        m(4),
        verdict(m(2) >= 0.90)
    ))
}

// ---------------------------------------------------------------------------------------
// Scenario 2: latency at a steady rate

/// Watches XACK commands with MONITOR; returns (redis time in ns, ids) per XACK.
async fn monitor_acks(
    port: u16,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<Vec<(u64, Vec<String>)>> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"MONITOR\r\n").await?;
    let mut lines = BufReader::new(conn).lines();
    let mut acks = Vec::new();
    tokio::pin!(stop);
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = &mut stop => break,
        };
        let Some(line) = line else { break };
        if let Some((ts, args)) = parse_monitor_line(&line)
            && args.first().is_some_and(|c| c.eq_ignore_ascii_case("XACK"))
        {
            acks.push((ts, args.into_iter().skip(3).collect()));
        }
    }
    Ok(acks)
}

/// `+1700000000.123456 [0 127.0.0.1:5555] "XACK" "s" "g" "1-0"` -> (ns, args).
fn parse_monitor_line(line: &str) -> Option<(u64, Vec<String>)> {
    let line = line.strip_prefix('+')?;
    let (ts, rest) = line.split_once(' ')?;
    let (secs, micros) = ts.split_once('.')?;
    let ns = secs.parse::<u64>().ok()? * 1_000_000_000 + micros.parse::<u64>().ok()? * 1_000;
    let rest = &rest[rest.find("] ")? + 2..];
    let mut args = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        arg.push(n);
                    }
                }
                '"' => break,
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    Some((ns, args))
}

struct LatencyRun {
    start_ms: Vec<f64>,
    ack_ms: Vec<f64>,
}

async fn latency_run(opts: &Opts, dir: &Path, count: usize, rate: u64) -> Result<LatencyRun> {
    let redis = RedisServer::start(dir)?;
    let client = connect(&redis.url()).await?;
    let stamps = dir.join("stamps");
    let config = dir.join("config.toml");
    write_config(
        &config,
        &redis.url(),
        &[StreamSpec {
            name: "lat".to_owned(),
            handler: vec![
                opts.bin.join("stamp").to_string_lossy().into_owned(),
                stamps.to_string_lossy().into_owned(),
            ],
            max_block_read: 16,
            start_id: "$",
            extra: String::new(),
        }],
    )?;
    let mut daemon = Daemon::start(opts, &config, &dir.join("daemon.log"))?;
    daemon.wait_ready()?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let monitor = tokio::spawn(monitor_acks(redis.port, stop_rx));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let body = payload(PAYLOAD_BYTES);
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let mut sent: Vec<(String, u64)> = Vec::with_capacity(count);
    let t0 = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(t0 + period * i as u32).await;
        let at = now_ns();
        let id: Value = client
            .xadd("lat", false, None::<()>, "*", vec![("payload", body.as_slice())])
            .await?;
        sent.push((text(&id).ok_or("XADD returned no id")?, at));
    }
    let last = sent.last().map(|(id, _)| id.clone()).unwrap_or_default();
    wait_all_acked(
        &client,
        &[("lat".to_owned(), last)],
        Duration::from_millis(10),
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("{e}; daemon log: {}", daemon.log_tail()))?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop_tx.send(());
    let acks = monitor.await??;
    daemon.stop()?;
    let _ = client.quit().await;
    drop(redis);

    let mut started = std::collections::HashMap::new();
    for line in std::fs::read_to_string(&stamps)?.lines() {
        if let Some((id, ns)) = line.split_once(' ')
            && let Ok(ns) = ns.parse::<u64>()
        {
            started.entry(id.to_owned()).or_insert(ns);
        }
    }
    let mut acked = std::collections::HashMap::new();
    for (ns, ids) in acks {
        for id in ids {
            acked.entry(id).or_insert(ns);
        }
    }
    let (mut start_ms, mut ack_ms) = (Vec::new(), Vec::new());
    let ms = |later: u64, at: u64| (later as f64 - at as f64) / 1e6;
    // Every entry's times, for a closer look (kept with --keep).
    let mut tsv = String::from("id\txadd_ns\thandler_start_ns\txack_ns\n");
    for (id, at) in &sent {
        let s = started.get(id).ok_or_else(|| format!("no handler start stamp for {id}"))?;
        let a = acked.get(id).ok_or_else(|| format!("no XACK seen for {id}"))?;
        start_ms.push(ms(*s, *at));
        ack_ms.push(ms(*a, *at));
        let _ = writeln!(tsv, "{id}\t{at}\t{s}\t{a}");
    }
    std::fs::write(dir.join("latency.tsv"), tsv)?;
    start_ms.sort_by(|a, b| a.total_cmp(b));
    ack_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(LatencyRun { start_ms, ack_ms })
}

/// The latency floor: spawn-ceiling starting `stamp` at the same rate and concurrency,
/// no Redis; (p50, p99, max) ms from just before the spawn to the handler's start.
fn spawn_floor(opts: &Opts, dir: &Path, count: usize, rate: u64) -> Result<[f64; 3]> {
    let stamps = dir.join("floor-stamps").to_string_lossy().into_owned();
    let args: Vec<String> = [
        "--count", &count.to_string(), "--concurrency", "16", "--payload-bytes",
        &PAYLOAD_BYTES.to_string(), "--rate", &rate.to_string(), "--latency-file", &stamps, "--",
        &opts.bin.join("stamp").to_string_lossy(), &stamps,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let h = run_helper(opts, "spawn-ceiling", &args)?;
    Ok([h.get("p50_ms")?, h.get("p99_ms")?, h.get("max_ms")?])
}

async fn latency(opts: &Opts, count: usize, rate: u64) -> Result<String> {
    let mut figures: Vec<[f64; 9]> = Vec::new();
    for run in 0..opts.runs {
        let dir = run_dir(opts, &format!("s2-{run}"))?;
        let (r, floor) = alternating(
            run,
            latency_run(opts, &dir, count, rate),
            async { spawn_floor(opts, &dir, count, rate) },
        )
        .await?;
        let f = [
            percentile(&r.start_ms, 0.5),
            percentile(&r.start_ms, 0.99),
            percentile(&r.start_ms, 1.0),
            percentile(&r.ack_ms, 0.5),
            percentile(&r.ack_ms, 0.99),
            percentile(&r.ack_ms, 1.0),
            floor[0],
            floor[1],
            floor[2],
        ];
        eprintln!(
            "   2 run {}: XADD->start p50 {:.2} p99 {:.2} max {:.2} ms | XADD->XACK p50 {:.2} p99 {:.2} max {:.2} ms | spawn floor p50 {:.2} p99 {:.2} max {:.2} ms",
            run + 1,
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]
        );
        figures.push(f);
    }
    let m = |i: usize| median(&figures.iter().map(|f| f[i]).collect::<Vec<_>>());
    let p99s: Vec<f64> = figures.iter().map(|f| f[1]).collect();
    Ok(format!(
        "latency, {count} entries at {rate}/s, max_block_read 16: XADD->handler start p50 {:.2} p99 {:.2} max {:.2} ms | XADD->XACK p50 {:.2} p99 {:.2} max {:.2} ms | spawn->start floor (no Redis) p50 {:.2} p99 {:.2} max {:.2} ms  (start p99 runs: {})  target start p99 < 5 ms {}",
        m(0), m(1), m(2), m(3), m(4), m(5), m(6), m(7), m(8),
        list(&p99s, 2),
        verdict(m(1) < 5.0)
    ))
}

// ---------------------------------------------------------------------------------------
// Scenario 3: fan-in over many streams, and idle memory

/// (VmRSS, RssAnon) in KiB of a daemon with `streams` empty streams, ~2 s after it
/// reported ready. RssAnon leaves out the mapped binary and libraries (RssFile), which
/// are page cache shared with every other process using the same files.
async fn idle_rss(opts: &Opts, dir: &Path, streams: usize) -> Result<(u64, u64)> {
    let redis = RedisServer::start(dir)?;
    let specs: Vec<StreamSpec> = (0..streams)
        .map(|i| StreamSpec {
            name: format!("idle:{i}"),
            handler: vec!["/bin/true".to_owned()],
            max_block_read: 4,
            start_id: "$",
            extra: String::new(),
        })
        .collect();
    let config = dir.join(format!("idle-{streams}.toml"));
    write_config(&config, &redis.url(), &specs)?;
    let mut daemon = Daemon::start(opts, &config, &dir.join(format!("idle-{streams}.log")))?;
    daemon.wait_ready()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = proc_status_kib(daemon.pid(), "VmRSS").ok_or("cannot read VmRSS")?;
    let anon = proc_status_kib(daemon.pid(), "RssAnon").unwrap_or(0);
    daemon.stop()?;
    drop(redis);
    Ok((rss, anon))
}

async fn fan_in(opts: &Opts, n: usize, streams: usize, mbr: usize) -> Result<String> {
    let handler = vec!["/bin/true".to_owned()];
    let concurrency = streams * mbr;
    let mut rows: Vec<[f64; 8]> = Vec::new();
    for run in 0..opts.runs {
        let dir = run_dir(opts, &format!("s3-{run}"))?;
        let poll = Duration::from_millis(20);
        let ((d, hwm, _), (c, _)) = alternating(
            run,
            daemon_throughput(opts, &dir, streams, n, &handler, mbr, poll),
            async { spawn_ceiling(opts, n, concurrency, &handler) },
        )
        .await?;
        let (idle1, anon1) = idle_rss(opts, &dir, 1).await?;
        let (idle_n, anon_n) = idle_rss(opts, &dir, streams).await?;
        eprintln!(
            "   3 run {}: daemon {d:.0}/s ceiling(c={concurrency}) {c:.0}/s ratio {:.3} peak RSS {:.1} MiB | idle RSS 1 stream {:.1} MiB (anon {:.1}), {streams} streams {:.1} MiB (anon {:.1})",
            run + 1,
            d / c,
            mib(hwm),
            mib(idle1),
            mib(anon1),
            mib(idle_n),
            mib(anon_n)
        );
        rows.push([d, c, d / c, mib(hwm), mib(idle1), mib(idle_n), mib(anon1), mib(anon_n)]);
    }
    let m = |i: usize| median(&rows.iter().map(|f| f[i]).collect::<Vec<_>>());
    Ok(format!(
        "fan-in, {streams} streams x max_block_read {mbr}, {n} entries, /bin/true: daemon {:.0}/s  spawn ceiling (concurrency {concurrency}) {:.0}/s  ratio {:.3}  peak RSS {:.1} MiB | idle RSS: 1 stream {:.1} MiB (anon {:.1}), {streams} streams {:.1} MiB (anon {:.1})  target idle {streams} streams < 15 MiB {}",
        m(0), m(1), m(2), m(3), m(4), m(6), m(5), m(7),
        verdict(m(5) < 15.0)
    ))
}

// ---------------------------------------------------------------------------------------
// Scenario 4: long-running handlers (worker mode) vs the Redis ceiling

/// Does this daemon build know `mode = "worker"`? (`--check` on a config that uses it.)
fn daemon_has_worker_mode(opts: &Opts, dir: &Path) -> Result<bool> {
    let config = dir.join("probe.toml");
    write_config(
        &config,
        "redis://127.0.0.1:1/0",
        &[StreamSpec {
            name: "probe".to_owned(),
            handler: vec![opts.bin.join("ok-worker").to_string_lossy().into_owned()],
            max_block_read: 1,
            start_id: "0",
            extra: "mode = \"worker\"\n".to_owned(),
        }],
    )?;
    let out = Command::new(&opts.daemon)
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .output()?;
    Ok(out.status.success())
}

/// The Redis ceiling over `n` preloaded entries in a fresh redis-server: entries/s from
/// the start of `redis-ceiling` to its last XACK (wall clock, as for the daemon).
async fn redis_ceiling(opts: &Opts, dir: &Path, n: usize) -> Result<(f64, f64)> {
    let redis = RedisServer::start(dir)?;
    let client = connect(&redis.url()).await?;
    preload(&client, "work", "payload", &payload(PAYLOAD_BYTES), n).await?;
    let _: Value = client.xgroup_create("work", GROUP, "0", false).await?;
    let args: Vec<String> = [
        "--url", &redis.url(), "--stream", "work", "--group", GROUP, "--count", &n.to_string(),
        "--batch", "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let h = run_helper(opts, "redis-ceiling", &args)?;
    let info = bench::group_info(&client, "work", GROUP).await?;
    if info.pending != 0 {
        return Err(format!("redis-ceiling left {} entries pending", info.pending).into());
    }
    let _ = client.quit().await;
    Ok((n as f64 / h.wall, h.get("cpu_s")?))
}

/// One worker-mode daemon run over `n` preloaded entries: entries/s from daemon start to
/// the last XACK.
async fn worker_throughput(opts: &Opts, dir: &Path, n: usize, mbr: usize) -> Result<(f64, f64)> {
    let redis = RedisServer::start(dir)?;
    let client = connect(&redis.url()).await?;
    let last = preload(&client, "work", "payload", &payload(PAYLOAD_BYTES), n).await?;
    let _: Value = client.xgroup_create("work", GROUP, "0", false).await?;
    let config = dir.join("worker.toml");
    write_config(
        &config,
        &redis.url(),
        &[StreamSpec {
            name: "work".to_owned(),
            handler: vec![opts.bin.join("ok-worker").to_string_lossy().into_owned()],
            max_block_read: mbr,
            start_id: "0",
            extra: "mode = \"worker\"\n".to_owned(),
        }],
    )?;
    let started = Instant::now();
    let daemon = Daemon::start(opts, &config, &dir.join("worker.log"))?;
    let done = wait_all_acked(
        &client,
        &[("work".to_owned(), last)],
        Duration::from_millis(5),
        Duration::from_secs(300),
    )
    .await
    .map_err(|e| format!("{e}; daemon log: {}", daemon.log_tail()))?;
    let secs = done.duration_since(started).as_secs_f64();
    let cpu = bench::proc_cpu_secs(daemon.pid()).unwrap_or(f64::NAN);
    daemon.stop()?;
    let dead: u64 = client.xlen("work:dlq").await?;
    if dead > 0 {
        return Err(format!("{dead} entries went to the DLQ").into());
    }
    let _ = client.quit().await;
    Ok((n as f64 / secs, cpu))
}

async fn worker(opts: &Opts, n: usize, mbr: usize) -> Result<String> {
    let probe = run_dir(opts, "s4-probe")?;
    if !daemon_has_worker_mode(opts, &probe)? {
        return Ok("worker mode: skipped: worker mode not available".to_owned());
    }
    let mut rows: Vec<[f64; 5]> = Vec::new();
    for run in 0..opts.runs {
        let dir = run_dir(opts, &format!("s4-{mbr}-{run}"))?;
        let ((d, dcpu), (c, ccpu)) = alternating(
            run,
            worker_throughput(opts, &dir, n, mbr),
            redis_ceiling(opts, &dir, n),
        )
        .await?;
        let (dus, cus) = (dcpu * 1e6 / n as f64, ccpu * 1e6 / n as f64);
        eprintln!(
            "   4 max_block_read {mbr} run {}: daemon {d:.0}/s redis ceiling {c:.0}/s ratio {:.3} | own CPU per entry: daemon {dus:.1} us, ceiling {cus:.1} us",
            run + 1,
            d / c
        );
        rows.push([d, c, d / c, dus, cus]);
    }
    let m = |i: usize| median(&rows.iter().map(|f| f[i]).collect::<Vec<_>>());
    let ratios: Vec<f64> = rows.iter().map(|f| f[2]).collect();
    Ok(format!(
        "worker mode, ok-worker, {n} entries, max_block_read {mbr}: daemon {:.0}/s  redis ceiling (COUNT 100) {:.0}/s  ratio {:.3} (runs: {})  own CPU/entry daemon {:.1} us, ceiling {:.1} us  target >= 50000/s {} and >= 0.50 {}",
        m(0),
        m(1),
        m(2),
        list(&ratios, 3),
        m(3),
        m(4),
        verdict(m(0) >= 50_000.0),
        verdict(m(2) >= 0.5)
    ))
}

// ---------------------------------------------------------------------------------------
// Scenario 5: 1, 2 and 4 daemons sharing a group on a 3-primary Cluster (worker mode)

/// Does this daemon build take `redis-cluster://` URLs? (`--check`, no Redis needed.)
fn daemon_has_cluster_urls(opts: &Opts, dir: &Path) -> Result<bool> {
    let config = dir.join("probe-cluster.toml");
    write_config(
        &config,
        "redis-cluster://127.0.0.1:1?node=127.0.0.1:2",
        &[StreamSpec {
            name: "probe".to_owned(),
            handler: vec![opts.bin.join("ok-worker").to_string_lossy().into_owned()],
            max_block_read: 1,
            start_id: "0",
            extra: "mode = \"worker\"\n".to_owned(),
        }],
    )?;
    let out = Command::new(&opts.daemon)
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .output()?;
    Ok(out.status.success())
}

/// One stream per primary, `n` entries in all preloaded (each on its owner, group at 0);
/// returns (stream, last id, a client of its owner).
async fn cluster_preload(
    cluster: &BenchCluster,
    prefix: &str,
    n: usize,
) -> Result<Vec<(String, String, Client)>> {
    let names = cluster.stream_per_node(prefix);
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let client = connect(&cluster.owner(name).url()).await?;
        let share = n / names.len() + usize::from(i < n % names.len());
        let last = preload(&client, name, "payload", &payload(PAYLOAD_BYTES), share).await?;
        let _: Value = client.xgroup_create(name.as_str(), GROUP, "0", false).await?;
        out.push((name.clone(), last, client));
    }
    Ok(out)
}

/// What one scenario-5 measurement gives: entries/s, and CPU seconds used meanwhile by
/// the daemons, their workers and the redis-servers.
struct ClusterRun {
    rate: f64,
    daemons_cpu: f64,
    workers_cpu: f64,
    redis_cpu: f64,
}

fn redis_cpu(cluster: &BenchCluster) -> f64 {
    cluster
        .nodes
        .iter()
        .map(|n| bench::proc_cpu_secs(n.pid()).unwrap_or(f64::NAN))
        .sum()
}

/// `k` daemons (consumers bench-0 ..) sharing the group of one stream per primary, worker
/// mode: entries/s and CPU from the moment every daemon is ready to the last XACK.
async fn cluster_daemons(
    opts: &Opts,
    dir: &Path,
    cluster: &BenchCluster,
    n: usize,
    k: usize,
    mbr: usize,
) -> Result<ClusterRun> {
    let streams = cluster_preload(cluster, &format!("w{k}"), n).await?;
    let specs: Vec<StreamSpec> = streams
        .iter()
        .map(|(name, _, _)| StreamSpec {
            name: name.clone(),
            handler: vec![opts.bin.join("ok-worker").to_string_lossy().into_owned()],
            max_block_read: mbr,
            start_id: "0",
            extra: "mode = \"worker\"\n".to_owned(),
        })
        .collect();
    let mut configs = Vec::new();
    for j in 0..k {
        let config = dir.join(format!("cluster-{k}-{j}.toml"));
        write_config_as(&config, &cluster.url(), &format!("bench-{j}"), &specs)?;
        configs.push(config);
    }
    let mut daemons = Vec::new();
    for (j, config) in configs.iter().enumerate() {
        daemons.push(Daemon::start(opts, config, &dir.join(format!("cluster-{k}-{j}.log")))?);
    }
    // The window starts once every daemon is ready (its workers and connections set up:
    // with 4 daemons, 192 workers), so start-up does not count; entries acked before that
    // are left out of the rate.
    for d in &mut daemons {
        d.wait_ready()?;
    }
    let daemons_cpu = |ds: &[Daemon]| -> (f64, f64) {
        let own = ds.iter().map(|d| bench::proc_cpu_secs(d.pid()).unwrap_or(f64::NAN)).sum();
        let workers = ds.iter().map(|d| bench::children_cpu_secs(d.pid())).sum();
        (own, workers)
    };
    let (own_before, workers_before) = daemons_cpu(&daemons);
    let redis_before = redis_cpu(cluster);
    let started = Instant::now();
    let mut acked_before = 0;
    for (name, _, client) in &streams {
        let info = bench::group_info(client, name, GROUP).await?;
        acked_before += info.entries_read.unwrap_or(0).saturating_sub(info.pending);
    }
    let measured = n.saturating_sub(acked_before as usize);
    if measured < n / 2 {
        return Err(format!("{acked_before} of {n} entries acked before every daemon was ready").into());
    }
    let mut done = started;
    for (name, last, client) in &streams {
        let target = [(name.clone(), last.clone())];
        done = wait_all_acked(client, &target, Duration::from_millis(5), Duration::from_secs(300))
            .await
            .map_err(|e| format!("{e}; daemon log: {}", daemons[0].log_tail()))?;
    }
    let secs = done.duration_since(started).as_secs_f64();
    let redis_cpu = redis_cpu(cluster) - redis_before;
    let (own_after, workers_after) = daemons_cpu(&daemons);
    for d in daemons {
        d.stop()?;
    }
    for (name, _, client) in &streams {
        let dead: u64 = client.xlen(format!("{name}:dlq")).await?;
        if dead > 0 {
            return Err(format!("{dead} entries of {name} went to the DLQ").into());
        }
        let _: i64 = client.del(name.as_str()).await?;
        let _ = client.quit().await;
    }
    // CPU per entry is taken over `n` entries everywhere: scale the window's CPU to it.
    let scale = n as f64 / measured as f64;
    Ok(ClusterRun {
        rate: measured as f64 / secs,
        daemons_cpu: (own_after - own_before) * scale,
        workers_cpu: (workers_after - workers_before) * scale,
        redis_cpu: redis_cpu * scale,
    })
}

/// The Redis ceiling of the cluster: one `redis-ceiling` per primary at once, each on its
/// own stream and node. Entries/s from their start to the last one's exit, and the CPU
/// seconds used by the consumers and by the redis-servers meanwhile.
async fn cluster_ceiling(opts: &Opts, cluster: &BenchCluster, n: usize) -> Result<ClusterRun> {
    let streams = cluster_preload(cluster, "ceiling", n).await?;
    let redis_before = redis_cpu(cluster);
    let started = Instant::now();
    let mut children = Vec::new();
    for (name, _, _) in &streams {
        let share = n / streams.len() + usize::from(children.len() < n % streams.len());
        let child = Command::new(opts.bin.join("redis-ceiling"))
            .args(["--url", &cluster.owner(name).url(), "--stream", name, "--group", GROUP])
            .args(["--count", &share.to_string(), "--batch", "100"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("redis-ceiling: {e}"))?;
        children.push(child);
    }
    let mut consumers_cpu = 0.0;
    for child in children {
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("redis-ceiling failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        consumers_cpu += stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("cpu_s=")?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
    }
    let secs = started.elapsed().as_secs_f64();
    let redis_cpu = redis_cpu(cluster) - redis_before;
    for (name, _, client) in &streams {
        let _: i64 = client.del(name.as_str()).await?;
        let _ = client.quit().await;
    }
    Ok(ClusterRun {
        rate: n as f64 / secs,
        daemons_cpu: consumers_cpu,
        workers_cpu: 0.0,
        redis_cpu,
    })
}

async fn cluster_scale(opts: &Opts, n: usize, mbr: usize) -> Result<String> {
    let probe = run_dir(opts, "s5-probe")?;
    if !daemon_has_cluster_urls(opts, &probe)? {
        return Ok("cluster: skipped: this daemon does not take redis-cluster:// URLs".to_owned());
    }
    // Per run: 1, 2 and 4 daemons (order reversed every other run), then the ceiling.
    // Row: rates (1, 2, 4, ceiling), ratios (2/1, 4/1, 1/ceiling), then per k the CPU
    // microseconds per entry of daemons, workers and redis-servers.
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for run in 0..opts.runs {
        let dir = run_dir(opts, &format!("s5-{run}"))?;
        let cluster = BenchCluster::start(&dir, 3).await?;
        let order: [usize; 3] = if run.is_multiple_of(2) { [1, 2, 4] } else { [4, 2, 1] };
        let mut m: [Option<ClusterRun>; 3] = [None, None, None];
        for k in order {
            m[k.trailing_zeros() as usize] =
                Some(cluster_daemons(opts, &dir, &cluster, n, k, mbr).await?);
        }
        let c = cluster_ceiling(opts, &cluster, n).await?;
        let ceiling = c.rate;
        let mut m: Vec<ClusterRun> = m.into_iter().flatten().collect();
        let us = |s: f64| s * 1e6 / n as f64;
        let mut row = vec![m[0].rate, m[1].rate, m[2].rate, ceiling];
        row.extend([m[1].rate / m[0].rate, m[2].rate / m[0].rate, m[0].rate / ceiling]);
        m.push(c);
        for r in &m {
            row.extend([us(r.daemons_cpu), us(r.workers_cpu), us(r.redis_cpu)]);
        }
        eprintln!(
            "   5 run {}: 1 daemon {:.0}/s, 2 daemons {:.0}/s, 4 daemons {:.0}/s, ceiling {ceiling:.0}/s | 2/1 {:.3} 4/1 {:.3} 1/ceiling {:.3} | CPU us/entry daemons (ceiling: consumers)+workers+redis: {}",
            run + 1,
            row[0],
            row[1],
            row[2],
            row[4],
            row[5],
            row[6],
            cpu_breakdown(&row)
        );
        rows.push(row);
    }
    let med: Vec<f64> = (0..rows[0].len())
        .map(|i| median(&rows.iter().map(|r| r[i]).collect::<Vec<_>>()))
        .collect();
    let r = |i: usize| list(&rows.iter().map(|f| f[i]).collect::<Vec<_>>(), 3);
    Ok(format!(
        "cluster, 3 primaries, one stream each, worker mode, ok-worker, {n} entries, max_block_read {mbr}: 1 daemon {:.0}/s  2 daemons {:.0}/s  4 daemons {:.0}/s  redis ceiling (3 consumers) {:.0}/s | 2/1 {:.3} (runs: {})  4/1 {:.3} (runs: {})  1/ceiling {:.3} | CPU us/entry daemons (ceiling: consumers)+workers+redis: {}",
        med[0],
        med[1],
        med[2],
        med[3],
        med[4],
        r(4),
        med[5],
        r(5),
        med[6],
        cpu_breakdown(&med)
    ))
}

/// `1: a+b+c=t  2: ...  4: ...  ceiling: a+0+c=t` from a scenario-5 row.
fn cpu_breakdown(row: &[f64]) -> String {
    ["1", "2", "4", "ceiling"]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let c = &row[7 + 3 * i..10 + 3 * i];
            format!("{k}: {:.1}+{:.1}+{:.1}={:.1}", c[0], c[1], c[2], c.iter().sum::<f64>())
        })
        .collect::<Vec<_>>()
        .join("  ")
}
