//! Fault injection against real processes (issue 3): the daemon killed with SIGKILL while
//! handlers run, restarted with the same or another consumer name, redis-server restarted
//! mid-run, poison entries across daemon crashes, SIGTERM with handlers in flight, long
//! handlers next to a second daemon, Redis unreachable at start, and the consumer group
//! deleted under a running daemon.
//!
//! Every test starts its own redis-server and the real binary with short recovery settings
//! (`block` 200ms, `claim_interval` 500ms, `claim_idle` 3s, `retry_backoff` 100ms). Deadlines
//! are generous and nothing asserts on elapsed time; the few fixed sleeps are settle periods
//! during which nothing more may happen.

mod common;
mod faults_support;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::time::Duration;

use common::*;
use faults_support::*;

/// Deadline for a whole recovery (claims after `claim_idle`, reruns, acks) on a busy machine.
const RECOVERY: Duration = Duration::from_secs(120);

/// Pushes `n` entries with payload `p<i>` and returns their ids in order.
async fn push_n(c: &TestClient, stream: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            c.xadd(stream, &[("payload", format!("p{i}").as_bytes())])
                .await,
        );
    }
    ids
}

/// kill -9 the daemon while 50 handlers run; a second daemon with another consumer name
/// takes over the dead consumer's entries (XAUTOCLAIM after `claim_idle`) and reads the rest.
///
/// At-least-once: the handlers of the killed daemon are orphaned, not killed (exactly as
/// after a real `kill -9`), and may still finish and append their id to the done-file; the
/// second daemon runs those entries again after claiming them, so ids may appear twice in
/// the done-file. What must hold: every entry is acked (or dead-lettered), every id was
/// handled successfully at least once, and nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_50_running_handlers_then_another_consumer_finishes_everything() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "work.sh",
        "cat > /dev/null\n\
         echo \"$REDIS_STREAMD_ID $REDIS_STREAMD_CONSUMER $REDIS_STREAMD_ATTEMPT\" >> \"$D/starts\"\n\
         sleep 2\n\
         echo \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let streams = fast_stream(
        "jobs",
        "g",
        &script,
        "max_block_read = 50\nstart_id = \"0\"",
    );
    let c = TestClient::connect(&redis.url()).await;
    let ids = push_n(&c, "jobs", 80).await;

    let mut a = Daemon::start(&config_as(&redis.url(), "worker-a", "10s", &streams));
    let a_pid = a.pid();
    a.wait_until(LONG, "daemon A runs 50 handlers at once", || async move {
        live_children(a_pid).len() >= 50
    })
    .await;
    let mut orphans = Orphans::default();
    let running = orphans.kill9(&mut a);
    assert!(
        running <= 50,
        "more than max_block_read handlers ran: {running}"
    );
    eprintln!("killed daemon A with {running} handlers running");

    let mut b = Daemon::start(&config_as(&redis.url(), "worker-b", "10s", &streams));
    let done = work.path().join("done");
    let (cr, idsr, doner) = (&c, ids.as_slice(), done.as_path());
    b.wait_until(
        RECOVERY,
        "all 80 entries acked or dead-lettered, every id handled",
        || async move { all_settled(cr, "jobs", "g", "jobs:dlq", idsr, doner).await },
    )
    .await;

    assert_eq!(c.pending_count("jobs", "g").await, 0, "nothing pending");
    assert!(c.pending_entries("jobs", "g").await.is_empty());
    let done_ids = line_set(&done);
    let not_done: Vec<_> = ids.iter().filter(|id| !done_ids.contains(*id)).collect();
    assert!(
        not_done.is_empty(),
        "ids never handled successfully: {not_done:?}"
    );
    // Every handler succeeds and no entry is delivered more than twice (A's read, B's
    // claim), below max_attempts (3): nothing may be dead-lettered.
    let dlq = dlq_source_ids(&c, "jobs:dlq").await;
    assert!(dlq.is_empty(), "unexpected DLQ entries: {dlq:?}");
    // B took over A's entries (XAUTOCLAIM: delivery count 2) and read the rest itself
    // (delivery count 1); lines are "<id> <consumer> <attempt>".
    let starts: Vec<Vec<String>> = read_lines(&work.path().join("starts"))
        .iter()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let by_a: BTreeSet<&str> = starts
        .iter()
        .filter(|f| f[1] == "worker-a")
        .map(|f| f[0].as_str())
        .collect();
    assert!(by_a.len() >= running, "A's starts: {by_a:?}");
    // Entries of A's handlers are still pending after the kill (A's orphaned handlers may
    // finish, but nobody acks for them), so B must claim and run them again: attempt 2.
    // Only an entry whose handler A saw finish before the kill (possible on a very slow
    // machine) may have been acked by A and not run again. Entries A never read are read
    // by B: attempt 1.
    let mut rerun = 0;
    for id in &ids {
        let b_runs: Vec<&str> = starts
            .iter()
            .filter(|f| f[0] == *id && f[1] == "worker-b")
            .map(|f| f[2].as_str())
            .collect();
        let ok = if by_a.contains(id.as_str()) {
            rerun += b_runs.len();
            b_runs.is_empty() || b_runs == ["2"]
        } else {
            b_runs == ["1"]
        };
        assert!(
            ok,
            "worker-b's runs of {id} (attempt numbers): {b_runs:?}; all starts: {starts:?}\n{}",
            b.log_tail()
        );
    }
    assert!(rerun > 0, "worker-b took over none of A's entries");
    eprintln!(
        "handler runs: {} in all, {rerun} of them re-runs by worker-b; done-file lines: {}",
        starts.len(),
        read_lines(&done).len()
    );
    b.assert_running();
    b.sigterm();
    let status = b.wait_exit(MEDIUM);
    assert!(status.success(), "daemon B exit status {status}");
}

