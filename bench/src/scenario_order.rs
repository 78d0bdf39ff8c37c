//! Scenario 5 of `bench` (a module of src/bin/bench.rs): per-key ordering (issue 12)
//! against the same run without `order_by`, back to back in each run.
//!
//! - 6a: consumer scope, one daemon, `/bin/true`, `max_block_read = 16`.
//! - 6b: group scope, two daemons (consumers `bench-a`, `bench-b`) in one group.
//!
//! Entries carry a key field `k` (1,000 keys, picked pseudo-randomly with a fixed seed, so
//! both sides of a run get the same stream) and the usual 100-byte payload. Figures:
//! entries/s from the daemons' start to the last XACK, the daemons' and redis-server's
//! CPU per entry; and, from a separate short run of each side under MONITOR (not timed),
//! the commands the daemons sent to Redis per entry (round trips; commands a Lua script
//! runs inside Redis are not round trips and are left out).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bench::{RedisServer, Result, connect, median, payload};
use fred::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{
    Daemon, GROUP, Opts, PAYLOAD_BYTES, alternating, list, parse_monitor_line, run_dir, toml_str,
    verdict, wait_all_acked,
};

/// Keys of every scenario 5 run.
const KEYS: usize = 1_000;
/// Entries of the MONITOR runs that count round trips.
const COUNTED: usize = 2_000;

/// What a run orders by.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    None,
    Consumer,
    Group,
}

impl Order {
    fn toml(self) -> &'static str {
        match self {
            Order::None => "",
            Order::Consumer => "order_by = \"k\"\n",
            Order::Group => "order_by = \"k\"\norder_scope = \"group\"\n",
        }
    }
}

/// Adds `n` entries `k = k<random 0..KEYS>`, `payload = <100 bytes>`; returns the last id.
async fn preload_keyed(client: &Client, stream: &str, n: usize) -> Result<String> {
    let body = payload(PAYLOAD_BYTES);
    let mut rnd: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut last = String::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        let pipeline = client.pipeline();
        for _ in 0..batch {
            rnd ^= rnd << 13;
            rnd ^= rnd >> 7;
            rnd ^= rnd << 17;
            let key = format!("k{}", rnd % KEYS as u64);
            let fields: Vec<(&str, &[u8])> = vec![("k", key.as_bytes()), ("payload", &body)];
            let _: () = pipeline.xadd(stream, false, None::<()>, "*", fields).await?;
        }
        let ids: Vec<Value> = pipeline.all().await?;
        if let Some(id) = ids.last().and_then(bench::text) {
            last = id;
        }
        left -= batch;
    }
    Ok(last)
}

fn write_config(path: &Path, url: &str, consumer: &str, order: Order) -> Result<()> {
    let mut toml = String::new();
    let _ = writeln!(toml, "[redis]\nurl = {}\n", toml_str(url));
    let _ = writeln!(
        toml,
        "[daemon]\nconsumer = {}\nshutdown_timeout = \"10s\"\n",
        toml_str(consumer)
    );
    let _ = writeln!(
        toml,
        "[[streams]]\nname = \"work\"\ngroup = {}\nhandler = [\"/bin/true\"]\nmax_block_read = 16\nstart_id = \"0\"\n{}",
        toml_str(GROUP),
        order.toml()
    );
    std::fs::write(path, toml)?;
    Ok(())
}

