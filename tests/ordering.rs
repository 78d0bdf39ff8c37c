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

/// A worker (Python) that records each request like [`RECORDING_HANDLER`]; the payload is
/// the JSON form of [`add_keyed`].
fn recording_worker(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("w.py");
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
            dir.display()
        ),
    )
    .expect("write worker");
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod worker");
    script
}

/// A redis-server with stream `chat` and its group `g` (from the start), a work dir for
/// the handlers, and a client.
async fn chat() -> (RedisServer, tempfile::TempDir, TestClient) {
    let redis = RedisServer::start();
    let work = workdir();
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    (redis, work, c)
}

/// Daemons with these consumer names, each running `table`.
fn start_daemons(redis: &RedisServer, names: &[&str], table: &str) -> Vec<Daemon> {
    names
        .iter()
        .map(|name| Daemon::start(&config_as(&redis.url(), name, "10s", table)))
        .collect()
}

/// Adds one entry of key `k` whose handler sleeps `sleep` seconds and fails when `fail`.
async fn add_one(c: &TestClient, k: &str, seq: u64, sleep: &str, fail: bool) -> String {
    let payload = format!("{k} {seq} {sleep}{}", if fail { " fail" } else { "" });
    c.xadd(
        "chat",
        &[("k", k.as_bytes()), ("payload", payload.as_bytes())],
    )
    .await
}

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
    add_entries(c, stream, keys, per_key, json, false).await
}

/// [`add_keyed`], but the key of each next entry is picked at random (fixed seed) among
/// the keys with entries left: entries of one key often come close together, so two
/// daemons often read entries of one key at the same time.
async fn add_keyed_randomly(
    c: &TestClient,
    stream: &str,
    keys: usize,
    per_key: usize,
    json: bool,
) -> String {
    add_entries(c, stream, keys, per_key, json, true).await
}