/// kill -9 and restart with the SAME consumer name: the restarted daemon first finishes its
/// own pending entries (re-read from id 0), then reads entries pushed while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_same_name_finishes_own_pending_entries_first() {
    let redis = RedisServer::start();
    let work = workdir();
    // Until the test creates "release", handlers hang (the daemon is killed meanwhile).
    let script = write_script(
        work.path(),
        "work.sh",
        "cat > /dev/null\n\
         echo \"start $REDIS_STREAMD_ID $REDIS_STREAMD_ATTEMPT $PPID\" >> \"$D/starts\"\n\
         [ -e \"$D/release\" ] || sleep 300\n\
         sleep 0.2\n\
         echo \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let streams = fast_stream("jobs", "g", &script, "max_block_read = 4\nstart_id = \"0\"");
    let cfg = config_as(&redis.url(), CONSUMER, "10s", &streams);
    let c = TestClient::connect(&redis.url()).await;
    let old = push_n(&c, "jobs", 4).await;

    let mut a = Daemon::start(&cfg);
    let starts = work.path().join("starts");
    let startsr = starts.as_path();
    a.wait_until(LONG, "4 handlers started", || async move {
        read_lines(startsr).len() >= 4
    })
    .await;
    let mut orphans = Orphans::default();
    orphans.kill9(&mut a);
    // The machine died with the daemon: its handlers are gone too.
    orphans.kill_all();
    let pel = c.pending_entries("jobs", "g").await;
    assert_eq!(
        pel.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        old,
        "the 4 entries pending for the killed daemon"
    );

    let new = push_n(&c, "jobs", 6).await;
    fs::write(work.path().join("release"), b"").unwrap();
    let b = Daemon::start(&cfg);
    let all: Vec<String> = old.iter().chain(new.iter()).cloned().collect();
    let done = work.path().join("done");
    let (cr, allr, doner) = (&c, all.as_slice(), done.as_path());
    b.wait_until(LONG, "all 10 entries handled and acked", || async move {
        all_settled(cr, "jobs", "g", "jobs:dlq", allr, doner).await
    })
    .await;

    // Lines written by handlers of the restarted daemon ($PPID = its pid), in order.
    let b_pid = b.pid().to_string();
    let b_starts: Vec<Vec<String>> = read_lines(&starts)
        .iter()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|f| f.len() == 4 && f[3] == b_pid)
        .collect();
    assert_eq!(
        b_starts.len(),
        10,
        "restarted daemon ran each entry once: {b_starts:?}"
    );
    let first: BTreeSet<&str> = b_starts[..4].iter().map(|f| f[1].as_str()).collect();
    let expected: BTreeSet<&str> = old.iter().map(String::as_str).collect();
    assert_eq!(
        first, expected,
        "the first 4 starts after the restart must be the previously pending entries; starts: {b_starts:?}"
    );
    for f in &b_starts[..4] {
        assert_eq!(f[2], "2", "recovered entry {} is its 2nd delivery", f[1]);
    }
    for f in &b_starts[4..] {
        assert_eq!(f[2], "1", "new entry {} is its 1st delivery", f[1]);
    }
    assert_eq!(c.xlen("jobs:dlq").await, 0);
    assert_eq!(c.pending_count("jobs", "g").await, 0);
}

