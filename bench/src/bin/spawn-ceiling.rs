//! The spawn ceiling: how many handler runs per second this machine allows, with no Redis
//! and no daemon logic at all.
//!
//! Runs the handler `--count` times, at most `--concurrency` at once (a semaphore, like the
//! daemon's `max_block_read` slots), each exactly the way redis-streamd starts a handler:
//! tokio::process with `process_group(0)`, stdin/stdout/stderr piped, the payload written
//! and stdin closed while stdout and stderr are drained, then `wait`. The handler gets the
//! same five `REDIS_STREAMD_*` variables the daemon sets (part of the handler contract).
//!
//! Prints one line: `entries=N secs=S per_s=R cpu_s=C` (C: this program's own CPU time,
//! handlers not included).
//!
//! With `--rate R --latency-file F` it is the latency floor instead: one spawn every 1/R s
//! (still at most `--concurrency` at once); the handler must be `stamp F`, which appends
//! `$REDIS_STREAMD_ID <ns>` to F when it starts. Adds `p50_ms= p99_ms= max_ms=`: the
//! time from just before each spawn (in the task that spawns) to the handler's start.
//!
//! ```text
//! spawn-ceiling --count 20000 --concurrency 16 --payload-bytes 100 -- /bin/true
//! spawn-ceiling --count 2000 --rate 200 --latency-file /tmp/s -- bench/target/release/stamp /tmp/s
//! ```

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{Args, Result, now_ns, payload, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::Semaphore;

fn main() -> Result<()> {
    let args = Args::parse(&["--count", "--concurrency", "--payload-bytes", "--rate", "--latency-file"])?;
    let count: usize = args.parsed("--count", 20_000)?;
    let concurrency: usize = args.parsed("--concurrency", 16)?;
    let payload_bytes: usize = args.parsed("--payload-bytes", 100)?;
    let rate: f64 = args.parsed("--rate", 0.0)?;
    let latency_file = args.value("--latency-file").map(str::to_owned);
    if args.rest.is_empty() {
        return Err("usage: spawn-ceiling [--count N] [--concurrency C] [--payload-bytes B] [--rate R --latency-file F] -- HANDLER ARGS...".into());
    }
    let argv = Arc::new(args.rest.clone());
    let body: Arc<[u8]> = Arc::from(payload(payload_bytes).into_boxed_slice());

    // The daemon's runtime: tokio's default multi-threaded one.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (secs, failures, sent) = runtime.block_on(async move {
        let slots = Arc::new(Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let mut failures = 0usize;
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let t0 = tokio::time::Instant::now();
        for i in 0..count {
            if rate > 0.0 {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let permit = slots.clone().acquire_owned().await.expect("semaphore open");
            let argv = argv.clone();
            let body = body.clone();
            let id = format!("1700000000000-{i}");
            let sent = sent.clone();
            tasks.spawn(async move {
                let ok = run_one(&argv, body, &id, rate > 0.0, &sent).await;
                drop(permit);
                ok
            });
            // Reap finished tasks as we go so the set does not grow to `count`.
            while let Some(done) = tasks.try_join_next() {
                if !matches!(done, Ok(true)) {
                    failures += 1;
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            if !matches!(done, Ok(true)) {
                failures += 1;
            }
        }
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        (started.elapsed().as_secs_f64(), failures, sent)
    });
    if failures > 0 {
        eprintln!("spawn-ceiling: {failures} handler runs failed");
    }
    let mut line = format!(
        "entries={count} secs={secs:.3} per_s={:.1} cpu_s={:.3}",
        count as f64 / secs,
        bench::self_cpu_secs()
    );
    if let Some(file) = latency_file {
        let stamps: std::collections::HashMap<String, u64> = std::fs::read_to_string(&file)?
            .lines()
            .filter_map(|l| {
                let (id, ns) = l.split_once(' ')?;
                Some((id.to_owned(), ns.parse().ok()?))
            })
            .collect();
        let mut ms: Vec<f64> = sent
            .iter()
            .filter_map(|(id, at)| Some((*stamps.get(id)? as f64 - *at as f64) / 1e6))
            .collect();
        if ms.len() != sent.len() {
            return Err(format!("{} of {} handlers left no stamp", sent.len() - ms.len(), sent.len()).into());
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        line.push_str(&format!(
            " p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            percentile(&ms, 1.0)
        ));
    }
    println!("{line}");
    Ok(())
}

/// Time of each spawn (`REDIS_STREAMD_ID`, CLOCK_REALTIME ns just before it).
type Sent = Arc<std::sync::Mutex<Vec<(String, u64)>>>;

async fn run_one(argv: &[String], body: Arc<[u8]>, id: &str, record: bool, sent: &Sent) -> bool {
    if record {
        sent.lock().unwrap().push((id.to_owned(), now_ns()));
    }
    let mut child = match Command::new(&argv[0])
        .args(&argv[1..])
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("REDIS_STREAMD_STREAM", "bench")
        .env("REDIS_STREAMD_GROUP", "bench")
        .env("REDIS_STREAMD_CONSUMER", "bench")
        .env("REDIS_STREAMD_ID", id)
        .env("REDIS_STREAMD_ATTEMPT", "1")
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("spawn failed: {e}");
            return false;
        }
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let write = async {
        if let Some(pipe) = stdin.as_mut() {
            let _ = pipe.write_all(&body).await; // EPIPE when the handler does not read: fine
        }
        drop(stdin.take());
    };
    let read_out = async {
        if let Some(pipe) = stdout.as_mut() {
            let mut buf = [0u8; 8192];
            while matches!(pipe.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    };
    let read_err = async {
        if let Some(pipe) = stderr.as_mut() {
            let mut buf = [0u8; 8192];
            while matches!(pipe.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    };
    tokio::join!(write, read_out, read_err);
    matches!(child.wait().await, Ok(status) if status.success())
}
