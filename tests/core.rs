//! The consume loop end to end: handling and acking, backpressure, handler environment,
//! independent streams, shutdown.

mod common;

use std::collections::HashMap;
use std::fs;

use common::*;

/// 20 entries are handled (each handler saves its stdin) and acked; nothing goes to the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_handles_and_acks_every_entry() {
    let redis = RedisServer::start();
    let work = workdir();
    let (out, script) = saving_handler(work.path());
    let cfg = config(
        &redis.url(),
        &stream_table(
            "jobs",
            "workers",
            &script,
            "max_block_read = 4\nblock = \"200ms\"\nretry_backoff = \"100ms\"",
        ),
    );
    let mut d = Daemon::start(&cfg);
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    // start_id defaults to "$": only entries added after the group exists count.
    d.wait_group(cr, "jobs", "workers").await;

    let mut sent = Vec::new();
    for i in 0..20 {
        let payload = format!("message number {i}");
        let id = c.xadd("jobs", &[("payload", payload.as_bytes())]).await;
        sent.push((id, payload));
    }
    let last = sent.last().unwrap().0.clone();
    let (outr, lastr) = (out.as_path(), last.as_str());
    d.wait_until(LONG, "20 entries handled and acked", || async move {
        count_files(outr, ".in") == 20 && cr.all_acked_through("jobs", "workers", lastr).await
    })
    .await;

    for (id, payload) in &sent {
        let got = read_or_empty(&out.join(format!("{id}.in")));
        assert_eq!(got, payload.as_bytes(), "stdin of handler for {id}");
    }
    assert_eq!(c.pending_count("jobs", "workers").await, 0);
    assert_eq!(c.xlen("jobs:dlq").await, 0, "nothing dead-lettered");
    d.assert_running();
    // Every handler process was reaped (a zombie may exist for a moment, never for long).
    let pid = d.pid();
    d.wait_until(LONG, "no zombie children of the daemon", || async move {
        zombie_children(pid).is_empty()
    })
    .await;
}

/// max_block_read = 3: at no moment do more than 3 handlers run, and they do run in
/// parallel (the loop reads several entries at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_never_exceeds_max_block_read() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "slow.sh",
        "echo \"start $REDIS_STREAMD_ID $(date +%s%N)\" >> \"$D/events\"\n\
         cat > /dev/null\n\
         sleep 0.2\n\
         echo \"end $REDIS_STREAMD_ID $(date +%s%N)\" >> \"$D/events\"",
    );
    let c = TestClient::connect(&redis.url()).await;
    // Everything is there before the daemon starts, so it could read all 30 at once if it
    // ignored the limit.
    let mut last = String::new();
    for i in 0..30 {
        last = c
            .xadd("bp", &[("payload", format!("{i}").as_bytes())])
            .await;
    }
    let cfg = config(
        &redis.url(),
        &stream_table(
            "bp",
            "g",
            &script,
            "max_block_read = 3\nblock = \"200ms\"\nstart_id = \"0\"\nretry_backoff = \"100ms\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let (lastr, events) = (last.as_str(), work.path().join("events"));
    let eventsr = events.as_path();
    d.wait_until(LONG, "30 entries handled and acked", || async move {
        read_lines(eventsr)
            .iter()
            .filter(|l| l.starts_with("end "))
            .count()
            >= 30
            && cr.all_acked_through("bp", "g", lastr).await
    })
    .await;

    // Build intervals per entry id.
    let mut starts: HashMap<String, u128> = HashMap::new();
    let mut ends: HashMap<String, u128> = HashMap::new();
    for line in read_lines(&events) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "bad event line {line:?}");
        let t: u128 = parts[2].parse().expect("timestamp");
        let map = if parts[0] == "start" {
            &mut starts
        } else {
            &mut ends
        };
        assert!(
            map.insert(parts[1].to_string(), t).is_none(),
            "entry {} handled twice",
            parts[1]
        );
    }
    assert_eq!(starts.len(), 30);
    assert_eq!(ends.len(), 30);
    // Sweep: at equal timestamps count ends first (conservative).
    let mut points: Vec<(u128, i32)> = Vec::new();
    for (id, s) in &starts {
        let e = ends[id];
        assert!(e >= *s);
        points.push((*s, 1));
        points.push((e, -1));
    }
    points.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, delta) in points {
        cur += delta;
        max = max.max(cur);
    }
    eprintln!("max overlap of handler runs: {max}");
    assert!(
        max <= 3,
        "{max} handlers overlapped, max_block_read is 3\n{}",
        d.log_tail()
    );
    assert!(
        max > 1,
        "handlers never ran in parallel (max overlap {max})\n{}",
        d.log_tail()
    );
    assert_eq!(c.xlen("bp:dlq").await, 0);
}

