//! Failed attempts, retries counted from Redis's delivery counter, timeouts, and the
//! dead-letter stream's format.

mod common;

use std::fs;

use common::*;

/// Kills the listed pids and process groups (SIGKILL) when dropped, so a failing test
/// leaves nothing behind.
struct KillOnDrop {
    pids: Vec<i32>,
    groups: Vec<i32>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        for pgid in &self.groups {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
        for pid in &self.pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

fn dlq_fields_only(e: &Entry) -> Vec<(Vec<u8>, Vec<u8>)> {
    e.fields
        .iter()
        .filter(|(k, _)| !k.starts_with(b"dlq_"))
        .cloned()
        .collect()
}

/// handler_timeout kills the handler's whole process group: a background grandchild dies
/// too; with max_attempts = 1 the entry goes to the DLQ with reason "timeout after ...".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_process_group_including_grandchild() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "hang.sh",
        "cat > /dev/null\n\
         sleep 1000 &\n\
         echo $! > \"$D/grandchild.tmp\" && mv \"$D/grandchild.tmp\" \"$D/grandchild.pid\"\n\
         echo $$ > \"$D/handler.tmp\" && mv \"$D/handler.tmp\" \"$D/handler.pid\"\n\
         sleep 1000",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "slow",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nhandler_timeout = \"1s\"\nmax_attempts = 1\nretry_backoff = \"100ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("slow", &[("payload", b"hang")]).await;
    let d = Daemon::start(&cfg);
    let dir = work.path();
    d.wait_until(LONG, "handler wrote its pids", || async move {
        dir.join("grandchild.pid").exists() && dir.join("handler.pid").exists()
    })
    .await;
    let read_pid = |name: &str| -> i32 {
        read_lines(&work.path().join(name))[0]
            .trim()
            .parse()
            .expect("pid")
    };
    let grandchild = read_pid("grandchild.pid");
    let handler = read_pid("handler.pid");
    // The handler's own process group (never the test's): cleaned up whatever happens.
    let own_group = proc_stat(handler)
        .map(|st| st.pgid)
        .filter(|pgid| *pgid == handler && *pgid != nix::unistd::getpgrp().as_raw());
    let _guard = KillOnDrop {
        pids: vec![grandchild, handler],
        groups: own_group.into_iter().collect(),
    };

    let cr = &c;
    let idr = id.as_str();
    d.wait_until(LONG, "entry dead-lettered and acked", || async move {
        cr.xlen("slow:dlq").await == 1 && cr.all_acked_through("slow", "g", idr).await
    })
    .await;
    let dlq = c.xrange_all("slow:dlq").await;
    let reason = dlq[0].get_str("dlq_reason").unwrap_or_default();
    assert!(
        reason.starts_with("timeout after"),
        "dlq_reason {reason:?}\n{}",
        d.log_tail()
    );
    assert_eq!(dlq[0].get_str("dlq_attempts").as_deref(), Some("1"));
    assert_eq!(
        dlq[0].get_str("dlq_source_id").as_deref(),
        Some(id.as_str())
    );

    // Gone (or at most a zombie that is not the daemon's to reap).
    let daemon_pid = d.pid() as i32;
    for (what, pid) in [("grandchild", grandchild), ("handler", handler)] {
        d.wait_until(LONG, &format!("{what} {pid} gone"), || async move {
            match proc_stat(pid) {
                None => true,
                Some(st) => st.state == 'Z' && st.ppid != daemon_pid,
            }
        })
        .await;
    }
}

/// A handler that ignores SIGTERM is SIGKILLed after the grace period; the reason is still
/// the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "stubborn.sh",
        "trap '' TERM\n\
         cat > /dev/null\n\
         echo $$ > \"$D/handler.tmp\" && mv \"$D/handler.tmp\" \"$D/handler.pid\"\n\
         while [ -d \"$D\" ]; do sleep 0.1; done",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "stubborn",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nhandler_timeout = \"1s\"\nmax_attempts = 1",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("stubborn", &[("payload", b"x")]).await;
    let d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "entry dead-lettered after the kill", || async move {
        cr.xlen("stubborn:dlq").await == 1 && cr.all_acked_through("stubborn", "g", idr).await
    })
    .await;
    let dlq = c.xrange_all("stubborn:dlq").await;
    let reason = dlq[0].get_str("dlq_reason").unwrap_or_default();
    assert!(reason.starts_with("timeout after"), "dlq_reason {reason:?}");
    let handler: i32 = read_lines(&work.path().join("handler.pid"))[0]
        .parse()
        .unwrap();
    d.wait_until(LONG, "stubborn handler gone", || async move {
        proc_stat(handler).is_none_or(|st| st.state == 'Z')
    })
    .await;
}

