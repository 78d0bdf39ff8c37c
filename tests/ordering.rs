//! Per-key ordering (issue 12) against real processes: entries with the same `order_by`
//! key run one at a time and in stream order; other keys keep running.
//!
//! Handlers append one line per run to `$D/runs`: `key seq consumer start_ns end_ns
//! attempt exit`, written after the run with one `>>` (short lines: atomic appends).

mod common;
mod faults_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::*;
use faults_support::*;

/// One handler run, as the handler recorded it.
#[derive(Debug, Clone)]
struct Run {
    key: String,
    seq: u64,
    consumer: String,
    start: u128,
    end: u128,
    attempt: u64,
}

fn runs(dir: &Path) -> Vec<Run> {
    fs::read_to_string(dir.join("runs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Run {
                key: f.first()?.to_string(),
                seq: f.get(1)?.parse().ok()?,
                consumer: f.get(2)?.to_string(),
                start: f.get(3)?.parse().ok()?,
                end: f.get(4)?.parse().ok()?,
                attempt: f.get(5)?.parse().ok()?,
            })
        })
        .collect()
}

/// A per-entry handler: payload `key seq sleep_seconds [fail]`; exits 1 when `fail`.
const RECORDING_HANDLER: &str = "read -r k seq d fail\n\
     s=$(date +%s%N)\n\
     sleep \"$d\"\n\
     e=$(date +%s%N)\n\
     echo \"$k $seq $REDIS_STREAMD_CONSUMER $s $e $REDIS_STREAMD_ATTEMPT\" >> \"$D/runs\"\n\
     [ -z \"$fail\" ]";

/// Checks, per key and (when `per_consumer`) per consumer, that runs start in sequence
/// order and never overlap. Retries of one entry (same seq) may follow each other.
fn assert_ordered(runs: &[Run], per_consumer: bool) {
    let mut by_key: BTreeMap<(String, String), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        let who = if per_consumer {
            r.consumer.clone()
        } else {
            String::new()
        };
        by_key.entry((r.key.clone(), who)).or_default().push(r);
    }
    for ((key, who), mut rs) in by_key {
        rs.sort_by_key(|r| r.start);
        for pair in rs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.seq >= a.seq,
                "key {key} {who}: seq {} started after seq {}: {a:?} {b:?}",
                b.seq,
                a.seq
            );
            assert!(
                b.start >= a.end,
                "key {key} {who}: runs overlap: {a:?} {b:?}"
            );
        }
    }
}

/// Adds `keys` x `per_key` entries, interleaved by key, with sleeps of 0-20 ms picked by a
/// fixed pseudo-random sequence; the payload is `key seq sleep`, or with `json` the same
/// as `{"k": key, "seq": seq, "d": sleep}`. Returns the last id.
async fn add_keyed(
    c: &TestClient,
    stream: &str,
    keys: usize,
    per_key: usize,
    json: bool,
) -> String {
    let mut last = String::new();
    let mut rnd: u64 = 0x2545_f491_4f6c_dd1d;
    for seq in 0..per_key {
        for k in 0..keys {
            rnd ^= rnd << 13;
            rnd ^= rnd >> 7;
            rnd ^= rnd << 17;
            let sleep = format!("0.{:03}", rnd % 21);
            let payload = if json {
                format!(r#"{{"k": "k{k}", "seq": {seq}, "d": {sleep}}}"#)
            } else {
                format!("k{k} {seq} {sleep}")
            };
            last = c
                .xadd(
                    stream,
                    &[
                        ("k", format!("k{k}").as_bytes()),
                        ("payload", payload.as_bytes()),
                    ],
                )
                .await;
        }
    }
    last
}

/// Three daemons in consumer scope share one group: every daemon runs each key's entries
/// it received in order, one at a time; every entry is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_scope_three_daemons_keep_order_within_each() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let last = add_keyed(&c, "chat", 50, 40, false).await;
    let table = fast_stream("chat", "g", &script, "max_block_read = 8\norder_by = \"k\"");
    let daemons: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|name| Daemon::start(&config_as(&redis.url(), name, "10s", &table)))
        .collect();
    daemons[0].wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_eq!(runs.len(), 2000, "every entry ran once");
    assert!(runs.iter().all(|r| r.attempt == 1));
    assert_ordered(&runs, true);
    assert_eq!(c.xlen("chat:dlq").await, 0);
}

