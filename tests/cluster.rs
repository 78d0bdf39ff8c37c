//! Redis Cluster end to end (issue 11): a 3-primary / 3-replica cluster on loopback
//! (`cluster-node-timeout 1500`), the real daemon on a `redis-cluster://` URL, streams on
//! every primary. 3,000 entries shared by two daemons, each acked exactly once or
//! dead-lettered; a manual failover, a kill -9 of a primary and a slot migration in the
//! middle of a run (no stall, nothing lost, the daemon keeps running); a primary frozen
//! past the node timeout and continued as a replica (no retry loop against it); the
//! dead-letter write with the stream and its DLQ in the same slot (one atomic script) and
//! in different slots (DLQ then ack, warned once at start).
//!
//! The handler (`recording_handler`) appends `<stream> <id> <consumer>` to a file on success
//! and exits 3 (`dlq_exit_codes = [3]`) for `poison` payloads. The checks read the streams
//! themselves: every entry in a stream handled or dead-lettered, nothing pending, no pushed
//! entry missing. Entries may run twice after a failover (acks not yet replicated are lost
//! with the old primary), so only the run without failover asserts exactly once.

mod common;
mod topology;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use tempfile::TempDir;
use topology::cluster::Cluster;
use topology::*;

const GROUP: &str = "g";
/// Handler work for the disruption tests: 300 entries per stream take a few seconds at
/// `max_block_read = 4`, so the disruption comes while entries are being handled.
const SLOW: &str = "sleep 0.05";

/// One stream name per primary (in the cluster's slot order), `{<prefix>-<i>}` for the
/// first `i` whose slot that primary owns; the hash tag puts `<name>:dlq` in the same slot.
fn one_stream_per_primary(cluster: &mut Cluster, prefix: &str) -> Vec<String> {
    let primaries = cluster.primaries();
    let slots = cluster.slots();
    let mut names: Vec<Option<String>> = vec![None; primaries.len()];
    for i in 0.. {
        let name = format!("{{{prefix}-{i}}}");
        let slot = fred::util::redis_keyslot(name.as_bytes());
        let owner = slots
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .map(|r| r.primary)
            .expect("slot owner");
        let at = primaries.iter().position(|&p| p == owner).expect("primary");
        names[at].get_or_insert(name);
        if names.iter().all(Option::is_some) {
            break;
        }
    }
    names.into_iter().flatten().collect()
}

/// A cluster, daemons reading `names` in group [`GROUP`], a test client, and what was
/// pushed. Daemons are dropped (killed) before the cluster.
struct Run {
    daemons: Vec<Daemon>,
    /// `/metrics` port of each daemon.
    metrics: Vec<u16>,
    c: TestClient,
    cluster: Cluster,
    watched: Vec<Watched>,
    pushed: HashMap<String, Vec<String>>,
    done: PathBuf,
    _work: TempDir,
}

impl Run {
    /// Starts one daemon per consumer name, each with every stream (`stream_extra` lines),
    /// and waits until they are ready and the groups exist.
    async fn start(
        mut cluster: Cluster,
        names: &[String],
        consumers: &[&str],
        stream_extra: &str,
        work_sh: &str,
    ) -> Run {
        let work = workdir();
        let (done, script) = recording_handler(work.path(), work_sh);
        let streams: String = names
            .iter()
            .map(|n| topo_stream(n, GROUP, &script, stream_extra))
            .collect();
        let url = cluster.url();
        let metrics: Vec<u16> = consumers.iter().map(|_| free_port()).collect();
        let daemons: Vec<Daemon> = consumers
            .iter()
            .zip(&metrics)
            .map(|(consumer, port)| {
                let listen = format!("metrics_listen = \"127.0.0.1:{port}\"");
                let cfg = daemon_config(&url, "", consumer, &listen, &streams);
                Daemon::start_with(&cfg, &["--log-level", "info"], &[])
            })
            .collect();
        let c = TestClient::connect(&url).await;
        for d in &daemons {
            wait_ready(d).await;
        }
        let cr = &c;
        for n in names {
            daemons[0]
                .wait_until(LONG, "group created", || async move {
                    group_state(cr, n, GROUP).await.is_some()
                })
                .await;
        }
        Run {
            daemons,
            metrics,
            c,
            cluster,
            watched: names.iter().map(|n| Watched::new(n)).collect(),
            pushed: HashMap::new(),
            done,
            _work: work,
        }
    }