/// A handler that always exits 3: attempts 1, 2, 3 (REDIS_STREAMD_ATTEMPT), then the DLQ
/// with dlq_attempts "3" and dlq_reason "exit code 3"; the source entry is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_up_to_max_attempts_then_dlq() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "fail.sh",
        "cat > /dev/null\n\
         echo \"$REDIS_STREAMD_ATTEMPT\" >> \"$D/attempts\"\n\
         echo \"attempt $REDIS_STREAMD_ATTEMPT failed\" >&2\n\
         exit 3",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "retry",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 3\nretry_backoff = \"100ms\"\nretry_backoff_max = \"200ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("retry", &[("payload", b"doomed")]).await;
    let d = Daemon::start(&cfg);
    let cr = &c;
    let idr = id.as_str();
    d.wait_until(LONG, "entry dead-lettered and acked", || async move {
        cr.xlen("retry:dlq").await == 1 && cr.all_acked_through("retry", "g", idr).await
    })
    .await;

    assert_eq!(
        read_lines(&work.path().join("attempts")),
        vec!["1", "2", "3"],
        "REDIS_STREAMD_ATTEMPT of each run\n{}",
        d.log_tail()
    );
    let dlq = c.xrange_all("retry:dlq").await;
    let e = &dlq[0];
    assert_eq!(e.get_str("dlq_attempts").as_deref(), Some("3"));
    assert_eq!(e.get_str("dlq_reason").as_deref(), Some("exit code 3"));
    assert_eq!(e.get("payload"), Some(&b"doomed"[..]));
    let stderr = e.get_str("dlq_stderr").unwrap_or_default();
    assert!(stderr.contains("attempt 3 failed"), "dlq_stderr {stderr:?}");
    assert_eq!(
        c.pending_count("retry", "g").await,
        0,
        "source entry still pending"
    );
}

/// A handler that fails once and then succeeds: acked, not dead-lettered, and the second
/// run saw REDIS_STREAMD_ATTEMPT=2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_once_then_succeeds() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "flaky.sh",
        "cat > /dev/null\n\
         echo \"$REDIS_STREAMD_ATTEMPT\" >> \"$D/attempts\"\n\
         if [ -e \"$D/failed-once\" ]; then exit 0; fi\n\
         touch \"$D/failed-once\"\n\
         echo transient >&2\n\
         exit 1",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "flaky",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 3\nretry_backoff = \"100ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("flaky", &[("payload", b"x")]).await;
    let d = Daemon::start(&cfg);
    let (cr, idr, dir) = (&c, id.as_str(), work.path());
    d.wait_until(LONG, "entry acked after one failure", || async move {
        read_lines(&dir.join("attempts")).len() >= 2
            && cr.all_acked_through("flaky", "g", idr).await
    })
    .await;
    assert_eq!(
        read_lines(&work.path().join("attempts")),
        vec!["1", "2"],
        "{}",
        d.log_tail()
    );
    assert_eq!(c.xlen("flaky:dlq").await, 0);
}

