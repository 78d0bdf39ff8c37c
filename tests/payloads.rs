//! What reaches the handler's stdin, and what the daemon does with the handler's output:
//! binary and big payloads, handlers that ignore stdin or flood stdout, `payload = "entry"`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use common::*;

/// Every byte value, a 16 MiB payload and an empty one arrive on stdin byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_16mib_payloads_reach_stdin_byte_exact() {
    let redis = RedisServer::start();
    let work = workdir();
    let (out, script) = saving_handler(work.path());
    let c = TestClient::connect(&redis.url()).await;

    let all_bytes = all_byte_values(4);
    let big = pseudo_random_bytes(16 * 1024 * 1024, 0x5eed);
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for payload in [
        all_bytes,
        big,
        Vec::new(),
        b"\0\r\n\0trailing nul\0".to_vec(),
    ] {
        let id = c
            .xadd(
                "bin",
                &[("meta", b"\xff\xfe not utf-8"), ("payload", &payload)],
            )
            .await;
        sent.push((id, payload));
    }
    let cfg = config(
        &redis.url(),
        &stream_table(
            "bin",
            "g",
            &script,
            "max_block_read = 2\nblock = \"200ms\"\nstart_id = \"0\"\nretry_backoff = \"100ms\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let (outr, last) = (out.as_path(), sent.last().unwrap().0.clone());
    let lastr = last.as_str();
    d.wait_until(LONG, "all payload entries handled and acked", || async move {
        count_files(outr, ".in") == 4 && cr.all_acked_through("bin", "g", lastr).await
    })
    .await;
    for (id, payload) in &sent {
        let got = read_or_empty(&out.join(format!("{id}.in")));
        assert_eq!(got.len(), payload.len(), "stdin length for {id}");
        assert!(got == *payload, "stdin bytes differ for {id}");
    }
    assert_eq!(c.xlen("bin:dlq").await, 0);
}

/// A handler that writes a lot to stdout and stderr before it reads its 16 MiB stdin: no
/// deadlock (the daemon writes stdin and drains the output at the same time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_writing_before_reading_does_not_deadlock() {
    let redis = RedisServer::start();
    let work = workdir();
    let out = work.path().join("out");
    fs::create_dir(&out).unwrap();
    let script = write_script(
        work.path(),
        "chatty.sh",
        &format!(
            "yes out | head -c 3000000\nyes err | head -c 3000000 >&2\n{SAVE_STDIN}\n\
             yes out | head -c 3000000\nyes err | head -c 3000000 >&2"
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let big = pseudo_random_bytes(16 * 1024 * 1024, 7);
    let id = c.xadd("chatty", &[("payload", &big)]).await;
    let cfg = config(
        &redis.url(),
        &stream_table(
            "chatty",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nhandler_timeout = \"120s\"\nmax_attempts = 1",
        ),
    );
    let d = Daemon::start_with(&cfg, &["--log-level", "warn"], &[]);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "chatty handler acked", || async move {
        cr.all_acked_through("chatty", "g", idr).await
    })
    .await;
    assert_eq!(c.xlen("chatty:dlq").await, 0, "{}", d.log_tail());
    let got = read_or_empty(&out.join(format!("{id}.in")));
    assert!(got == big, "stdin differs ({} bytes received)", got.len());
}

/// A handler that exits without reading its 16 MiB stdin is a success (broken pipe is not
/// an error): acked, run once, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_that_never_reads_stdin_is_acked() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "ignore.sh",
        "echo run >> \"$D/runs-$REDIS_STREAMD_STREAM-$REDIS_STREAMD_ID\"\n\
         sleep 0.3\n\
         exit 0",
    );
    let quick = write_script(
        work.path(),
        "ignore-quick.sh",
        "echo run >> \"$D/runs-$REDIS_STREAMD_STREAM-$REDIS_STREAMD_ID\"\nexit 0",
    );
    let c = TestClient::connect(&redis.url()).await;
    let big = pseudo_random_bytes(16 * 1024 * 1024, 42);
    let slow_id = c.xadd("ignore", &[("payload", &big)]).await;
    let quick_id = c.xadd("ignore-quick", &[("payload", &big)]).await;
    let streams = format!(
        "{}\n{}",
        stream_table(
            "ignore",
            "g",
            &script,
            "block = \"200ms\"\nstart_id = \"0\"\nretry_backoff = \"100ms\"",
        ),
        stream_table(
            "ignore-quick",
            "g",
            &quick,
            "block = \"200ms\"\nstart_id = \"0\"\nretry_backoff = \"100ms\"",
        )
    );
    let mut d = Daemon::start(&config(&redis.url(), &streams));
    let cr = &c;
    let (s, q) = (slow_id.as_str(), quick_id.as_str());
    d.wait_until(LONG, "both entries acked", || async move {
        cr.all_acked_through("ignore", "g", s).await
            && cr.all_acked_through("ignore-quick", "g", q).await
    })
    .await;
    assert_eq!(
        read_lines(&work.path().join(format!("runs-ignore-{slow_id}"))),
        vec!["run"],
        "handler must run exactly once\n{}",
        d.log_tail()
    );
    assert_eq!(
        read_lines(&work.path().join(format!("runs-ignore-quick-{quick_id}"))),
        vec!["run"],
        "handler must run exactly once\n{}",
        d.log_tail()
    );
    assert_eq!(c.xlen("ignore:dlq").await, 0);
    assert_eq!(c.xlen("ignore-quick:dlq").await, 0);
    d.assert_running();
}