async fn add_entries(
    c: &TestClient,
    stream: &str,
    keys: usize,
    per_key: usize,
    json: bool,
    random_keys: bool,
) -> String {
    let mut last = String::new();
    let mut rnd: u64 = 0x2545_f491_4f6c_dd1d;
    let next = |rnd: &mut u64| {
        *rnd ^= *rnd << 13;
        *rnd ^= *rnd >> 7;
        *rnd ^= *rnd << 17;
        *rnd
    };
    let mut seqs = vec![0usize; keys];
    for i in 0..keys * per_key {
        let k = if random_keys {
            let mut k = (next(&mut rnd) % keys as u64) as usize;
            while seqs[k] == per_key {
                k = (k + 1) % keys;
            }
            k
        } else {
            i % keys
        };
        let seq = seqs[k];
        seqs[k] += 1;
        let sleep = format!("0.{:03}", next(&mut rnd) % 21);
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
    last
}

/// Three daemons in consumer scope share one group: every daemon runs each key's entries
/// it received in order, one at a time; every entry is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_scope_three_daemons_keep_order_within_each() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let last = add_keyed(&c, "chat", 50, 40, false).await;
    let table = fast_stream("chat", "g", &script, "max_block_read = 8\norder_by = \"k\"");
    let daemons = start_daemons(&redis, &["a", "b", "c"], &table);
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
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let add = |k: &'static str, seq: u64, fail: bool| add_one(&c, k, seq, "0", fail);
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
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
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
    let (redis, work, c) = chat().await;
    let script = recording_worker(work.path());
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

/// `KEYS pattern` (leases and inboxes: none may be left once every entry is done).
async fn keys_like(c: &TestClient, pattern: &str) -> Vec<String> {
    let reply = c.cmd("KEYS", vec![pattern.into()]).await.expect("KEYS");
    reply
        .into_array()
        .iter()
        .filter_map(|k| k.as_string())
        .collect()
}

/// Waits until nothing of group scope's bookkeeping is left in Redis (an inbox row for an
/// entry its holder got otherwise goes at the holder's next read); panics with what is
/// left and `d`'s log after [`MEDIUM`].
async fn assert_no_leases_left(d: &Daemon, c: &TestClient) {
    let end = std::time::Instant::now() + MEDIUM;
    loop {
        let left: Vec<String> =
            [keys_like(c, "*lease*").await, keys_like(c, "*inbox*").await].concat();
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > end {
            let mut dump = String::new();
            for k in &left {
                let cmd = if k.contains(":lease:") {
                    "HGETALL"
                } else {
                    "XLEN"
                };
                let v = c.cmd(cmd, vec![k.as_str().into()]).await;
                dump.push_str(&format!("{k}: {v:?}\n"));
            }
            panic!("lease or inbox keys left:\n{dump}{}", d.log_tail());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Two daemons in group scope share one group: each key's entries run in id order and
/// one at a time across both daemons, every entry once, at attempt 1 (hand-overs between
/// the daemons cost no attempt); nothing of the leases is left at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_two_daemons_keep_order_across_both() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let last = add_keyed_randomly(&c, "chat", 50, 40, false).await;
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 8\norder_by = \"k\"\norder_scope = \"group\"",
    );
    let daemons = start_daemons(&redis, &["a", "b"], &table);
    daemons[0].wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_eq!(runs.len(), 2000, "every entry ran once");
    assert!(
        runs.iter().all(|r| r.attempt == 1),
        "an entry ran at attempt > 1"
    );
    assert!(
        ["a", "b"]
            .iter()
            .all(|name| runs.iter().any(|r| r.consumer == *name)),
        "both daemons ran entries"
    );
    assert_ordered(&runs, false);
    assert_eq!(c.xlen("chat:dlq").await, 0);
    assert_no_leases_left(&daemons[0], &c).await;
}

/// An entry read by a daemon while another daemon holds its key is handed over to that
/// daemon and runs there after the entry in hand, at attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_hand_over_costs_no_attempt() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "h.sh",
        &format!("touch \"$D/started.$REDIS_STREAMD_CONSUMER\"\n{RECORDING_HANDLER}"),
    );
    let c = TestClient::connect(&redis.url()).await;
    c.create_group("chat", "g", "0").await;
    let add = |k: &'static str, seq: u64, sleep: &'static str| {
        let c = &c;
        async move {
            let payload = format!("{k} {seq} {sleep}");
            c.xadd(
                "chat",
                &[("k", k.as_bytes()), ("payload", payload.as_bytes())],
            )
            .await
        }
    };
    add("x", 0, "3").await;
    // `a` runs one entry at a time: while x 0 runs it reads nothing more.
    let table = |max: u32| {
        fast_stream(
            "chat",
            "g",
            &script,
            &format!("max_block_read = {max}\norder_by = \"k\"\norder_scope = \"group\""),
        )
    };
    let a = Daemon::start(&config_as(&redis.url(), "a", "10s", &table(1)));
    a.wait_until(LONG, "x 0 started on a", || async {
        work.path().join("started.a").exists()
    })
    .await;
    let mut last = String::new();
    for seq in 1..=5 {
        last = add("x", seq, "0").await;
    }
    let port = free_port();
    let b_config = config_as(&redis.url(), "b", "10s", &table(4)).replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let b = Daemon::start(&b_config);
    a.wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    let got: Vec<(u64, &str, u64)> = {
        let mut x: Vec<&Run> = runs.iter().collect();
        x.sort_by_key(|r| r.start);
        x.iter()
            .map(|r| (r.seq, r.consumer.as_str(), r.attempt))
            .collect()
    };
    let want: Vec<(u64, &str, u64)> = (0..=5).map(|seq| (seq, "a", 1)).collect();
    assert_eq!(got, want, "{runs:?}");
    assert_ordered(&runs, false);
    // b read x 1..5 (a had no free slot) and handed them over.
    b.wait_until(LONG, "b counted its hand-overs", || async move {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "redis_streamd_order_handovers_total", "chat") == Some(5.0)
        })
    })
    .await;
    assert_no_leases_left(&b, &c).await;
}