/// While an entry waits for its retry it does not hold a handler slot: with
/// max_block_read = 1, a second entry is handled while the first keeps failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_retry_does_not_hold_a_slot() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "picky.sh",
        "payload=$(cat)\n\
         if [ \"$payload\" = first ] && [ ! -e \"$D/allow-first\" ]; then exit 1; fi\n\
         touch \"$D/done-$payload\"",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "slots",
            "g",
            &script,
            "max_block_read = 1\nblock = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 100000\n\
             retry_backoff = \"100ms\"\nretry_backoff_max = \"300ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let first = c.xadd("slots", &[("payload", b"first")]).await;
    let d = Daemon::start(&cfg);
    let cr = &c;
    d.wait_until(
        LONG,
        "first entry delivered and failed once",
        || async move {
            cr.group_exists("slots", "g").await
                && cr
                    .pending_entries("slots", "g")
                    .await
                    .first()
                    .is_some_and(|p| p.deliveries >= 1)
                && cr.pending_count("slots", "g").await == 1
        },
    )
    .await;
    let second = c.xadd("slots", &[("payload", b"second")]).await;
    let dir = work.path();
    d.wait_until(
        LONG,
        "second entry handled while the first waits for retries",
        || async move { dir.join("done-second").exists() },
    )
    .await;
    let pel = c.pending_entries("slots", "g").await;
    assert!(
        pel.iter().any(|p| p.id == first),
        "first entry should still be pending: {pel:?}"
    );
    fs::write(work.path().join("allow-first"), b"").unwrap();
    let secondr = second.as_str();
    d.wait_until(LONG, "both entries acked", || async move {
        cr.all_acked_through("slots", "g", secondr).await
    })
    .await;
    assert!(work.path().join("done-first").exists());
    assert_eq!(c.xlen("slots:dlq").await, 0);
}

/// The attempt number comes from Redis's delivery counter, not from daemon memory: an entry
/// already delivered twice to this consumer (a previous daemon run) gets attempt 3, its last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_number_comes_from_the_delivery_counter() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "fail.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ATTEMPT\" >> \"$D/attempts\"\nexit 3",
    );
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("pre", "g", "0").await;
    let id = c.xadd("pre", &[("payload", b"seen before")]).await;
    // Two earlier deliveries to the daemon's own consumer name, never acked.
    assert_eq!(c.xreadgroup("pre", "g", CONSUMER, 10, ">").await.len(), 1);
    assert_eq!(c.xreadgroup("pre", "g", CONSUMER, 10, "0").await.len(), 1);
    assert_eq!(c.pending_entries("pre", "g").await[0].deliveries, 2);

    let cfg = config(
        &redis.url(),
        &stream_table(
            "pre",
            "g",
            &script,
            "block = \"200ms\"\nmax_attempts = 3\nretry_backoff = \"100ms\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "pending entry dead-lettered", || async move {
        cr.xlen("pre:dlq").await == 1 && cr.all_acked_through("pre", "g", idr).await
    })
    .await;
    assert_eq!(
        read_lines(&work.path().join("attempts")),
        vec!["3"],
        "only the third attempt should run\n{}",
        d.log_tail()
    );
    let dlq = c.xrange_all("pre:dlq").await;
    assert_eq!(dlq[0].get_str("dlq_attempts").as_deref(), Some("3"));
    assert_eq!(dlq[0].get_str("dlq_reason").as_deref(), Some("exit code 3"));
}

