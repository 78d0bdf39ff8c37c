//! Hardening (issue 14) against real processes: the daemon's own limits never dead-letter
//! healthy entries, shutdown is bounded when Redis hangs, entries deleted under us are
//! logged and counted alike, and every handler event carries its run time.

mod common;
mod faults_support;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use faults_support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Sets both limits of RLIMIT_NOFILE of a running process with prlimit(1).
fn set_nofile(pid: u32, limit: usize) {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
}

/// Item 2: with too few file descriptors for every handler, spawns fail with EMFILE;
/// those entries wait and run again without using up an attempt: none is dead-lettered,
/// every handler run is attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_waits_instead_of_dead_lettering() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ID $REDIS_STREAMD_ATTEMPT\" >> \"$D/runs\"\nsleep 0.3",
    );
    let port = free_port();
    let cfg = config(
        &redis.url(),
        &fast_stream(
            "jobs",
            "g",
            &script,
            "max_block_read = 40\nmax_attempts = 1",
        ),
    );
    let cfg = with_metrics_listen(&cfg, port);
    let c = TestClient::connect(&redis.url()).await;
    let d = Daemon::start(&cfg);
    d.wait_group(&c, "jobs", "g").await;
    assert!(
        d.log().contains("RLIMIT_NOFILE"),
        "the start logs the descriptor limit: {}",
        d.log_tail()
    );
    // Room for a few handlers only: each takes three pipes.
    set_nofile(d.pid(), open_fds(d.pid()) + 12);
    let mut last = String::new();
    for i in 0..40 {
        last = c
            .xadd("jobs", &[("payload", format!("p{i}").as_bytes())])
            .await;
    }
    d.wait_settled(&c, "jobs", "g", &last).await;
    assert_eq!(c.xlen("jobs:dlq").await, 0, "{}", d.log_tail());
    let runs = fs::read_to_string(work.path().join("runs")).unwrap_or_default();
    assert_eq!(runs.lines().count(), 40, "{runs}");
    assert!(runs.lines().all(|l| l.ends_with(" 1")), "{runs}");
    assert!(
        d.log().contains("want of resources"),
        "EMFILE was hit and logged: {}",
        d.log_tail()
    );
    d.wait_until(LONG, "resource waits counted", || async move {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "redis_streamd_resource_waits_total", "jobs").is_some_and(|v| v > 0.0)
        })
    })
    .await;
}

/// Item 7: with Redis frozen, SIGTERM still ends the daemon within the shutdown budget
/// (`shutdown_timeout` 5s + 5s kill grace + 10s final acks), leaving what it could not
/// settle pending. The handlers (2 s) finish after the freeze and inside
/// `shutdown_timeout`, so their acks are due while Redis does not answer. (How many of the
/// 4 end up acked depends on whether the XACKs reached the frozen server's socket buffer,
/// which Redis reads when it wakes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_redis_hangs() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat > /dev/null\nsleep 2");
    let cfg = config_as(
        &redis.url(),
        CONSUMER,
        "5s",
        &fast_stream("jobs", "g", &script, "max_block_read = 4"),
    );
    let c = TestClient::connect(&redis.url()).await;
    let mut d = Daemon::start(&cfg);
    d.wait_group(&c, "jobs", "g").await;
    for i in 0..4 {
        c.xadd("jobs", &[("payload", format!("p{i}").as_bytes())])
            .await;
    }
    let cr = &c;
    d.wait_until(LONG, "4 entries delivered", || async move {
        cr.pending_count("jobs", "g").await == 4
    })
    .await;
    let redis_pid = Pid::from_raw(redis.pid().expect("redis pid") as i32);
    kill(redis_pid, Signal::SIGSTOP).expect("freeze redis");
    let frozen = Instant::now();
    d.sigterm();
    let status = d.terminate(Duration::from_secs(60));
    let took = frozen.elapsed();
    kill(redis_pid, Signal::SIGCONT).expect("wake redis");
    let status = status.expect("daemon exited while redis was frozen");
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
    // The budget is 20 s; generous slack for a busy machine, far below the 60 s freeze.
    assert!(
        took < Duration::from_secs(45),
        "took {took:?}\n{}",
        d.log_tail()
    );
    assert!(
        d.log().contains("final acks did not reach redis in time")
            || d.log().contains("shutdown budget spent"),
        "{}",
        d.log_tail()
    );
}

/// Item 9: an entry deleted from the stream while it waits for its retry is logged as a
/// warning with its id, and counted with the other deleted entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_deleted_while_waiting_for_its_retry_is_warned_and_counted() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "cat > /dev/null\ntouch \"$D/ran\"\nexit 1",
    );
    let port = free_port();
    let cfg = config(
        &redis.url(),
        &stream_table(
            "jobs",
            "g",
            &script,
            // No claim scan meanwhile: XAUTOCLAIM would find the deletion first.
            &format!(
                "{}\nretry_backoff = \"3s\"\nclaim_interval = \"1h\"",
                fast_except(&["retry_backoff", "claim_interval"])
            ),
        ),
    );
    let cfg = with_metrics_listen(&cfg, port);
    let c = TestClient::connect(&redis.url()).await;
    let d = Daemon::start(&cfg);
    d.wait_group(&c, "jobs", "g").await;
    let id = c.xadd("jobs", &[("payload", b"x")]).await;
    let ran = work.path().join("ran");
    d.wait_until(LONG, "the first attempt failed", || async {
        ran.exists() && d.log().contains("attempt failed")
    })
    .await;
    c.cmd("XDEL", vec!["jobs".into(), id.clone().into()])
        .await
        .expect("XDEL");
    let log_line = "entry was deleted from the stream while waiting for its retry";
    d.wait_until(LONG, "the deletion is warned", || async {
        d.log()
            .lines()
            .any(|l| l.contains(log_line) && l.contains("WARN") && l.contains(&id))
    })
    .await;
    d.wait_until(LONG, "the deletion is counted", || async move {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "redis_streamd_entries_deleted_total", "jobs") == Some(1.0)
        })
    })
    .await;
    assert_eq!(c.xlen("jobs:dlq").await, 0);
}

/// Item 10: with `max_attempts = 1`, the dead-letter event carries the failed run's
/// `elapsed_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_event_carries_the_run_time() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat > /dev/null\nsleep 0.2\nexit 3");
    let cfg = config(
        &redis.url(),
        &fast_stream("jobs", "g", &script, "max_attempts = 1"),
    );
    let c = TestClient::connect(&redis.url()).await;
    let d = Daemon::start_with(&cfg, &["--log-format", "json", "--log-level", "debug"], &[]);
    d.wait_group(&c, "jobs", "g").await;
    c.xadd("jobs", &[("payload", b"x")]).await;
    let cr = &c;
    d.wait_until(LONG, "dead-lettered", || async move {
        cr.xlen("jobs:dlq").await == 1
    })
    .await;
    let dlq_event = || {
        d.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["message"] == "entry moved to the dead-letter stream")
    };
    d.wait_until(LONG, "the dead-letter event is logged", || async {
        dlq_event().is_some()
    })
    .await;
    let event = dlq_event().expect("event");
    let elapsed = event["elapsed_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("{event}"));
    assert!(elapsed >= 200, "{event}");
}