/// Counts, from MONITOR, the commands clients other than Lua scripts send, by name.
async fn monitor_commands(
    port: u16,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<BTreeMap<String, u64>> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"MONITOR\r\n").await?;
    let mut lines = BufReader::new(conn).lines();
    let mut counts = BTreeMap::new();
    tokio::pin!(stop);
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = &mut stop => break,
        };
        let Some(line) = line else { break };
        if line.contains(" lua] ") {
            continue;
        }
        if let Some((_, args)) = parse_monitor_line(&line)
            && let Some(name) = args.first()
        {
            *counts.entry(name.to_ascii_uppercase()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// One run: `daemons` daemons ordering by `order` over `n` preloaded entries. Returns
/// (entries/s, daemons' CPU µs per entry, redis-server's CPU µs per entry, commands per
/// entry by name when `count` is set).
async fn run(
    opts: &Opts,
    dir: &Path,
    n: usize,
    daemons: usize,
    order: Order,
    count: bool,
) -> Result<(f64, f64, f64, BTreeMap<String, f64>)> {
    let redis = RedisServer::start(dir)?;
    let client = connect(&redis.url()).await?;
    let last = preload_keyed(&client, "work", n).await?;
    let _: Value = client.xgroup_create("work", GROUP, "0", false).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let monitor = count.then(|| tokio::spawn(monitor_commands(redis.port, stop_rx)));
    if count {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let redis_cpu0 = bench::proc_cpu_secs(redis.pid()).unwrap_or(0.0);
    let started = Instant::now();
    let mut running = Vec::new();
    for i in 0..daemons {
        let name = format!("bench-{}", (b'a' + i as u8) as char);
        let config = dir.join(format!("{name}.toml"));
        write_config(&config, &redis.url(), &name, order)?;
        running.push(Daemon::start(opts, &config, &dir.join(format!("{name}.log")))?);
    }
    let done = wait_all_acked(
        &client,
        &[("work".to_owned(), last)],
        Duration::from_millis(5),
        Duration::from_secs(300),
    )
    .await;
    let cpu: f64 = running
        .iter()
        .map(|d| bench::proc_cpu_secs(d.pid()).unwrap_or(f64::NAN))
        .sum();
    let redis_cpu = bench::proc_cpu_secs(redis.pid()).unwrap_or(f64::NAN) - redis_cpu0;
    let done = done.map_err(|e| {
        let tails: Vec<String> = running.iter().map(|d| d.log_tail()).collect();
        format!("{e}; daemon logs: {}", tails.join(" || "))
    })?;
    let secs = done.duration_since(started).as_secs_f64();
    for daemon in running {
        daemon.stop()?;
    }
    let per_entry = match monitor {
        Some(monitor) => {
            let _ = stop_tx.send(());
            let counts = monitor.await.map_err(|e| e.to_string())??;
            counts
                .into_iter()
                .map(|(name, c)| (name, c as f64 / n as f64))
                .collect()
        }
        None => BTreeMap::new(),
    };
    let dead: u64 = client.xlen("work:dlq").await?;
    if dead > 0 {
        return Err(format!("{dead} entries went to the DLQ").into());
    }
    let _ = client.quit().await;
    Ok((
        n as f64 / secs,
        cpu * 1e6 / n as f64,
        redis_cpu * 1e6 / n as f64,
        per_entry,
    ))
}

/// `XREADGROUP 0.52 XACK 0.06 ... = 0.61`: commands per entry, daemons to Redis, without
/// the monitor's own and the bench's setup (XADD, XGROUP, XINFO).
fn round_trips(per_entry: &BTreeMap<String, f64>) -> String {
    let skip = ["XADD", "XGROUP", "XINFO", "MONITOR", "PING", "CLIENT", "INFO", "QUIT", "XLEN"];
    let mut text = String::new();
    let mut total = 0.0;
    for (name, v) in per_entry {
        if skip.contains(&name.as_str()) || *v < 0.0005 {
            continue;
        }
        total += v;
        let _ = write!(text, "{name} {v:.3} ");
    }
    let _ = write!(text, "= {total:.2}");
    text
}

/// Scenario 6a (`group` false) or 6b (`group` true).
pub(super) async fn ordered(opts: &Opts, n: usize, group: bool) -> Result<String> {
    let (daemons, order, label, target) = if group {
        (2, Order::Group, "group scope, 2 daemons", 0.8)
    } else {
        (1, Order::Consumer, "consumer scope, 1 daemon", 0.9)
    };
    let tag = if group { "6b" } else { "6a" };
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for r in 0..opts.runs {
        let dir = run_dir(opts, &format!("s{tag}-{r}"))?;
        let plain_dir = dir.join("plain");
        let ((o, ocpu, oredis, _), (p, pcpu, predis, _)) = alternating(
            r,
            run(opts, &dir, n, daemons, order, false),
            run(opts, &plain_dir, n, daemons, Order::None, false),
        )
        .await?;
        eprintln!(
            "   {tag} run {}: ordered {o:.0}/s unordered {p:.0}/s ratio {:.3} | CPU per entry: daemons {ocpu:.0} vs {pcpu:.0} us, redis-server {oredis:.0} vs {predis:.0} us",
            r + 1,
            o / p
        );
        rows.push([o, p, o / p, ocpu, pcpu, oredis, predis]);
    }
    let counted = n.min(COUNTED);
    let dir = run_dir(opts, &format!("s{tag}-count"))?;
    let (.., ordered_rt) = run(opts, &dir, counted, daemons, order, true).await?;
    let (.., plain_rt) = run(opts, &dir.join("plain"), counted, daemons, Order::None, true).await?;
    let m = |i: usize| median(&rows.iter().map(|f| f[i]).collect::<Vec<_>>());
    let ratios: Vec<f64> = rows.iter().map(|f| f[2]).collect();
    Ok(format!(
        "order_by, {label}, {KEYS} keys, {n} entries, /bin/true, max_block_read 16: ordered {:.0}/s  unordered {:.0}/s  ratio {:.3} (runs: {})  CPU/entry daemons {:.0} vs {:.0} us, redis-server {:.0} vs {:.0} us  round trips/entry ({counted} entries under MONITOR): ordered {} | unordered {}  target >= {target:.2} {}",
        m(0),
        m(1),
        m(2),
        list(&ratios, 3),
        m(3),
        m(4),
        m(5),
        m(6),
        round_trips(&ordered_rt),
        round_trips(&plain_rt),
        verdict(m(2) >= target)
    ))
}