/// kill -9 of one of two daemons in group scope mid-run: the other takes its keys over
/// once its hold runs out (claim_idle) and runs their entries again from the first that
/// had started, before any later one (rule 3); nothing is lost, nothing stays pending,
/// nothing of the leases is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_kill9_takeover_keeps_order() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let (keys, per_key) = (20, 30);
    let mut last = String::new();
    for seq in 0..per_key {
        for k in 0..keys {
            let payload = format!("k{k} {seq} 0.05");
            last = c
                .xadd(
                    "chat",
                    &[
                        ("k", format!("k{k}").as_bytes()),
                        ("payload", payload.as_bytes()),
                    ],
                )
                .await;
        }
    }
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 8\norder_by = \"k\"\norder_scope = \"group\"",
    );
    let mut a = Daemon::start(&config_as(&redis.url(), "a", "10s", &table));
    let port = free_port();
    let b = Daemon::start(&config_as(&redis.url(), "b", "10s", &table).replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    ));
    let dir = work.path().to_path_buf();
    b.wait_until(LONG, "a ran some entries", || {
        let dir = dir.clone();
        async move { runs(&dir).iter().filter(|r| r.consumer == "a").count() >= 40 }
    })
    .await;
    let mut orphans = Orphans::default();
    orphans.kill9(&mut a);
    b.wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    for k in 0..keys {
        for seq in 0..per_key {
            let key = format!("k{k}");
            assert!(
                runs.iter().any(|r| r.key == key && r.seq == seq),
                "{key} {seq} never ran"
            );
        }
    }
    assert_ordered(&runs, false);
    // What a had started when it died ran again on b, after claim_idle.
    let rerun = runs.iter().any(|r| {
        r.consumer == "b"
            && r.attempt > 1
            && runs
                .iter()
                .any(|s| s.consumer == "a" && s.key == r.key && s.seq == r.seq)
    });
    assert!(rerun, "no entry a had started ran again on b");
    let scrape = http_get(port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    let takeovers = sample(&scrape, "redis_streamd_order_takeovers_total", "chat");
    assert!(takeovers >= Some(1.0), "b took no key over: {takeovers:?}");
    assert_eq!(c.pending_count("chat", "g").await, 0);
    assert_no_leases_left(&b, &c).await;
}

/// Worker mode in group scope: two daemons of Python workers, key by JSON Pointer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_worker_mode_keeps_order_across_daemons() {
    let (redis, work, c) = chat().await;
    let script = recording_worker(work.path());
    let last = add_keyed_randomly(&c, "chat", 20, 20, true).await;
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "mode = \"worker\"\nmax_block_read = 4\norder_by_json = \"/k\"\norder_scope = \"group\"",
    );
    let daemons = start_daemons(&redis, &["a", "b"], &table);
    daemons[0].wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_eq!(runs.len(), 400);
    assert!(runs.iter().all(|r| r.attempt == 1));
    assert_ordered(&runs, false);
    assert_no_leases_left(&daemons[0], &c).await;
}

/// Adds `x 0` .. `x n-1` (payload sleeps `sleep`); returns the ids.
async fn add_x(c: &TestClient, n: u64, sleep: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for seq in 0..n {
        let payload = format!("x {seq} {sleep}");
        ids.push(
            c.xadd("chat", &[("k", b"x"), ("payload", payload.as_bytes())])
                .await,
        );
    }
    ids
}

/// Starts daemon `name` (group scope, `max_block_read = 2`) and waits until it has read
/// all of `x`'s entries, the first running and the rest waiting behind it.
async fn holding_x(c: &TestClient, url: &str, name: &str, script: &Path, ids: &[String]) -> Daemon {
    let table = fast_stream(
        "chat",
        "g",
        script,
        "max_block_read = 2\norder_by = \"k\"\norder_scope = \"group\"",
    );
    let d = Daemon::start(&config_as(url, name, "10s", &table));
    let last = ids.last().cloned().unwrap_or_default();
    d.wait_until(LONG, "every entry of x delivered", || async {
        c.last_delivered_id("chat", "g").await.as_deref() == Some(last.as_str())
    })
    .await;
    d
}