/// redis-server (AOF, appendfsync always) restarted in the middle of a run of 1,000 entries:
/// all of them end up acked or dead-lettered, nothing pending, and the daemon keeps running
/// and handles a new entry afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_of_1000_entries_loses_nothing() {
    let mut redis = RedisServer::start_persistent();
    let work = workdir();
    let script = write_script(
        work.path(),
        "work.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    // max_attempts = 1: an entry whose delivery was lost with the connection must still
    // get its one run (the lost delivery counts as that attempt), not go to the DLQ.
    let streams = fast_stream("jobs", "g", &script, "start_id = \"0\"\nmax_attempts = 1");
    let c = TestClient::connect(&redis.url()).await;
    let ids = push_n(&c, "jobs", 1000).await;

    let mut d = Daemon::start(&config_as(&redis.url(), CONSUMER, "10s", &streams));
    let done = work.path().join("done");
    let doner = done.as_path();
    d.wait_until(LONG, "100 entries handled", || async move {
        read_lines(doner).len() >= 100
    })
    .await;
    let handled_before = line_set(&done).len();
    blocking(|| {
        redis.stop();
        std::thread::sleep(Duration::from_secs(1));
        redis.start_again();
    });
    let handled_at_restart = line_set(&done).len();
    eprintln!("restarted redis after {handled_before}..{handled_at_restart} of 1000 entries");
    assert!(
        handled_before < 1000,
        "the run finished before redis was restarted: the test proves nothing"
    );

    let (cr, idsr) = (&c, ids.as_slice());
    d.wait_until(
        RECOVERY,
        "all 1000 entries acked or dead-lettered after the redis restart",
        || async move { all_settled(cr, "jobs", "g", "jobs:dlq", idsr, doner).await },
    )
    .await;
    assert_eq!(c.pending_count("jobs", "g").await, 0);
    let dlq: HashSet<String> = dlq_source_ids(&c, "jobs:dlq").await.into_iter().collect();
    let missing = missing_ids(&ids, &line_set(&done), &dlq);
    assert!(missing.is_empty(), "lost entries: {missing:?}");
    eprintln!(
        "after restart: {} handler runs for 1000 entries, {} dead-lettered",
        read_lines(&done).len(),
        dlq.len()
    );
    assert!(
        dlq.is_empty(),
        "entries dead-lettered although their handler never failed: {dlq:?}\n{}",
        d.log_tail()
    );
    d.assert_running();

    let extra = c.xadd("jobs", &[("payload", b"after the restart")]).await;
    let extrar = extra.as_str();
    d.wait_until(
        LONG,
        "a new entry handled after the restart",
        || async move {
            line_set(doner).contains(extrar) && cr.all_acked_through("jobs", "g", extrar).await
        },
    )
    .await;
    d.assert_running();
}