/// A handler that writes ~120 MB to stdout (one 20 MB line without a newline, then 100 MB of
/// short lines) and 10 MB to stderr: acked, the daemon keeps working and its memory does not
/// grow with the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_flooding_stdout_is_acked_and_daemon_survives() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "flood.sh",
        "cat > /dev/null\n\
         rcs=''\n\
         if [ \"$(cat \"$D/mode\" 2>/dev/null)\" != quiet ]; then\n\
           head -c 20000000 /dev/zero | tr '\\0' 'x'; rcs=\"$rcs $?\"\n\
           echo; rcs=\"$rcs $?\"\n\
           yes xxxxxxxxxxxxxxxxxxxx | head -c 100000000; rcs=\"$rcs $?\"\n\
           yes eeeeeeeeeeeeeeeeeeee | head -c 10000000 >&2; rcs=\"$rcs $?\"\n\
           echo $rcs > \"$D/rcs-$REDIS_STREAMD_ID\"\n\
         fi\n\
         touch \"$D/done-$REDIS_STREAMD_ID\"",
    );
    let cfg = config(
        &redis.url(),
        &stream_table(
            "flood",
            "g",
            &script,
            "block = \"200ms\"\nhandler_timeout = \"120s\"\nretry_backoff = \"100ms\"",
        ),
    );
    let mut d = Daemon::start_with(&cfg, &["--log-level", "warn"], &[]);
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    d.wait_group(cr, "flood", "g").await;
    let id = c.xadd("flood", &[("payload", b"go")]).await;
    let (idr, dir) = (id.as_str(), work.path());
    d.wait_until(
        Duration::from_secs(120),
        "flooding handler finished and acked",
        || async move {
            dir.join(format!("done-{idr}")).exists()
                && cr.all_acked_through("flood", "g", idr).await
        },
    )
    .await;
    d.assert_running();
    // Every writer in the handler succeeded: the daemon kept reading to the end (a closed
    // pipe would have killed them with SIGPIPE, status 141).
    assert_eq!(
        read_lines(&work.path().join(format!("rcs-{id}"))),
        vec!["0 0 0 0"],
        "exit statuses of the handler's writers"
    );

    // Still alive and consuming.
    fs::write(work.path().join("mode"), "quiet").unwrap();
    let id2 = c.xadd("flood", &[("payload", b"after")]).await;
    let id2r = id2.as_str();
    d.wait_until(LONG, "entry after the flood acked", || async move {
        cr.all_acked_through("flood", "g", id2r).await
    })
    .await;
    d.assert_running();
    assert_eq!(c.xlen("flood:dlq").await, 0);

    let peak_kib = d.peak_rss_kib().expect("VmHWM of the daemon");
    eprintln!("daemon peak RSS after the flood: {peak_kib} KiB");
    assert!(
        peak_kib < 64 * 1024,
        "daemon peak RSS {peak_kib} KiB after a 130 MB output flood: output is being buffered\n{}",
        d.log_tail()
    );
    let log_len = fs::metadata(&d.log_path).map(|m| m.len()).unwrap_or(0);
    assert!(
        log_len < 8 * 1024 * 1024,
        "daemon log grew to {log_len} bytes at --log-level warn"
    );
}