/// The DLQ entry: every original field unchanged (binary too) plus the dlq_* fields, in the
/// default "<name>:dlq" stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_entry_format() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "noisy.sh",
        "cat > /dev/null\n\
         i=0\n\
         while [ $i -lt 1000 ]; do echo \"noise line $i\" >&2; i=$((i+1)); done\n\
         echo FINAL-MARKER >&2\n\
         exit 1",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "fmt",
            "fmt-group",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 1\nretry_backoff = \"100ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let original: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"payload".to_vec(), b"the payload".to_vec()),
        (b"bin".to_vec(), all_byte_values(1)),
        (b"text".to_vec(), "ünïcödé".as_bytes().to_vec()),
        (b"empty".to_vec(), Vec::new()),
        (b"\xffbinary-name".to_vec(), b"v".to_vec()),
    ];
    let before_ms = now_ms();
    let id = c.xadd_raw("fmt", &original).await;
    let d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "entry dead-lettered", || async move {
        cr.xlen("fmt:dlq").await == 1 && cr.all_acked_through("fmt", "fmt-group", idr).await
    })
    .await;
    let after_ms = now_ms();
    let dlq = c.xrange_all("fmt:dlq").await;
    let e = &dlq[0];

    let mut got = dlq_fields_only(e);
    let mut want = original.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "original fields must be carried unchanged");

    assert_eq!(e.get_str("dlq_source_stream").as_deref(), Some("fmt"));
    assert_eq!(e.get_str("dlq_source_id").as_deref(), Some(id.as_str()));
    assert_eq!(e.get_str("dlq_group").as_deref(), Some("fmt-group"));
    assert_eq!(e.get_str("dlq_consumer").as_deref(), Some(CONSUMER));
    assert_eq!(e.get_str("dlq_attempts").as_deref(), Some("1"));
    assert_eq!(e.get_str("dlq_reason").as_deref(), Some("exit code 1"));

    let stderr = e.get("dlq_stderr").expect("dlq_stderr field");
    assert!(
        stderr.len() <= 4096,
        "dlq_stderr is {} bytes, more than 4 KiB",
        stderr.len()
    );
    let stderr = String::from_utf8_lossy(stderr);
    assert!(
        stderr.contains("FINAL-MARKER"),
        "dlq_stderr tail {stderr:?}"
    );
    assert!(
        stderr.contains("noise line 999"),
        "dlq_stderr tail {stderr:?}"
    );
    assert!(
        !stderr.contains("noise line 0\n"),
        "dlq_stderr should be the tail, not the head"
    );

    let failed_at: u64 = e
        .get_str("dlq_failed_at")
        .expect("dlq_failed_at")
        .parse()
        .expect("dlq_failed_at is an integer");
    assert!(
        failed_at + 5_000 >= before_ms && failed_at <= after_ms + 5_000,
        "dlq_failed_at {failed_at} not unix ms between {before_ms} and {after_ms}"
    );
    for k in [
        "dlq_source_stream",
        "dlq_source_id",
        "dlq_group",
        "dlq_consumer",
        "dlq_attempts",
        "dlq_reason",
        "dlq_stderr",
        "dlq_failed_at",
    ] {
        let n = e.fields.iter().filter(|(f, _)| f == k.as_bytes()).count();
        assert_eq!(n, 1, "{k} appears {n} times");
    }
}

/// dlq_exit_codes: exit 65 goes to the (custom-named) DLQ at once, run exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_exit_code_skips_retries() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "reject.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ATTEMPT\" >> \"$D/runs\"\nexit 65",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "codes",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 5\nretry_backoff = \"100ms\"\n\
             dlq = \"custom-dead\"\ndlq_exit_codes = [65]",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("codes", &[("payload", b"bad input")]).await;
    let d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "entry dead-lettered", || async move {
        cr.xlen("custom-dead").await == 1 && cr.all_acked_through("codes", "g", idr).await
    })
    .await;
    assert_eq!(
        read_lines(&work.path().join("runs")),
        vec!["1"],
        "handler must run exactly once\n{}",
        d.log_tail()
    );
    let dlq = c.xrange_all("custom-dead").await;
    assert_eq!(dlq[0].get_str("dlq_attempts").as_deref(), Some("1"));
    assert_eq!(
        dlq[0].get_str("dlq_reason").as_deref(),
        Some("exit code 65")
    );
    assert_eq!(dlq[0].get("payload"), Some(&b"bad input"[..]));
    assert_eq!(c.xlen("codes:dlq").await, 0, "default DLQ must not be used");
}