/// A poison entry (its handler always exits 1) reaches the DLQ after exactly max_attempts
/// (3) runs in all, although the daemon is killed with SIGKILL after the 1st and after the
/// 2nd run and restarted with the same consumer name each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entry_reaches_dlq_after_exactly_max_attempts_across_kills() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "poison.sh",
        "cat > /dev/null\n\
         echo \"run $REDIS_STREAMD_ATTEMPT $PPID\" >> \"$D/runs\"\n\
         echo 'poison!' >&2\n\
         exit 1",
    );
    let streams = stream_table(
        "jobs",
        "g",
        &script,
        &format!(
            "{}\nretry_backoff = \"2s\"\nmax_attempts = 3\nstart_id = \"0\"",
            fast_except(&["retry_backoff"])
        ),
    );
    let cfg = config_as(&redis.url(), CONSUMER, "10s", &streams);
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("jobs", &[("payload", b"poison")]).await;
    let runs = work.path().join("runs");
    let runsr = runs.as_path();
    let mut orphans = Orphans::default();

    for n in 1..=2 {
        let mut d = Daemon::start(&cfg);
        d.wait_until(
            LONG,
            &format!("run {n} of the poison entry"),
            || async move { read_lines(runsr).len() >= n },
        )
        .await;
        orphans.kill9(&mut d);
        assert_eq!(
            read_lines(&runs).len(),
            n,
            "runs after killing daemon {n}: {:?}",
            read_lines(&runs)
        );
    }

    let d = Daemon::start(&cfg);
    let cr = &c;
    d.wait_until(LONG, "the poison entry in the DLQ", || async move {
        cr.xlen("jobs:dlq").await >= 1
    })
    .await;
    let at_dlq = read_lines(&runs);
    assert_eq!(
        at_dlq.len(),
        3,
        "runs when the DLQ entry appeared: {at_dlq:?}"
    );
    // Past backoffs, claim_interval and claim_idle: no further run may happen.
    settle(4.0).await;
    let lines = read_lines(&runs);
    assert_eq!(lines.len(), 3, "runs after settling: {lines:?}");
    let attempts: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        attempts,
        ["1", "2", "3"],
        "REDIS_STREAMD_ATTEMPT of the runs"
    );

    let dlq = c.xrange_all("jobs:dlq").await;
    assert_eq!(dlq.len(), 1, "one DLQ entry: {dlq:?}");
    let e = &dlq[0];
    assert_eq!(e.get_str("dlq_source_id").as_deref(), Some(id.as_str()));
    assert_eq!(e.get_str("dlq_attempts").as_deref(), Some("3"));
    assert_eq!(e.get_str("dlq_reason").as_deref(), Some("exit code 1"));
    assert_eq!(e.get_str("dlq_consumer").as_deref(), Some(CONSUMER));
    assert!(
        e.get_str("dlq_stderr")
            .unwrap_or_default()
            .contains("poison!"),
        "dlq_stderr: {:?}",
        e.get_str("dlq_stderr")
    );
    assert_eq!(e.get("payload"), Some(&b"poison"[..]));
    assert_eq!(c.pending_count("jobs", "g").await, 0);
}

/// A poison entry whose every run takes its daemon down (killed with SIGKILL while the
/// handler runs): after 3 runs the 4th delivery exceeds max_attempts and the entry goes to
/// the DLQ without running again (`delivered 4 times, more than max_attempts (3)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_that_kills_its_daemon_every_time_reaches_dlq_without_a_fourth_run() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "crash.sh",
        "cat > /dev/null\n\
         echo \"run $REDIS_STREAMD_ATTEMPT $PPID\" >> \"$D/runs\"\n\
         sleep 300",
    );
    let streams = fast_stream("jobs", "g", &script, "max_attempts = 3\nstart_id = \"0\"");
    let cfg = config_as(&redis.url(), CONSUMER, "10s", &streams);
    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("jobs", &[("payload", b"crash")]).await;
    let runs = work.path().join("runs");
    let runsr = runs.as_path();
    let mut orphans = Orphans::default();

    for n in 1..=3 {
        let mut d = Daemon::start(&cfg);
        d.wait_until(LONG, &format!("run {n} of the entry"), || async move {
            read_lines(runsr).len() >= n
        })
        .await;
        // The "crash" takes the handler with it.
        orphans.kill9(&mut d);
        orphans.kill_all();
    }

    let d = Daemon::start(&cfg);
    let cr = &c;
    d.wait_until(LONG, "the entry in the DLQ", || async move {
        cr.xlen("jobs:dlq").await >= 1
    })
    .await;
    settle(4.0).await;
    let lines = read_lines(&runs);
    assert_eq!(lines.len(), 3, "handler runs: {lines:?}");
    let dlq = c.xrange_all("jobs:dlq").await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let e = &dlq[0];
    assert_eq!(e.get_str("dlq_source_id").as_deref(), Some(id.as_str()));
    assert_eq!(e.get_str("dlq_attempts").as_deref(), Some("3"));
    assert_eq!(
        e.get_str("dlq_reason").as_deref(),
        Some("delivered 4 times, more than max_attempts (3)")
    );
    assert_eq!(c.pending_count("jobs", "g").await, 0);
}