/// `payload = "entry"`: stdin is `{"id", "stream", "fields"}` JSON; an entry with a
/// non-UTF-8 field value goes straight to the DLQ without running the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_mode_json_and_non_utf8_goes_to_dlq() {
    let redis = RedisServer::start();
    let work = workdir();
    let (out, script) = saving_handler(work.path());
    let c = TestClient::connect(&redis.url()).await;

    let good_fields: Vec<(&str, &[u8])> = vec![
        ("payload", "héllo wörld ✓".as_bytes()),
        ("count", b"42"),
        ("empty", b""),
        ("quote\"key", b"line1\nline2\t\"quoted\" \\ back"),
    ];
    let good = c.xadd("ev", &good_fields).await;
    let bad = c
        .xadd("ev", &[("ok", b"fine"), ("blob", b"\xff\xfe\x00\x80")])
        .await;
    let after = c.xadd("ev", &[("n", b"3")]).await;

    let cfg = config(
        &redis.url(),
        &stream_table(
            "ev",
            "g",
            &script,
            "payload = \"entry\"\nblock = \"200ms\"\nstart_id = \"0\"\nmax_attempts = 3\nretry_backoff = \"100ms\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let afterr = after.as_str();
    d.wait_until(LONG, "all three entries acked", || async move {
        cr.all_acked_through("ev", "g", afterr).await && cr.xlen("ev:dlq").await >= 1
    })
    .await;

    // The good entry.
    let raw = read_or_empty(&out.join(format!("{good}.in")));
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_else(|e| {
        panic!(
            "stdin is not JSON ({e}): {:?}\n{}",
            String::from_utf8_lossy(&raw),
            d.log_tail()
        )
    });
    assert_eq!(v["id"], serde_json::json!(good));
    assert_eq!(v["stream"], serde_json::json!("ev"));
    let fields = v["fields"].as_object().expect("fields is an object");
    let expected: BTreeMap<String, String> = good_fields
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8(v.to_vec()).unwrap()))
        .collect();
    let got: BTreeMap<String, String> = fields
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().expect("field value is a string").to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected);

    // The entry after the bad one was handled too.
    let raw3 = read_or_empty(&out.join(format!("{after}.in")));
    let v3: serde_json::Value = serde_json::from_slice(&raw3).expect("JSON for third entry");
    assert_eq!(v3["fields"]["n"], serde_json::json!("3"));

    // The bad entry: DLQ at once, handler never ran.
    assert!(
        !out.join(format!("{bad}.in")).exists(),
        "handler ran for the non-UTF-8 entry"
    );
    let dlq = c.xrange_all("ev:dlq").await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let e = &dlq[0];
    assert_eq!(e.get_str("dlq_source_id").as_deref(), Some(bad.as_str()));
    assert_eq!(e.get("blob"), Some(&b"\xff\xfe\x00\x80"[..]));
    assert_eq!(e.get("ok"), Some(&b"fine"[..]));
    let reason = e.get_str("dlq_reason").unwrap_or_default();
    let lower = reason.to_lowercase();
    assert!(
        lower.contains("utf-8") || lower.contains("utf8"),
        "dlq_reason {reason:?} does not mention UTF-8"
    );
    // Never retried: 0 (the handler never ran) or 1 (one delivery).
    let attempts = e.get_str("dlq_attempts").unwrap_or_default();
    assert!(
        attempts == "0" || attempts == "1",
        "dlq_attempts {attempts:?}: no retries for an undecodable entry"
    );
}