    /// Pushes payloads `from..to` to every stream, every 100th a poison entry.
    async fn push(&mut self, from: usize, to: usize) {
        for w in &self.watched {
            let ids = push_range(&self.c, &w.stream, from, to, 100).await;
            self.pushed.entry(w.stream.clone()).or_default().extend(ids);
        }
    }

    fn daemon_refs(&self) -> Vec<&Daemon> {
        self.daemons.iter().collect()
    }

    /// Waits until every entry is handled or dead-lettered and nothing is pending.
    async fn wait_complete(&self) {
        let ds = self.daemon_refs();
        wait_complete(&self.c, &self.watched, GROUP, &self.done, &self.pushed, &ds).await;
    }

    /// Waits for at least `n` successful handler runs, and checks that work is left: the
    /// disruption that follows comes in the middle of the run.
    async fn wait_progress(&self, n: usize) {
        wait_done_at_least(&self.done, n, &self.daemon_refs()).await;
        let pushed: usize = self.pushed.values().map(Vec::len).sum();
        assert!(
            done_count(&self.done) < pushed * 99 / 100,
            "run already over"
        );
    }

    /// Every daemon counted the change of primaries.
    async fn assert_failover_counted(&self) {
        for (d, &port) in self.daemons.iter().zip(&self.metrics) {
            wait_metrics(d, port, "failover counted", |m| {
                metric_sum(m, "redis_streamd_redis_failovers_total") >= 1.0
            })
            .await;
        }
    }

    fn assert_running(&mut self) {
        for d in &mut self.daemons {
            d.assert_running();
        }
    }
}

/// Three streams on three primaries, two daemons sharing each group, 3,000 entries: every
/// one acked exactly once or dead-lettered (30 poison entries), nothing pending, both
/// daemons did work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_3000_entries_two_daemons_each_acked_once_or_dead_lettered() {
    let mut cluster = blocking(Cluster::start);
    let names = one_stream_per_primary(&mut cluster, "jobs");
    let mut run = Run::start(cluster, &names, &["d1", "d2"], "max_block_read = 8", "").await;
    run.push(0, 1000).await;
    run.wait_complete().await;

    let p = problems(&run.c, &run.watched, GROUP, &run.done, &run.pushed, true).await;
    assert!(p.is_empty(), "{p:#?}");
    let mut dead = 0;
    for w in &run.watched {
        assert_eq!(run.c_len(&w.stream).await, 1000, "{}", w.stream);
        dead += dlq_sources(&run.c, &w.dlq).await.expect("dlq").len();
    }
    assert_eq!(dead, 30, "every poison entry dead-lettered once");
    assert_eq!(
        done_count(&run.done),
        3000 - 30,
        "every other entry ran once"
    );
    for consumer in ["d1", "d2"] {
        assert!(
            done_by(&run.done, consumer) > 0,
            "{consumer} handled nothing: the group is not shared"
        );
    }
    run.assert_running();
}

impl Run {
    async fn c_len(&self, stream: &str) -> usize {
        stream_ids(&self.c, stream).await.expect("XRANGE").len()
    }
}

/// `CLUSTER FAILOVER` on the replica of a stream's primary while entries are being
/// handled: processing resumes, entries pushed after it are handled too, nothing is lost,
/// the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_manual_failover_mid_run() {
    let mut cluster = blocking(Cluster::start);
    let names = one_stream_per_primary(&mut cluster, "mf");
    let mut run = Run::start(cluster, &names, &["d1"], "max_block_read = 4", SLOW).await;
    run.push(0, 300).await;
    run.wait_progress(100).await;

    let owner = run.cluster.owner_of(&names[0]);
    let replica = run.cluster.replica_of(owner);
    blocking(|| run.cluster.manual_failover(replica));
    assert_eq!(run.cluster.owner_of(&names[0]), replica);

    run.push(300, 400).await;
    run.wait_complete().await;
    run.assert_failover_counted().await;
    run.assert_running();
}