/// REDIS_STREAMD_* and the config's `env` reach the handler; message fields never become
/// environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_environment() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "env.sh",
        "/usr/bin/env -0 > \"$D/$REDIS_STREAMD_ID.env.tmp\"\nmv \"$D/$REDIS_STREAMD_ID.env.tmp\" \"$D/$REDIS_STREAMD_ID.env\"",
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c
        .xadd(
            "envs",
            &[
                ("payload", b"hi"),
                ("PATH", b"/evil/bin"),
                ("LD_PRELOAD", b"/nonexistent/evil.so"),
                ("EVIL_FIELD", b"gotcha"),
                ("REDIS_STREAMD_ATTEMPT", b"99"),
            ],
        )
        .await;
    let cfg = config(
        &redis.url(),
        &stream_table(
            "envs",
            "env-group",
            &script,
            "start_id = \"0\"\nblock = \"200ms\"\nretry_backoff = \"100ms\"\n\
             env = { MY_SETTING = \"hello world\", OTHER_SETTING = \"x=y\" }",
        ),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let (idr, dir) = (id.as_str(), work.path());
    d.wait_until(LONG, "entry handled and acked", || async move {
        dir.join(format!("{idr}.env")).exists()
            && cr.all_acked_through("envs", "env-group", idr).await
    })
    .await;

    let raw = read_or_empty(&work.path().join(format!("{id}.env")));
    let env: HashMap<String, String> = raw
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(get("REDIS_STREAMD_STREAM"), Some("envs"), "{env:?}");
    assert_eq!(get("REDIS_STREAMD_GROUP"), Some("env-group"));
    assert_eq!(get("REDIS_STREAMD_CONSUMER"), Some(CONSUMER));
    assert_eq!(get("REDIS_STREAMD_ID"), Some(id.as_str()));
    assert_eq!(get("REDIS_STREAMD_ATTEMPT"), Some("1"));
    assert_eq!(get("MY_SETTING"), Some("hello world"));
    assert_eq!(get("OTHER_SETTING"), Some("x=y"));
    // The daemon's own environment is inherited (NO_COLOR is set by the harness).
    assert_eq!(get("NO_COLOR"), Some("1"));
    assert_ne!(
        get("PATH"),
        Some("/evil/bin"),
        "a message field became PATH"
    );
    assert_ne!(
        get("LD_PRELOAD"),
        Some("/nonexistent/evil.so"),
        "a message field became LD_PRELOAD"
    );
    assert_eq!(get("EVIL_FIELD"), None, "a message field became an env var");
    assert_eq!(get("payload"), None, "a message field became an env var");
    assert_eq!(c.xlen("envs:dlq").await, 0);
}

/// Two streams in one config: one stream's handler blocks while the other stream's entries
/// are handled and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_run_independently() {
    let redis = RedisServer::start();
    let work = workdir();
    let blocker = write_script(
        work.path(),
        "blocker.sh",
        &format!(
            "touch \"$D/a-started\"\n{}\ntouch \"$D/a-done\"",
            sh_wait_for_file("release")
        ),
    );
    let quick = write_script(
        work.path(),
        "quick.sh",
        "cat > /dev/null\ntouch \"$D/b-$REDIS_STREAMD_ID\"",
    );
    let streams = format!(
        "{}\n{}",
        stream_table(
            "stream-a",
            "ga",
            &blocker,
            "max_block_read = 1\nblock = \"200ms\"\nhandler_timeout = \"300s\"",
        ),
        stream_table(
            "stream-b",
            "gb",
            &quick,
            "max_block_read = 2\nblock = \"200ms\"",
        ),
    );
    let d = Daemon::start(&config(&redis.url(), &streams));
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    d.wait_group(cr, "stream-a", "ga").await;
    d.wait_group(cr, "stream-b", "gb").await;

    let a_id = c.xadd("stream-a", &[("payload", b"block")]).await;
    // A second entry on A waits behind the blocked one (max_block_read = 1).
    let a_id2 = c.xadd("stream-a", &[("payload", b"block too")]).await;
    let dir = work.path();
    d.wait_until(LONG, "stream-a handler started", || async move {
        dir.join("a-started").exists()
    })
    .await;

    let mut b_last = String::new();
    for i in 0..5 {
        b_last = c
            .xadd("stream-b", &[("payload", format!("b{i}").as_bytes())])
            .await;
    }
    let b_lastr = b_last.as_str();
    d.wait_until(
        LONG,
        "stream-b entries acked while stream-a blocks",
        || async move { cr.all_acked_through("stream-b", "gb", b_lastr).await },
    )
    .await;
    assert!(
        !work.path().join("a-done").exists(),
        "the blocking handler finished early"
    );
    let pel_a = c.pending_entries("stream-a", "ga").await;
    assert_eq!(
        pel_a.len(),
        1,
        "only the running entry of A is delivered: {pel_a:?}"
    );
    assert_eq!(pel_a[0].id, a_id);

    fs::write(work.path().join("release"), b"").unwrap();
    let a_id2r = a_id2.as_str();
    d.wait_until(LONG, "stream-a acked after release", || async move {
        cr.all_acked_through("stream-a", "ga", a_id2r).await
    })
    .await;
    assert_eq!(c.xlen("stream-a:dlq").await, 0);
    assert_eq!(c.xlen("stream-b:dlq").await, 0);
}

