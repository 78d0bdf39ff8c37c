//! Metrics, health endpoints and JSON logs, checked against what a real run did.

mod common;

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
    )
    .replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
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
    )
    .replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let mut d = Daemon::start(&cfg);
    d.wait_until(LONG, "/healthz answers", || async move {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    })
    .await;
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(503));
    d.sigterm();
    assert_eq!(d.wait_exit(MEDIUM).code(), Some(0), "{}", d.log_tail());
}
