//! The daemon's life beyond one run: config reload on SIGHUP, the second-signal fast
//! stop, and reaping consumers that are gone.

mod common;

use std::fs;

use common::*;
use fred::types::Value;
use nix::sys::signal::Signal;

fn fast(name: &str, script: &std::path::Path) -> String {
    stream_table(name, "g", script, "block = \"200ms\"\nstart_id = \"0\"")
}

/// SIGHUP: a new stream starts, a removed one stops consuming, an invalid file is
/// rejected while the running config goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_streams_and_rejects_an_invalid_file() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "cat >/dev/null; echo \"$REDIS_STREAMD_STREAM $REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let d = Daemon::start(&config(&redis.url(), &fast("a", &script)));
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    let a1 = c.xadd("a", &[("payload", b"1")]).await;
    let a1r = a1.as_str();
    d.wait_until(LONG, "a's first entry acked", || async move {
        cr.all_acked_through("a", "g", a1r).await
    })
    .await;

    // Add stream b.
    let both = config(
        &redis.url(),
        &format!("{}{}", fast("a", &script), fast("b", &script)),
    );
    fs::write(&d.config_path, &both).unwrap();
    d.signal(Signal::SIGHUP);
    let b1 = c.xadd("b", &[("payload", b"1")]).await;
    let b1r = b1.as_str();
    d.wait_until(LONG, "b's entry handled after the reload", || async move {
        cr.group_exists("b", "g").await && cr.all_acked_through("b", "g", b1r).await
    })
    .await;

    // An invalid file changes nothing.
    fs::write(&d.config_path, format!("{both}\nbogus_key = 1\n")).unwrap();
    d.signal(Signal::SIGHUP);
    let dr = &d;
    d.wait_until(LONG, "the rejection is logged", || async move {
        dr.log().contains("reload rejected")
    })
    .await;
    let a2 = c.xadd("a", &[("payload", b"2")]).await;
    let a2r = a2.as_str();
    d.wait_until(
        LONG,
        "a still consumed after the rejected reload",
        || async move { cr.all_acked_through("a", "g", a2r).await },
    )
    .await;

    // Remove stream a: its loop stops, b goes on.
    fs::write(&d.config_path, config(&redis.url(), &fast("b", &script))).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_until(LONG, "a's loop stopped", || async move {
        let log = dr.log();
        log.contains("stream removed; stopping its loop")
            && log.contains("consume loop stopped stream=a")
    })
    .await;
    let a3 = c.xadd("a", &[("payload", b"3")]).await;
    let b2 = c.xadd("b", &[("payload", b"2")]).await;
    let b2r = b2.as_str();
    d.wait_until(LONG, "b handles new entries", || async move {
        cr.all_acked_through("b", "g", b2r).await
    })
    .await;
    let done = read_lines(&work.path().join("done"));
    assert!(
        !done.contains(&format!("a {a3}")),
        "a removed stream was still consumed: {done:?}"
    );
    assert_eq!(
        c.last_delivered_id("a", "g").await.as_deref(),
        Some(a2.as_str())
    );
}

/// A second SIGTERM skips the wait for running handlers: the daemon does not sit out
/// its (long) shutdown_timeout, and the unfinished entry stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_skips_the_wait() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "slow.sh",
        "cat >/dev/null; touch \"$D/started\"; sleep 300",
    );
    let cfg = config(&redis.url(), &fast("jobs", &script))
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"600s\"");
    let mut d = Daemon::start(&cfg);
    let c = TestClient::connect(&redis.url()).await;
    c.xadd("jobs", &[("payload", b"x")]).await;
    let started = work.path().join("started");
    let sr = started.as_path();
    d.wait_until(LONG, "the handler runs", || async move { sr.exists() })
        .await;
    d.sigterm();
    let dr = &d;
    d.wait_until(LONG, "the first signal is logged", || async move {
        dr.log().contains("shutting down")
    })
    .await;
    d.sigterm();
    // With the wait skipped, exit takes the 5 s kill grace at most, far below 600 s.
    let status = d.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
    assert_eq!(
        c.pending_count("jobs", "g").await,
        1,
        "the entry stays pending"
    );
    assert_eq!(c.xlen("jobs:dlq").await, 0);
}

/// Consumers idle longer than reap_idle with nothing pending are removed by the others;
/// one that still holds pending entries is kept (deleting it would drop them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_without_pending_entries_are_reaped() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat >/dev/null");
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("jobs", "g", "0").await;
    c.cmd(
        "XGROUP",
        vec![
            "CREATECONSUMER".into(),
            "jobs".into(),
            "g".into(),
            "ghost".into(),
        ],
    )
    .await
    .expect("create ghost consumer");
    // "holder" takes an entry and never acks it.
    c.xadd("jobs", &[("payload", b"held")]).await;
    c.xreadgroup("jobs", "g", "holder", 1, ">").await;
    let cfg = config(
        &redis.url(),
        &stream_table(
            "jobs",
            "g",
            &script,
            "block = \"200ms\"\nclaim_interval = \"300ms\"\nclaim_idle = \"600s\"\nreap_idle = \"1s\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let consumers = || async move {
        let reply = cr
            .cmd("XINFO", vec!["CONSUMERS".into(), "jobs".into(), "g".into()])
            .await
            .expect("XINFO CONSUMERS");
        let Value::Array(rows) = reply else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|row| match row {
                Value::Array(kv) => kv
                    .get(1)
                    .map(|v| String::from_utf8_lossy(&value_bytes(v)).into_owned()),
                _ => None,
            })
            .collect::<Vec<String>>()
    };
    d.wait_until(LONG, "ghost is reaped", || async move {
        !consumers().await.contains(&"ghost".to_string())
    })
    .await;
    assert!(
        consumers().await.contains(&"holder".to_string()),
        "a consumer with pending entries must stay"
    );
    assert_eq!(c.pending_count("jobs", "g").await, 1);
}

/// A stream name that is a key of another type is a configuration error: the daemon says
/// so and exits 78 instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_key_of_another_type_exits_78() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", "cat >/dev/null");
    let c = TestClient::connect(&redis.url()).await;
    c.cmd("SET", vec!["jobs".into(), "not a stream".into()])
        .await
        .expect("SET");
    let mut d = Daemon::start(&config(&redis.url(), &fast("jobs", &script)));
    let status = d.wait_exit(LONG);
    assert_eq!(status.code(), Some(78), "{}", d.log_tail());
    assert!(d.log().contains("WRONGTYPE"), "{}", d.log_tail());
}