/// SIGTERM on an idle daemon: exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_idle_daemon_exits_zero() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "noop.sh", "cat > /dev/null");
    let cfg = config(
        &redis.url(),
        &stream_table("idle", "g", &script, "block = \"5s\""),
    );
    let mut d = Daemon::start(&cfg);
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    d.wait_group(cr, "idle", "g").await;
    // One handled entry proves the loop is up and reading (blocked in XREADGROUP now).
    let id = c.xadd("idle", &[("payload", b"x")]).await;
    let idr = id.as_str();
    d.wait_until(LONG, "entry acked", || async move {
        cr.all_acked_through("idle", "g", idr).await
    })
    .await;

    d.sigterm();
    let status = d.wait_exit(MEDIUM);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        d.log_tail()
    );
}

/// SIGTERM while a handler runs: the daemon waits (shutdown_timeout is 10s in test configs
/// but the handler is released right away), acks the entry, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_running_handler_and_acks_it() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "gated.sh",
        &format!(
            "trap '' TERM\ncat > /dev/null\ntouch \"$D/started\"\n{}\ntouch \"$D/finished\"",
            sh_wait_for_file("release")
        ),
    );
    let cfg = format!(
        "[redis]\nurl = {}\n\n[daemon]\nconsumer = \"tester\"\nshutdown_timeout = \"120s\"\n\n{}",
        toml_str(&redis.url()),
        stream_table(
            "graceful",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nhandler_timeout = \"300s\""
        )
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("graceful", &[("payload", b"x")]).await;
    let mut d = Daemon::start(&cfg);
    let dir = work.path();
    d.wait_until(LONG, "handler started", || async move {
        dir.join("started").exists()
    })
    .await;

    d.sigterm();
    // Still pending: the handler has not finished.
    assert_eq!(c.pending_count("graceful", "g").await, 1);
    fs::write(work.path().join("release"), b"").unwrap();
    let status = d.wait_exit(LONG);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        d.log_tail()
    );
    assert!(work.path().join("finished").exists());
    assert!(
        c.all_acked_through("graceful", "g", &id).await,
        "entry whose handler finished during shutdown was not acked\n{}",
        d.log_tail()
    );
}

/// SIGTERM while a handler outlives shutdown_timeout: the handler's group is killed, the
/// daemon exits, and the entry stays pending (neither acked nor dead-lettered). The next
/// daemon run picks it up again from its own pending list as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_leaves_entry_pending_for_the_next_run() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "stuck.sh",
        &format!(
            "cat > /dev/null\n\
             echo \"$REDIS_STREAMD_ATTEMPT $$\" >> \"$D/runs\"\n\
             {}\n\
             touch \"$D/finished\"",
            sh_wait_for_file("release")
        ),
    );
    let cfg = format!(
        "[redis]\nurl = {}\n\n[daemon]\nconsumer = \"tester\"\nshutdown_timeout = \"1s\"\n\n{}",
        toml_str(&redis.url()),
        stream_table(
            "stuck",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nhandler_timeout = \"300s\"\nmax_attempts = 3\nretry_backoff = \"100ms\""
        )
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("stuck", &[("payload", b"x")]).await;
    let mut d = Daemon::start(&cfg);
    let runs = work.path().join("runs");
    let runsr = runs.as_path();
    d.wait_until(LONG, "handler started", || async move {
        !read_lines(runsr).is_empty()
    })
    .await;
    let handler_pid: i32 = read_lines(&runs)[0]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();

    d.sigterm();
    let status = d.wait_exit(LONG);
    eprintln!("exit status after shutdown_timeout: {status}");
    d.wait_until(LONG, "handler killed at shutdown", || async move {
        proc_stat(handler_pid).is_none_or(|st| st.state == 'Z')
    })
    .await;
    let pel = c.pending_entries("stuck", "g").await;
    assert_eq!(
        pel.len(),
        1,
        "entry must stay pending: {pel:?}\n{}",
        d.log_tail()
    );
    assert_eq!(pel[0].id, id);
    assert_eq!(
        c.xlen("stuck:dlq").await,
        0,
        "entry must not be dead-lettered"
    );
    assert!(!work.path().join("finished").exists());

    // Next run: the entry is run again (attempt 2) and, released, acked.
    fs::write(work.path().join("release"), b"").unwrap();
    let d2 = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d2.wait_until(LONG, "pending entry re-run and acked", || async move {
        cr.all_acked_through("stuck", "g", idr).await
    })
    .await;
    let runs_now = read_lines(&runs);
    assert_eq!(runs_now.len(), 2, "{runs_now:?}");
    assert!(
        runs_now[1].starts_with("2 "),
        "second run attempt: {runs_now:?}"
    );
    assert_eq!(c.xlen("stuck:dlq").await, 0);
}