/// A missing payload field sends the entry to the DLQ at once; the handler never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_payload_field_goes_to_dlq_without_running_handler() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "never.sh",
        "cat > /dev/null\ntouch \"$D/ran-$REDIS_STREAMD_STREAM-$REDIS_STREAMD_ID\"",
    );
    let streams = format!(
        "{}\n{}",
        stream_table(
            "nofield",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 3\nretry_backoff = \"100ms\"",
        ),
        stream_table(
            "custom-field",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\npayload_field = \"body\"\nmax_attempts = 3\nretry_backoff = \"100ms\"",
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let missing = c.xadd("nofield", &[("other", b"no payload here")]).await;
    let ok = c.xadd("nofield", &[("payload", b"fine")]).await;
    let missing_body = c.xadd("custom-field", &[("payload", b"wrong field")]).await;
    let ok_body = c.xadd("custom-field", &[("body", b"right field")]).await;
    let d = Daemon::start(&config(&redis.url(), &streams));
    let (cr, okr, ok_bodyr) = (&c, ok.as_str(), ok_body.as_str());
    d.wait_until(LONG, "both streams processed", || async move {
        cr.xlen("nofield:dlq").await == 1
            && cr.xlen("custom-field:dlq").await == 1
            && cr.all_acked_through("nofield", "g", okr).await
            && cr.all_acked_through("custom-field", "g", ok_bodyr).await
    })
    .await;

    for (stream, id, field) in [
        ("nofield", &missing, "payload"),
        ("custom-field", &missing_body, "body"),
    ] {
        assert!(
            !work.path().join(format!("ran-{stream}-{id}")).exists(),
            "handler ran for the entry without {field:?}"
        );
        let dlq = c.xrange_all(&format!("{stream}:dlq")).await;
        assert_eq!(dlq.len(), 1);
        assert_eq!(
            dlq[0].get_str("dlq_source_id").as_deref(),
            Some(id.as_str())
        );
        assert_eq!(
            dlq[0].get_str("dlq_reason"),
            Some(format!("missing field \"{field}\"")),
            "{}",
            d.log_tail()
        );
        // Never retried: 0 (the handler never ran) or 1 (one delivery).
        let attempts = dlq[0].get_str("dlq_attempts").unwrap_or_default();
        assert!(
            attempts == "0" || attempts == "1",
            "dlq_attempts {attempts:?} for an entry that can never succeed"
        );
    }
    // Stream ids can be equal across streams: the marker files carry the stream name.
    assert!(work.path().join(format!("ran-nofield-{ok}")).exists());
    assert!(
        work.path()
            .join(format!("ran-custom-field-{ok_body}"))
            .exists()
    );
    assert_eq!(
        c.xrange_all("nofield:dlq").await[0].get("other"),
        Some(&b"no payload here"[..])
    );
}

/// Death by signal and a handler program that vanished after start are failed attempts with
/// the reasons "killed by signal 9" and "spawn failed: ...".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_and_spawn_failure_reasons() {
    let redis = RedisServer::start();
    let work = workdir();
    let suicide = write_script(work.path(), "suicide.sh", "cat > /dev/null\nkill -9 $$");
    let vanishing = write_script(work.path(), "vanishing.sh", "cat > /dev/null\nexit 0");
    let streams = format!(
        "{}\n{}",
        stream_table(
            "sig",
            "g",
            &suicide,
            "block = \"200ms\"\nmax_attempts = 1\nretry_backoff = \"100ms\"",
        ),
        stream_table(
            "gone",
            "g",
            &vanishing,
            "block = \"200ms\"\nmax_attempts = 2\nretry_backoff = \"100ms\"",
        ),
    );
    let d = Daemon::start(&config(&redis.url(), &streams));
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    d.wait_group(cr, "sig", "g").await;
    d.wait_group(cr, "gone", "g").await;
    fs::remove_file(&vanishing).unwrap();
    let sig_id = c.xadd("sig", &[("payload", b"x")]).await;
    let gone_id = c.xadd("gone", &[("payload", b"x")]).await;
    let (s, g) = (sig_id.as_str(), gone_id.as_str());
    d.wait_until(LONG, "both entries dead-lettered", || async move {
        cr.xlen("sig:dlq").await == 1
            && cr.xlen("gone:dlq").await == 1
            && cr.all_acked_through("sig", "g", s).await
            && cr.all_acked_through("gone", "g", g).await
    })
    .await;
    let sig = c.xrange_all("sig:dlq").await;
    assert_eq!(
        sig[0].get_str("dlq_reason").as_deref(),
        Some("killed by signal 9")
    );
    let gone = c.xrange_all("gone:dlq").await;
    let reason = gone[0].get_str("dlq_reason").unwrap_or_default();
    assert!(
        reason.starts_with("spawn failed: "),
        "dlq_reason {reason:?}"
    );
    assert_eq!(gone[0].get_str("dlq_attempts").as_deref(), Some("2"));
}