/// kill -9 of a stream's primary while entries are being handled: its replica takes over
/// (the cluster is down for a few seconds meanwhile), processing resumes on every stream,
/// nothing written before the crash is lost, the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill9_primary_mid_run() {
    let mut cluster = blocking(Cluster::start);
    let names = one_stream_per_primary(&mut cluster, "k9");
    let mut run = Run::start(cluster, &names, &["d1"], "max_block_read = 4", SLOW).await;
    run.push(0, 300).await;
    // The pushed entries are on the replicas before the crash (acks may not be).
    blocking(|| run.cluster.wait_in_sync());
    run.wait_progress(100).await;

    let owner = run.cluster.owner_of(&names[0]);
    let promoted = blocking(|| run.cluster.kill_primary(owner));
    assert_eq!(run.cluster.owner_of(&names[0]), promoted);

    run.push(300, 400).await;
    run.wait_complete().await;
    run.assert_failover_counted().await;
    run.assert_running();
}

/// A stream's primary frozen (`kill -STOP`) past the node timeout while entries are
/// handled: its replica takes over; then continued (`kill -CONT`), it rejoins as a
/// replica. No stall, nothing lost, and no retry loop against the old primary: once
/// everything settled, a later batch goes through without a new `READONLY` or `MOVED`
/// line in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_frozen_primary_continued_as_replica() {
    let mut cluster = blocking(Cluster::start);
    let names = one_stream_per_primary(&mut cluster, "fz");
    let mut run = Run::start(cluster, &names, &["d1"], "max_block_read = 4", SLOW).await;
    run.push(0, 300).await;
    blocking(|| run.cluster.wait_in_sync());
    run.wait_progress(100).await;

    let owner = run.cluster.owner_of(&names[0]);
    let promoted = blocking(|| run.cluster.freeze_primary(owner));
    // The test client (fred 10.1) stalls on the frozen node's connection: a new one,
    // bootstrapped from the live nodes, sees the new primary.
    run.c = TestClient::connect(&run.cluster.url()).await;
    run.push(300, 350).await;
    blocking(|| run.cluster.thaw_as_replica(owner));
    assert_eq!(run.cluster.owner_of(&names[0]), promoted);
    run.push(350, 400).await;
    run.wait_complete().await;
    run.assert_failover_counted().await;

    let noisy = |d: &Daemon| log_lines_with(d, "READONLY").len() + log_lines_with(d, "MOVED").len();
    let before = noisy(&run.daemons[0]);
    eprintln!("READONLY/MOVED lines while the failover settled: {before}");
    run.push(400, 450).await;
    run.wait_complete().await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = noisy(&run.daemons[0]);
    assert_eq!(
        after,
        before,
        "errors against the old primary keep coming:\n{}",
        run.daemons[0].log_tail()
    );
    run.assert_running();
}

/// A stream's slot (the stream and its DLQ, one hash tag) moved to another primary while
/// entries are handled: processing follows it, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_migration_mid_run() {
    let mut cluster = blocking(Cluster::start);
    let names = one_stream_per_primary(&mut cluster, "mig");
    let mut run = Run::start(cluster, &names, &["d1"], "max_block_read = 4", SLOW).await;
    run.push(0, 300).await;
    run.wait_progress(100).await;

    let stream = names[0].clone();
    let slot = fred::util::redis_keyslot(stream.as_bytes());
    let from = run.cluster.owner_of(&stream);
    let to = run.cluster.owner_of(&names[1]);
    blocking(|| run.cluster.migrate_slot(slot, to));
    assert_eq!(
        run.cluster.owner_of(&stream),
        to,
        "slot {slot} moved from {from}"
    );

    run.push(300, 400).await;
    run.wait_complete().await;
    run.assert_running();
}