/// SIGTERM with handlers mid-flight, shutdown_timeout 2s: the ones that finish in time
/// (0.5 s) are acked, the ones that would take 300 s are terminated and stay pending (not
/// dead-lettered), the daemon exits 0, and no handler process is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acks_finished_handlers_leaves_unfinished_pending_and_kills_the_rest() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "work.sh",
        "p=$(cat)\n\
         echo $$ >> \"$D/pids\"\n\
         if [ \"$p\" = slow ]; then sleep 300; else sleep 0.5; fi\n\
         echo \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let streams = fast_stream(
        "jobs",
        "g",
        &script,
        "max_block_read = 10\nstart_id = \"0\"",
    );
    let c = TestClient::connect(&redis.url()).await;
    let mut fast = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..3 {
        fast.push(c.xadd("jobs", &[("payload", b"fast")]).await);
        slow.push(c.xadd("jobs", &[("payload", b"slow")]).await);
    }

    let mut d = Daemon::start(&config_as(&redis.url(), CONSUMER, "2s", &streams));
    let pids_file = work.path().join("pids");
    let pidsr = pids_file.as_path();
    d.wait_until(LONG, "6 handlers started", || async move {
        read_lines(pidsr).len() >= 6
    })
    .await;
    let pids: Vec<i32> = read_lines(&pids_file)
        .iter()
        .map(|l| l.trim().parse().expect("pid"))
        .collect();
    // Safety net only: the daemon must have killed them itself (asserted below).
    let _cleanup = Orphans(pids.clone());
    d.sigterm();
    let status = d.wait_exit(MEDIUM);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        d.log_tail()
    );

    let done = line_set(&work.path().join("done"));
    let fast_set: BTreeSet<String> = fast.iter().cloned().collect();
    assert_eq!(
        done,
        fast_set,
        "only the fast handlers finished\n{}",
        d.log_tail()
    );
    let pel = c.pending_entries("jobs", "g").await;
    let pending: BTreeSet<String> = pel.iter().map(|p| p.id.clone()).collect();
    let slow_set: BTreeSet<String> = slow.iter().cloned().collect();
    assert_eq!(
        pending,
        slow_set,
        "the fast entries are acked, the slow ones still pending\n{}",
        d.log_tail()
    );
    assert!(pel.iter().all(|p| p.consumer == CONSUMER), "{pel:?}");
    assert_eq!(c.xlen("jobs:dlq").await, 0, "shutdown dead-letters nothing");

    // No process of any handler's process group may survive (zombies are not processes
    // that run; they belong to whoever inherited them).
    let groups: HashSet<i32> = pids.iter().copied().collect();
    let groupsr = &groups;
    wait_until(
        MEDIUM,
        "every handler process gone",
        Some(&d),
        || async move { live_members_of(groupsr).is_empty() },
    )
    .await;
}

/// A handler that runs longer than claim_idle, next to a second daemon (another consumer
/// name) sharing the group: the running entry is kept fresh and never claimed, so it runs
/// exactly once and is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_is_not_run_twice_by_a_second_daemon() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "long.sh",
        "cat > /dev/null\n\
         echo \"$REDIS_STREAMD_ID $REDIS_STREAMD_CONSUMER $REDIS_STREAMD_ATTEMPT\" >> \"$D/runs\"\n\
         sleep 10\n\
         echo \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let streams = fast_stream("jobs", "g", &script, "start_id = \"0\"");
    let c = TestClient::connect(&redis.url()).await;
    let a = Daemon::start(&config_as(&redis.url(), "worker-a", "10s", &streams));
    let b = Daemon::start(&config_as(&redis.url(), "worker-b", "10s", &streams));
    let cr = &c;
    a.wait_group(cr, "jobs", "g").await;
    let id = c.xadd("jobs", &[("payload", b"long")]).await;

    let done = work.path().join("done");
    let (doner, idr) = (done.as_path(), id.as_str());
    a.wait_until(LONG, "the long entry handled and acked", || async move {
        line_set(doner).contains(idr) && cr.all_acked_through("jobs", "g", idr).await
    })
    .await;
    // Longer than claim_idle + claim_interval: a late claim would show up now.
    settle(4.0).await;
    let runs = read_lines(&work.path().join("runs"));
    assert_eq!(
        runs.len(),
        1,
        "the long handler ran more than once: {runs:?}\n{}\n{}",
        a.log_tail(),
        b.log_tail()
    );
    assert!(runs[0].ends_with(" 1"), "first delivery: {runs:?}");
    assert_eq!(read_lines(&done).len(), 1);
    assert_eq!(c.pending_count("jobs", "g").await, 0);
    assert_eq!(c.xlen("jobs:dlq").await, 0);
}