/// A failing entry holds its key through its retries and its dead-lettering: the next
/// entry of its key starts only after the DLQ write; other keys keep running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_entry_holds_its_key_through_retries_and_dlq() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let add = |k: &'static str, seq: u64, fail: bool| {
        let c = &c;
        async move {
            let payload = format!("{k} {seq} 0{}", if fail { " fail" } else { "" });
            c.xadd(
                "chat",
                &[("k", k.as_bytes()), ("payload", payload.as_bytes())],
            )
            .await
        }
    };
    let bad = add("a", 0, true).await;
    add("a", 1, false).await;
    for seq in 0..20 {
        add("b", seq, false).await;
    }
    let last = add("a", 2, false).await;
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 4\norder_by = \"k\"\nmax_attempts = 3",
    );
    let d = Daemon::start(&config(&redis.url(), &table));
    d.wait_settled(&c, "chat", "g", &last).await;
    let dlq = c.xrange_all("chat:dlq").await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].get_str("dlq_source_id"), Some(bad));
    let runs = runs(work.path());
    let a: Vec<(u64, u64)> = {
        let mut a: Vec<&Run> = runs.iter().filter(|r| r.key == "a").collect();
        a.sort_by_key(|r| r.start);
        a.iter().map(|r| (r.seq, r.attempt)).collect()
    };
    assert_eq!(a, [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)], "{runs:?}");
    assert_ordered(&runs, false);
    // Key b did not wait for key a's retries: all of b ran before a's last retry.
    let a_retry_end = runs
        .iter()
        .filter(|r| r.key == "a" && r.seq == 0)
        .map(|r| r.start)
        .max()
        .unwrap_or(0);
    let b_done = runs
        .iter()
        .filter(|r| r.key == "b")
        .map(|r| r.end)
        .max()
        .unwrap_or(u128::MAX);
    assert!(b_done < a_retry_end, "b waited for a's retries");
}

/// One hot key with 500 entries and 50 keys with 10 each, `max_block_read = 8`: the other
/// keys are not held up by the hot one (entries waiting behind it hold no read slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_does_not_hold_up_other_keys() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let mut last = String::new();
    for i in 0..500 {
        let payload = format!("hot {i} 0");
        last = c
            .xadd("chat", &[("k", b"hot"), ("payload", payload.as_bytes())])
            .await;
        if i % 10 == 0 {
            let k = format!("k{}", i / 10);
            for seq in 0..10 {
                let payload = format!("{k} {seq} 0");
                c.xadd(
                    "chat",
                    &[("k", k.as_bytes()), ("payload", payload.as_bytes())],
                )
                .await;
            }
        }
    }
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 8\norder_by = \"k\"\norder_waiting_max = 1000",
    );
    let d = Daemon::start(&config(&redis.url(), &table));
    d.wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_eq!(runs.len(), 1000);
    assert_ordered(&runs, false);
    let others_done = runs.iter().filter(|r| r.key != "hot").map(|r| r.end).max();
    let mut hot: Vec<u128> = runs
        .iter()
        .filter(|r| r.key == "hot")
        .map(|r| r.end)
        .collect();
    hot.sort_unstable();
    // The others finish before the hot key is even half way through.
    assert!(
        others_done < Some(hot[250]),
        "other keys waited for the hot key"
    );
}

/// Entries without the key field run unordered (counted), next to ordered ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_without_a_key_run_unordered_and_are_counted() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        "cat > /dev/null\ns=$(date +%s%N)\nsleep 0.3\ne=$(date +%s%N)\necho \"$s $e\" >> \"$D/unkeyed\"",
    );
    let port = free_port();
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let mut last = String::new();
    for i in 0..4 {
        last = c
            .xadd("chat", &[("payload", format!("{i}").as_bytes())])
            .await;
    }
    let table = fast_stream("chat", "g", &script, "max_block_read = 4\norder_by = \"k\"");
    let cfg = with_metrics_listen(&config(&redis.url(), &table), port);
    let d = Daemon::start(&cfg);
    d.wait_settled(&c, "chat", "g", &last).await;
    let spans: Vec<(u128, u128)> = fs::read_to_string(work.path().join("unkeyed"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_once(' ')?;
            Some((s.parse().ok()?, e.parse().ok()?))
        })
        .collect();
    assert_eq!(spans.len(), 4);
    let overlapping = spans
        .iter()
        .any(|a| spans.iter().any(|b| a != b && b.0 < a.1 && a.0 < b.1));
    assert!(overlapping, "unkeyed entries ran concurrently: {spans:?}");
    d.wait_until(LONG, "unkeyed entries counted", || async move {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "redis_streamd_order_unkeyed_total", "chat") == Some(4.0)
        })
    })
    .await;
}

/// Worker mode keeps the same order, with the key found by a JSON Pointer in the payload:
/// a Python worker records each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_mode_keeps_per_key_order() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = work.path().join("w.py");
    fs::write(
        &script,
        format!(
            "#!/usr/bin/env python3\nimport sys, os, time, json\n\
             rq, rp = sys.stdin.buffer, sys.stdout.buffer\n\
             me = os.environ['REDIS_STREAMD_CONSUMER']\n\
             log = open('{}/runs', 'a')\n\
             while True:\n    h = rq.readline()\n    if not h: break\n    i, a, n = h.split()\n    \
             body = json.loads(rq.read(int(n))); rq.read(1)\n    k, seq, d = body['k'], body['seq'], body['d']\n    \
             s = time.time_ns(); time.sleep(float(d)); e = time.time_ns()\n    \
             log.write(f'{{k}} {{seq}} {{me}} {{s}} {{e}} {{a.decode()}}\\n'); log.flush()\n    \
             rp.write(b'ok\\n'); rp.flush()\n",
            work.path().display()
        ),
    )
    .expect("write worker");
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod worker");
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let last = add_keyed(&c, "chat", 20, 20, true).await;
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "mode = \"worker\"\nmax_block_read = 4\norder_by_json = \"/k\"",
    );
    let d = Daemon::start(&config(&redis.url(), &table));
    d.wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_eq!(runs.len(), 400);
    assert_ordered(&runs, false);
}
