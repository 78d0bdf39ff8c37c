//! `mode = "worker"`: long-lived handler processes speaking the line-and-length protocol,
//! including workers that misbehave (garbage replies, partial frames, deaths mid-entry,
//! crash loops, hangs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// The shipped example workers.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/workers")
        .join(name)
}

fn worker_table(name: &str, handler: &Path, extra: &str) -> String {
    stream_table(
        name,
        "workers",
        handler,
        &format!(
            "mode = \"worker\"\nblock = \"200ms\"\nretry_backoff = \"100ms\"\nstart_id = \"0\"\n{extra}"
        ),
    )
}

/// Reads one request in sh: sets $id $attempt and $payload (text payloads only).
const SH_READ: &str = "IFS=' ' read -r id attempt len || exit 0\n\
    payload=$(dd bs=1 count=\"$len\" 2>/dev/null)\n\
    dd bs=1 count=1 >/dev/null 2>&1\n";

async fn dlq_entry(c: &TestClient, stream: &str, d: &Daemon) -> Entry {
    let dlq = format!("{stream}:dlq");
    let dr = dlq.as_str();
    d.wait_until(LONG, "an entry in the DLQ", || async move {
        c.xlen(dr).await >= 1
    })
    .await;
    c.xrange_all(&dlq).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_worker_handles_many_entries_with_few_processes() {
    let redis = RedisServer::start();
    let c = TestClient::connect(&redis.url()).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        let payload = format!("job {i}");
        ids.push(c.xadd("jobs", &[("payload", payload.as_bytes())]).await);
    }
    // Not valid JSON: the example rejects it (dlq), without retries.
    let bad = c.xadd("jobs", &[("payload", b"{not json")]).await;
    let cfg = config(
        &redis.url(),
        &worker_table("jobs", &example("example_worker.py"), "max_block_read = 3"),
    );
    let d = Daemon::start(&cfg);
    let last = ids.last().cloned().unwrap_or_default();
    let lr = last.as_str();
    let cr = &c;
    d.wait_until(
        LONG,
        "60 entries acked and one dead-lettered",
        || async move {
            cr.all_acked_through("jobs", "workers", lr).await && cr.xlen("jobs:dlq").await == 1
        },
    )
    .await;
    let dead = dlq_entry(&c, "jobs", &d).await;
    assert_eq!(dead.get_str("dlq_source_id").as_deref(), Some(bad.as_str()));
    assert_eq!(dead.get_str("dlq_attempts").as_deref(), Some("1"));
    let reason = dead.get_str("dlq_reason").unwrap_or_default();
    assert!(reason.starts_with("invalid JSON"), "{reason}");
    let started = d.log().matches("worker started").count();
    assert!(
        started <= 3,
        "{started} worker processes for 61 entries:\n{}",
        d.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_example_worker_fails_are_retried_then_dead_lettered() {
    let redis = RedisServer::start();
    let c = TestClient::connect(&redis.url()).await;
    let ok = c.xadd("jobs", &[("payload", b"hello")]).await;
    let failing = c.xadd("jobs", &[("payload", b"fail please")]).await;
    let cfg = config(
        &redis.url(),
        &worker_table("jobs", &example("example_worker.sh"), "max_attempts = 3"),
    );
    let d = Daemon::start(&cfg);
    let dead = dlq_entry(&c, "jobs", &d).await;
    assert_eq!(
        dead.get_str("dlq_source_id").as_deref(),
        Some(failing.as_str())
    );
    assert_eq!(dead.get_str("dlq_attempts").as_deref(), Some("3"));
    assert_eq!(
        dead.get_str("dlq_reason").as_deref(),
        Some("payload asked to fail")
    );
    d.wait_settled(&c, "jobs", "workers", &ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_reach_the_worker_byte_exact() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "save.py",
        "", // replaced below: a python worker needs its own shebang
    );
    fs::write(
        &script,
        format!(
            "#!/usr/bin/env python3\nimport sys\nrq, rp = sys.stdin.buffer, sys.stdout.buffer\n\
             while True:\n    h = rq.readline()\n    if not h: break\n    i, a, n = h.split()\n    \
             body = rq.read(int(n)); rq.read(1)\n    open('{}/' + i.decode() + '.in', 'wb').write(body)\n    \
             rp.write(b'ok\\n'); rp.flush()\n",
            work.path().display()
        ),
    )
    .unwrap();
    let binary = all_byte_values(4);
    let big = pseudo_random_bytes(4 * 1024 * 1024, 7);
    let c = TestClient::connect(&redis.url()).await;
    let id1 = c.xadd("bin", &[("payload", &binary)]).await;
    let id2 = c.xadd("bin", &[("payload", &big)]).await;
    let id3 = c.xadd("bin", &[("payload", b"")]).await;
    let cfg = config(
        &redis.url(),
        &worker_table("bin", &script, "max_block_read = 1"),
    );
    let d = Daemon::start(&cfg);
    let cr = &c;
    let last = id3.clone();
    let lr = last.as_str();
    d.wait_until(LONG, "3 entries acked", || async move {
        cr.all_acked_through("bin", "workers", lr).await
    })
    .await;
    assert_eq!(
        read_or_empty(&work.path().join(format!("{id1}.in"))),
        binary
    );
    assert_eq!(read_or_empty(&work.path().join(format!("{id2}.in"))), big);
    assert!(read_or_empty(&work.path().join(format!("{id3}.in"))).is_empty());
}

/// Garbage reply, a partial frame followed by exit, death mid-entry: each fails only that
/// attempt, and a fresh worker handles the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_workers_fail_the_attempt_and_are_replaced() {
    let redis = RedisServer::start();
    let work = workdir();
    // Each payload names the misbehaviour for its first attempt; attempt 2 succeeds.
    let script = write_script(
        work.path(),
        "bad.sh",
        &format!(
            "while :; do\n{SH_READ}\
             echo \"$id $attempt\" >> \"$D/runs\"\n\
             if [ \"$attempt\" = 1 ]; then\n\
               case \"$payload\" in\n\
                 garbage) echo 'yes sir' ;;\n\
                 partial) printf 'o'; exit 0 ;;\n\
                 die) kill -9 $$ ;;\n\
               esac\n\
             else echo ok; fi\n\
             done"
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let mut ids = Vec::new();
    for p in ["garbage", "partial", "die"] {
        ids.push((p, c.xadd("bad", &[("payload", p.as_bytes())]).await));
    }
    let cfg = config(
        &redis.url(),
        &worker_table("bad", &script, "max_block_read = 1\nmax_attempts = 2"),
    );
    let d = Daemon::start(&cfg);
    d.wait_settled(&c, "bad", "workers", &ids[2].1).await;
    assert_eq!(c.xlen("bad:dlq").await, 0);
    let runs = read_lines(&work.path().join("runs"));
    assert_eq!(runs.len(), 6, "each entry ran twice: {runs:?}");
    let log = d.log();
    assert!(
        log.contains("worker protocol error: unexpected reply"),
        "{}",
        d.log_tail()
    );
    assert!(log.contains("worker exited"), "{}", d.log_tail());
    assert!(log.contains("killed by signal 9"), "{}", d.log_tail());
}

/// A worker that dies at once, every time, fails attempts (the entry reaches the DLQ) and
/// is restarted with growing delays instead of spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_worker_backs_off_and_is_reported() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "crash.sh",
        "echo started >> \"$D/starts\"; echo 'cannot start: missing config' >&2; exit 1",
    );
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("crash", &[("payload", b"x")]).await;
    let cfg = config(
        &redis.url(),
        &worker_table("crash", &script, "max_block_read = 2\nmax_attempts = 3"),
    );
    let d = Daemon::start(&cfg);
    let dead = dlq_entry(&c, "crash", &d).await;
    assert_eq!(dead.get_str("dlq_source_id").as_deref(), Some(id.as_str()));
    let reason = dead.get_str("dlq_reason").unwrap_or_default();
    assert!(reason.starts_with("worker exited"), "{reason}");
    // Let it idle for a while: with nothing to do, no worker is restarted at all.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let starts = read_lines(&work.path().join("starts")).len();
    assert!(
        (3..=6).contains(&starts),
        "3 attempts need 3 starts (idle restarts would be a spin): {starts}\n{}",
        d.log_tail()
    );
    assert!(d.log().contains("worker keeps dying"), "{}", d.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_worker_times_out_and_is_killed_with_its_group() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "hang.sh",
        &format!(
            "sleep 1000 & echo $! > \"$D/grandchild\"\n\
             while :; do\n{SH_READ}sleep 1000\ndone"
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    c.xadd("hang", &[("payload", b"x")]).await;
    let cfg = config(
        &redis.url(),
        &worker_table(
            "hang",
            &script,
            "max_block_read = 1\nmax_attempts = 1\nhandler_timeout = \"1s\"",
        ),
    );
    let d = Daemon::start(&cfg);
    let dead = dlq_entry(&c, "hang", &d).await;
    assert_eq!(
        dead.get_str("dlq_reason").as_deref(),
        Some("timeout after 1s")
    );
    let pid: i32 = String::from_utf8_lossy(&read_or_empty(&work.path().join("grandchild")))
        .trim()
        .parse()
        .expect("grandchild pid");
    d.wait_until(LONG, "the worker's grandchild is gone", || async move {
        proc_stat(pid).is_none_or(|s| s.state == 'Z')
    })
    .await;
}

/// A python worker for [`entries_behind_a_dying_worker_keep_their_attempt`]: parses
/// requests from raw reads, logs `<id> <attempt>` to `$D/seen`, dies (exit 3) on the
/// payload `die` at its first attempt, and replies `ok` otherwise.
const PY_DYING_WORKER: &str = r#"#!/usr/bin/env python3
import os
buf = b""
seen = open(os.path.join(os.environ["D"], "seen"), "a")
def fill(n):
    global buf
    while len(buf) < n:
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
while True:
    while b"\n" not in buf:
        fill(len(buf) + 1)
    header, buf = buf.split(b"\n", 1)
    ident, attempt, length = header.decode().split()
    fill(int(length) + 1)
    payload, buf = buf[:int(length)], buf[int(length) + 1:]
    seen.write("%s %s\n" % (ident, attempt))
    seen.flush()
    if payload == b"die" and attempt == "1":
        os._exit(3)
    os.write(1, b"ok\n")
"#;

/// Entries the daemon wrote to a worker behind one that kills it go to the next worker
/// with the attempt number they had: only the entry in hand pays for the death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_behind_a_dying_worker_keep_their_attempt() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = work.path().join("dying.py");
    let tmp = work.path().join(".dying.py.tmp");
    fs::write(&tmp, PY_DYING_WORKER).expect("write worker");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    fs::rename(&tmp, &script).expect("rename worker");
    let c = TestClient::connect(&redis.url()).await;
    let mut ids = Vec::new();
    for i in 0..400 {
        let payload: &[u8] = if i == 250 { b"die" } else { b"ok" };
        ids.push(c.xadd("pipe", &[("payload", payload)]).await);
    }
    let die = ids[250].clone();
    let cfg = config(
        &redis.url(),
        &worker_table(
            "pipe",
            &script,
            &format!(
                "max_block_read = 1\nmax_attempts = 2\nenv = {{ D = \"{}\" }}",
                work.path().display()
            ),
        ),
    );
    let d = Daemon::start(&cfg);
    let last = ids.last().cloned().unwrap_or_default();
    d.wait_settled(&c, "pipe", "workers", &last).await;
    assert_eq!(c.xlen("pipe:dlq").await, 0, "{}", d.log_tail());
    let seen = read_lines(&work.path().join("seen"));
    let mut runs: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for line in &seen {
        let (id, attempt) = line.split_once(' ').expect("id attempt");
        runs.entry(id).or_default().push(attempt);
    }
    for id in &ids {
        let expected: &[&str] = if *id == die { &["1", "2"] } else { &["1"] };
        assert_eq!(
            runs.get(id.as_str()).map(Vec::as_slice),
            Some(expected),
            "runs of {id}"
        );
    }
    assert_eq!(
        d.log().matches("worker lost").count(),
        1,
        "{}",
        d.log_tail()
    );
}

/// Slow workers take nothing ahead, whatever `worker_prefetch` allows: two daemons on one
/// stream share its entries instead of the first one taking them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_workers_leave_entries_to_other_consumers() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "slow.sh",
        &format!(
            "while :; do\n{SH_READ}sleep 0.3\n\
             echo \"$REDIS_STREAMD_CONSUMER $id\" >> \"$D/runs\"\necho ok\ndone"
        ),
    );
    let c = TestClient::connect(&redis.url()).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            c.xadd("slow", &[("payload", format!("{i}").as_bytes())])
                .await,
        );
    }
    let cfg = config(
        &redis.url(),
        &worker_table("slow", &script, "max_block_read = 2\nworker_prefetch = 32"),
    );
    let a = Daemon::start(&cfg);
    let b = Daemon::start_with(
        &cfg,
        &["--log-level", "debug"],
        &[("REDIS_STREAMD_CONSUMER", "other")],
    );
    let last = ids.last().cloned().unwrap_or_default();
    a.wait_settled(&c, "slow", "workers", &last).await;
    let runs = read_lines(&work.path().join("runs"));
    assert_eq!(runs.len(), 30, "each entry once: {runs:?}");
    for consumer in [CONSUMER, "other"] {
        assert!(
            runs.iter().any(|l| l.starts_with(&format!("{consumer} "))),
            "{consumer} handled nothing: {runs:?}\n{}\n{}",
            a.log_tail(),
            b.log_tail()
        );
    }
}