/// Redis unreachable at start: without connect_timeout the daemon keeps retrying (and says
/// so), then connects once redis-server is up on that port and handles an entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_daemon_retries_until_it_is_up() {
    // Take a port that a redis-server of ours can use, and stop the server.
    let mut redis = RedisServer::start();
    blocking(|| redis.stop());
    let work = workdir();
    let script = write_script(
        work.path(),
        "work.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    let streams = fast_stream("jobs", "g", &script, "start_id = \"0\"");
    let mut d = Daemon::start(&config_as(&redis.url(), CONSUMER, "10s", &streams));
    d.wait_until(LONG, "the daemon logs that it retries", || async {
        d.log().to_lowercase().contains("retrying")
    })
    .await;
    d.assert_running();
    blocking(|| redis.start_again());

    let c = TestClient::connect(&redis.url()).await;
    let id = c.xadd("jobs", &[("payload", b"hello")]).await;
    let done = work.path().join("done");
    let (cr, doner, idr) = (&c, done.as_path(), id.as_str());
    d.wait_until(LONG, "the entry handled once redis is up", || async move {
        line_set(doner).contains(idr) && cr.all_acked_through("jobs", "g", idr).await
    })
    .await;
    d.assert_running();
}

/// With `[redis] connect_timeout = "1s"` and nothing listening, the daemon gives up and
/// exits 69 (EX_UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_with_connect_timeout_exits_69() {
    let work = workdir();
    let script = write_script(work.path(), "work.sh", "cat > /dev/null");
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let cfg = format!(
        "[redis]\nurl = {}\nconnect_timeout = \"1s\"\n\n[daemon]\nconsumer = {}\n\n{}\n",
        toml_str(&url),
        toml_str(CONSUMER),
        fast_stream("jobs", "g", &script, "")
    );
    let mut d = Daemon::start(&cfg);
    let status = d.wait_exit(MEDIUM);
    assert_eq!(
        status.code(),
        Some(69),
        "exit status {status}\n{}",
        d.log_tail()
    );
}

/// The consumer group destroyed under a running daemon (XGROUP DESTROY): the daemon logs
/// it, recreates the group, and handles entries pushed afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_destroyed_under_running_daemon_is_recreated() {
    let redis = RedisServer::start();
    let work = workdir();
    let script = write_script(
        work.path(),
        "work.sh",
        "cat > /dev/null\necho \"$REDIS_STREAMD_ID\" >> \"$D/done\"",
    );
    // start_id "$" (the default): the recreated group starts at the end of the stream.
    let streams = fast_stream("jobs", "g", &script, "");
    let mut d = Daemon::start(&config_as(&redis.url(), CONSUMER, "10s", &streams));
    let c = TestClient::connect(&redis.url()).await;
    let cr = &c;
    d.wait_group(cr, "jobs", "g").await;
    let first = c.xadd("jobs", &[("payload", b"before")]).await;
    let done = work.path().join("done");
    let (doner, firstr) = (done.as_path(), first.as_str());
    d.wait_until(LONG, "first entry handled", || async move {
        line_set(doner).contains(firstr) && cr.all_acked_through("jobs", "g", firstr).await
    })
    .await;

    let destroyed = c
        .cmd("XGROUP", vec!["DESTROY".into(), "jobs".into(), "g".into()])
        .await
        .expect("XGROUP DESTROY");
    assert_eq!(destroyed.as_u64(), Some(1), "group destroyed");
    d.wait_until(
        LONG,
        "daemon noticed NOGROUP and recreated the group",
        || async { d.log().contains("NOGROUP") && cr.group_exists("jobs", "g").await },
    )
    .await;

    let later = push_n(&c, "jobs", 3).await;
    let (laterr, last) = (later.as_slice(), later[2].as_str());
    d.wait_until(
        LONG,
        "entries pushed after the recreation handled",
        || async move {
            let done = line_set(doner);
            laterr.iter().all(|id| done.contains(id))
                && cr.all_acked_through("jobs", "g", last).await
        },
    )
    .await;
    assert_eq!(c.xlen("jobs:dlq").await, 0);
    d.assert_running();
}
