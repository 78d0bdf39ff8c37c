//! Metrics, health endpoints and JSON logs, checked against what a real run did.

mod common;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_match_what_happened() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "payload=$(cat); [ \"$payload\" = bad ] && { echo broken >&2; exit 4; }; exit 0",
    );
    let port = free_port();
    let cfg = config(
        &redis.url(),
        &stream_table(
            "jobs",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 2\nretry_backoff = \"100ms\"",
        ),
    );
    let cfg = with_metrics_listen(&cfg, port);
    let c = TestClient::connect(&redis.url()).await;
    for i in 0..5 {
        c.xadd("jobs", &[("payload", format!("ok {i}").as_bytes())])
            .await;
    }
    c.xadd("jobs", &[("payload", b"bad")]).await;
    let d = Daemon::start_with(&cfg, &["--log-format", "json", "--log-level", "debug"], &[]);

    d.wait_until(LONG, "/readyz answers 200", || async move {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    })
    .await;
    let cr = &c;
    d.wait_until(LONG, "5 acked and 1 dead-lettered", || async move {
        cr.xlen("jobs:dlq").await == 1 && cr.pending_count("jobs", "g").await == 0
    })
    .await;
    // Counters settle once the acks are confirmed and the sampler ran (every 5 s).
    let want = [
        ("redis_streamd_entries_read_total", 6.0),
        ("redis_streamd_entries_acked_total", 5.0),
        ("redis_streamd_failed_attempts_total", 2.0),
        ("redis_streamd_retries_total", 1.0),
        ("redis_streamd_dead_lettered_total", 1.0),
        ("redis_streamd_handler_duration_seconds_count", 7.0),
        ("redis_streamd_handlers_in_flight", 0.0),
        ("redis_streamd_group_pending", 0.0),
        ("redis_streamd_group_lag", 0.0),
    ];
    d.wait_until(LONG, "metrics match the run", || async move {
        let Some((200, scrape)) = http_get(port, "/metrics") else {
            return false;
        };
        want.iter()
            .all(|(name, value)| sample(&scrape, name, "jobs") == Some(*value))
    })
    .await;
    let (status, scrape) = http_get(port, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    assert!(scrape.contains("group=\"g\""), "{scrape}");
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(port, "/nope").map(|r| r.0), Some(404));

    // JSON logs: one object per line; handler events carry the fields operators filter on.
    let log = d.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let handled: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "handled")
        .collect();
    assert_eq!(handled.len(), 5, "{log}");
    for e in handled {
        for field in ["stream", "group", "id", "attempt", "elapsed_ms"] {
            assert!(!e[field].is_null(), "{field} missing in {e}");
        }
    }
    let failed = events
        .iter()
        .find(|e| e["message"] == "attempt failed")
        .expect("an attempt failed event");
    assert_eq!(failed["reason"], "exit code 4");
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "broken" && e["output"] == "stderr" && !e["id"].is_null()),
        "handler output lines carry the entry id: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_redis_is_unreachable() {
    let dead_port = free_port();
    let port = free_port();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat >/dev/null");
    let cfg = config(
        &format!("redis://127.0.0.1:{dead_port}/0"),
        &stream_table("jobs", "g", &script, ""),
    );
    let cfg = with_metrics_listen(&cfg, port);
    let mut d = Daemon::start(&cfg);
    d.wait_until(LONG, "/healthz answers", || async move {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    })
    .await;
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(503));
    d.sigterm();
    assert_eq!(d.wait_exit(MEDIUM).code(), Some(0), "{}", d.log_tail());
}

/// Keeps `n` TCP connections to 127.0.0.1:`port` open that never send a byte, reopening
/// the ones the server closes, until dropped: clients that connect and then stall (a port
/// scanner, a stuck scraper, a slowloris), without letting up.
struct IdleClients {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    sweeps: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleClients {
    fn start(port: u16, n: usize) -> IdleClients {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let sweeps = Arc::new(AtomicUsize::new(0));
        let (stop2, open2, sweeps2) = (stop.clone(), open.clone(), sweeps.clone());
        let addr = ([127, 0, 0, 1], port).into();
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
            while !stop2.load(Ordering::Relaxed) {
                for slot in conns.iter_mut() {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let alive = slot.as_mut().is_some_and(|c| {
                        let mut byte = [0u8; 1];
                        match c.read(&mut byte) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == ErrorKind::WouldBlock,
                        }
                    });
                    if !alive {
                        *slot = TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                            .ok()
                            .filter(|c| c.set_nonblocking(true).is_ok());
                    }
                }
                open2.store(conns.iter().flatten().count(), Ordering::Relaxed);
                sweeps2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        IdleClients {
            stop,
            open,
            sweeps,
            thread: Some(thread),
        }
    }

    /// How many were open after the last pass over them.
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Passes made over all of them (each tries to open the closed ones).
    fn sweeps(&self) -> usize {
        self.sweeps.load(Ordering::Relaxed)
    }
}

impl Drop for IdleClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The soft RLIMIT_NOFILE of this process (None when /proc cannot tell).
fn nofile_soft_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Hundreds of connections that send nothing must not silence the health endpoints: an
/// orchestrator whose probe goes unanswered kills a healthy daemon. The idle clients are
/// kept up (reopened whenever the daemon closes one) while the probes run, and each probe
/// gets an answer well within the 10 s a probe waits here, long before any of them
/// could have been let through by the idle ones timing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_hundreds_of_connections_idle() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat >/dev/null");
    let port = free_port();
    let cfg = config(
        &redis.url(),
        &stream_table("jobs", "g", &script, "block = \"200ms\""),
    );
    let cfg = with_metrics_listen(&cfg, port);
    let mut d = Daemon::start(&cfg);
    d.wait_until(LONG, "/readyz answers 200", || async move {
        matches!(http_get(port, "/readyz"), Some((200, _)))
    })
    .await;

    // 500 connections, fewer when this process may not open that many descriptors.
    let n = match nofile_soft_limit() {
        Some(limit) if limit < 1000 => {
            let n = (limit as usize).saturating_sub(200);
            eprintln!("note: RLIMIT_NOFILE {limit}: {n} idle connections instead of 500");
            n
        }
        _ => 500,
    };
    let idle = IdleClients::start(port, n);
    let idle_ref = &idle;
    d.wait_until(
        LONG,
        "every idle connection was tried once",
        || async move { idle_ref.sweeps() >= 1 },
    )
    .await;
    for round in 0..3 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let answer = http_get(port, path);
            assert!(
                matches!(answer, Some((200, _))),
                "round {round}: GET {path} with {} of {n} idle connections open: {answer:?}\n{}",
                idle.open(),
                d.log_tail()
            );
        }
    }
    d.assert_running();
    drop(idle);
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    d.sigterm();
    assert_eq!(d.wait_exit(MEDIUM).code(), Some(0), "{}", d.log_tail());
}