/// A daemon stopped (SIGTERM) while entries wait behind their key leaves them pending
/// and ends its leases: another daemon meeting the key takes them over at once and runs
/// them in order, before the entry it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_stop_hands_waiting_entries_to_the_next_consumer() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let ids = add_x(&c, 10, "0.3").await;
    let mut a = holding_x(&c, &redis.url(), "a", &script, &ids).await;
    assert_eq!(a.terminate(MEDIUM).map(|s| s.code()), Some(Some(0)));
    let ran_on_a = runs(work.path()).len();
    assert!(ran_on_a < 10, "a ran everything before it stopped");
    let last = c.xadd("chat", &[("k", b"x"), ("payload", b"x 10 0")]).await;
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 2\norder_by = \"k\"\norder_scope = \"group\"",
    );
    let b = Daemon::start(&config_as(&redis.url(), "b", "10s", &table));
    b.wait_settled(&c, "chat", "g", &last).await;
    let runs = runs(work.path());
    assert_ordered(&runs, false);
    let mut seqs: Vec<u64> = runs.iter().map(|r| r.seq).collect();
    seqs.dedup();
    assert_eq!(seqs, (0..=10).collect::<Vec<u64>>(), "{runs:?}");
    assert!(runs[ran_on_a..].iter().all(|r| r.consumer == "b"));
    assert_no_leases_left(&b, &c).await;
}

/// A daemon restarted under the same name takes its waiting entries back from its own
/// pending list, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_restart_runs_own_pending_entries_in_order() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let ids = add_x(&c, 10, "0.2").await;
    let mut a = holding_x(&c, &redis.url(), "a", &script, &ids).await;
    assert_eq!(a.terminate(MEDIUM).map(|s| s.code()), Some(Some(0)));
    assert!(c.pending_count("chat", "g").await > 0);
    let a = holding_x(&c, &redis.url(), "a", &script, &ids).await;
    a.wait_settled(&c, "chat", "g", &ids[9]).await;
    let runs = runs(work.path());
    assert_ordered(&runs, false);
    let mut seqs: Vec<u64> = runs.iter().map(|r| r.seq).collect();
    seqs.dedup();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>(), "{runs:?}");
    assert_no_leases_left(&a, &c).await;
}

/// Group scope, two daemons: a failing entry holds its key through its retries and its
/// dead-lettering across both daemons; the other key keeps running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_scope_failing_entry_holds_its_key_across_daemons() {
    let (redis, work, c) = chat().await;
    let script = write_script(work.path(), "h.sh", RECORDING_HANDLER);
    let add = |k: &'static str, seq: u64, fail: bool| add_one(&c, k, seq, "0.01", fail);
    let bad = add("a", 0, true).await;
    let mut last = String::new();
    for seq in 1..=10 {
        add("a", seq, false).await;
        last = add("b", seq, false).await;
    }
    let table = fast_stream(
        "chat",
        "g",
        &script,
        "max_block_read = 2\norder_by = \"k\"\norder_scope = \"group\"\nmax_attempts = 3",
    );
    let daemons = start_daemons(&redis, &["a", "b"], &table);
    daemons[0].wait_settled(&c, "chat", "g", &last).await;
    let dlq = c.xrange_all("chat:dlq").await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].get_str("dlq_source_id"), Some(bad));
    let runs = runs(work.path());
    let a: Vec<(u64, u64)> = {
        let mut a: Vec<&Run> = runs.iter().filter(|r| r.key == "a").collect();
        a.sort_by_key(|r| r.start);
        a.iter().map(|r| (r.seq, r.attempt)).collect()
    };
    let mut want = vec![(0, 1), (0, 2), (0, 3)];
    want.extend((1..=10).map(|seq| (seq, 1)));
    assert_eq!(a, want, "{runs:?}");
    assert_ordered(&runs, false);
    assert_no_leases_left(&daemons[0], &c).await;
}