/// The dead-letter write both ways. `{orders}` with DLQ `{orders}:dlq` (same slot): written
/// by one script (EVAL/EVALSHA on the owner), no warning. `payments` with DLQ
/// `payments:dlq` (different slots): DLQ entry then ack, and one warning at start naming the
/// stream and both slots. Either way every poison entry is dead-lettered exactly once and
/// nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dlq_same_slot_atomic_and_cross_slot_warned_once() {
    let cluster = blocking(Cluster::start);
    let names = ["{orders}".to_owned(), "payments".to_owned()];
    let slot = |k: &str| fred::util::redis_keyslot(k.as_bytes());
    assert_eq!(slot("{orders}"), slot("{orders}:dlq"));
    let (pay, pay_dlq) = (slot("payments"), slot("payments:dlq"));
    assert_ne!(pay, pay_dlq);

    let mut run = Run::start(cluster, &names, &["d1"], "max_block_read = 4", SLOW).await;
    // 200 entries each, every 100th poison: 2 dead-lettered per stream.
    run.push(0, 200).await;
    run.wait_complete().await;
    let p = problems(&run.c, &run.watched, GROUP, &run.done, &run.pushed, true).await;
    assert!(p.is_empty(), "{p:#?}");
    for w in &run.watched {
        let dead = dlq_sources(&run.c, &w.dlq).await.expect("dlq");
        assert_eq!(dead.len(), 2, "{}: {dead:?}", w.dlq);
    }

    let orders_owner = run.cluster.owner_of("{orders}");
    let scripts: u64 = ["eval", "evalsha", "fcall"]
        .iter()
        .filter_map(|c| command_calls(orders_owner, c))
        .sum();
    assert!(
        scripts >= 2,
        "no script ran on {{orders}}'s primary (port {orders_owner}) for the DLQ writes"
    );

    let log = run.daemons[0].log();
    let (a, b) = (pay.to_string(), pay_dlq.to_string());
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("payments") && l.contains(&a) && l.contains(&b)
        })
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning naming payments and slots {a} and {b}:\n{log}"
    );
    let about_orders = log
        .lines()
        // Dead-letters are logged at WARN too: only the slot warning counts here.
        .filter(|l| l.contains("WARN") && l.contains("{orders}") && l.contains("slot"))
        .count();
    assert_eq!(
        about_orders, 0,
        "no warning for the co-located stream:\n{log}"
    );
    run.assert_running();
    operator_commands_work_on_the_cluster(&run).await;
}

/// The operator commands (issue 13) against the same Cluster, with the daemon's config:
/// `status`, `dlq ls`, and `dlq replay` both ways (the DLQ in its stream's slot: one
/// script; in another slot: the two-step move).
async fn operator_commands_work_on_the_cluster(run: &Run) {
    let cfg = run.daemons[0].config_path.to_string_lossy().into_owned();
    let cli = |args: &[&str]| {
        let mut all = vec!["-c", cfg.as_str()];
        all.extend_from_slice(args);
        run_cli(&all, &[], LONG)
    };
    let status = cli(&["status", "--json"]);
    assert_eq!(status.code(), Some(0), "{status}");
    for name in ["{orders}", "payments"] {
        assert!(
            status.stdout.contains(name),
            "status lacks {name}: {status}"
        );
    }
    let ls = cli(&["dlq", "ls", "--json"]);
    assert_eq!(ls.code(), Some(0), "{ls}");
    assert_eq!(ls.stdout.lines().count(), 4, "{ls}");
    for (stream, dlq) in [("{orders}", "{orders}:dlq"), ("payments", "payments:dlq")] {
        let replay = cli(&[
            "dlq", "replay", "--all", "--yes", "--rate", "0", "--stream", stream,
        ]);
        assert_eq!(replay.code(), Some(0), "{replay}");
        assert!(replay.stdout.contains("replayed 2 entries"), "{replay}");
        let audit = run.c.xrange_all(&format!("{dlq}:audit")).await;
        assert_eq!(audit.len(), 1, "{dlq}:audit");
        let back = run
            .c
            .xrange_all(stream)
            .await
            .into_iter()
            .filter(|e| e.get("redis_streamd_replays").is_some())
            .count();
        assert_eq!(back, 2, "{stream}: replayed entries in the source stream");
    }
}

/// Calls of `command` on the node on `port` (INFO commandstats), None when never called.
fn command_calls(port: u16, command: &str) -> Option<u64> {
    let v = resp::info_field(port, "commandstats", &format!("cmdstat_{command}"))?;
    v.split(',')
        .find_map(|kv| kv.strip_prefix("calls="))?
        .parse()
        .ok()
}
