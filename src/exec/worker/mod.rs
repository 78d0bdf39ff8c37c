//! Long-running handlers (`mode = "worker"`): a pool of processes per stream, fed entries
//! over a line-and-length protocol on stdin/stdout (`protocol`).
//!
//! Spawning a process per entry caps throughput at what fork+exec allows; a worker pays
//! that once. The pool has `max_block_read` workers, each driven by one task of its own
//! (its *driver*, see `driver`), which owns the process, writes requests and reads
//! replies.
//!
//! Entries reach the pool through one queue per stream. An idle driver takes the next
//! entry at once. A busy driver may take more, up to `worker_prefetch` entries in hand, but
//! only while no driver is idle: then the extra requests are written to its worker's stdin
//! ahead of time (pipelined), so a fast worker never waits for the daemon between entries
//! and the daemon handles replies in batches. A slow worker does not collect a queue while
//! another worker is free. How many entries a busy worker may hold follows the workers'
//! measured speed ([`Budget`]), and the pool sizes the stream's read slots to match.
//!
//! Anything but a reply on stdout, a reply line over 64 KiB, the worker exiting, or no
//! reply within `handler_timeout` (counted from when the entry's turn came: the previous
//! reply) fails that entry's attempt and the worker is replaced (its process group is
//! killed); the entries queued behind it go back to the pool without costing an attempt.
//! Restarts back off exponentially (100 ms up to 30 s) while a worker keeps dying, so a
//! worker that crashes at start never spins the CPU.

mod driver;
mod protocol;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::exec::output::lock;
use crate::exec::process::HandlerCommand;
use crate::exec::{Outcome, Report, Ticket};
use crate::identity::Consumer;
use driver::Driver;

/// One entry for the pool: its ticket (slot and `Done`) and its payload.
struct Work {
    ticket: Ticket,
    payload: Bytes,
}

impl Work {
    fn finish(self, outcome: Outcome, stderr_tail: Vec<u8>, elapsed: Duration) {
        self.ticket
            .finish(Report::new(outcome, stderr_tail, elapsed));
    }

    /// Appends this entry's request frame to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        protocol::encode(self.ticket.id(), self.ticket.attempt(), &self.payload, out);
    }
}

/// The workers of one stream, and the queue that feeds them.
pub(crate) struct WorkerPool {
    shared: Arc<PoolShared>,
    drivers: Mutex<Vec<JoinHandle<()>>>,
}

/// What the pool's drivers share.
struct PoolShared {
    cmd: HandlerCommand,
    who: Consumer,
    /// Most entries a driver holds at once (the one being handled included).
    prefetch: usize,
    workers: usize,
    /// The stream's read slots (entries it may have in flight): resized to
    /// `workers * depth` as the depth changes.
    slots: Arc<Semaphore>,
    /// How many entries a busy driver may hold now, `1..=prefetch` (see [`Budget`]).
    depth: AtomicUsize,
    /// Permits `slots` has in all (free or held), mirrored from `budget` for cheap reads.
    slot_count: AtomicUsize,
    budget: Mutex<Budget>,
    queue: Mutex<VecDeque<Work>>,
    /// Wakes an idle driver: an entry was queued.
    queued: Notify,
    /// Drivers waiting for an entry.
    idle: AtomicUsize,
    /// Worker deaths since any worker of the pool last answered: a crash loop shows here
    /// even when the deaths are spread over several workers.
    deaths_in_a_row: AtomicU32,
    /// Set by [`WorkerPool::shutdown`]: finish what is queued, then stop.
    stopping: CancellationToken,
    /// The daemon's abort (second signal or shutdown_timeout): stop handling at once.
    abort: CancellationToken,
}

/// How many entries the pool takes ahead of its workers. A worker that answers in
/// microseconds needs several requests in its pipe to never wait for the daemon; one that
/// takes seconds should hold nothing back from other consumers. So the depth follows the
/// workers' measured time per entry: entries waiting behind the one being handled add up
/// to at most about [`PREFETCH_WINDOW`] of work, and never more than `worker_prefetch`.
struct Budget {
    /// Moving average of the time a worker takes per entry.
    service: Duration,
    /// Permits `slots` has in all (free or held).
    slots: usize,
}

/// Work a worker may have waiting behind the entry it handles (see [`Budget`]).
const PREFETCH_WINDOW: Duration = Duration::from_millis(5);

impl WorkerPool {
    /// Starts one driver task per worker; the processes themselves start with the first
    /// entry. Must be called inside the runtime.
    pub(crate) fn new(
        cmd: HandlerCommand,
        who: Consumer,
        workers: usize,
        prefetch: usize,
        abort: CancellationToken,
    ) -> Self {
        // Until the workers have answered, assume they are slow: one entry each.
        let shared = Arc::new(PoolShared {
            cmd,
            who,
            prefetch: prefetch.max(1),
            workers,
            slots: Arc::new(Semaphore::new(workers)),
            depth: AtomicUsize::new(1),
            slot_count: AtomicUsize::new(workers),
            budget: Mutex::new(Budget {
                service: PREFETCH_WINDOW * 2,
                slots: workers,
            }),
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            idle: AtomicUsize::new(0),
            deaths_in_a_row: AtomicU32::new(0),
            stopping: CancellationToken::new(),
            abort,
        });
        let drivers = (0..workers)
            .map(|index| {
                let driver = Driver::new(shared.clone(), index);
                // Boxed: an idle driver waits here, and its task is as large as its future.
                // In the span of whoever built the pool (the stream's loop).
                tokio::spawn(Box::pin(driver.run()).in_current_span())
            })
            .collect();
        WorkerPool {
            shared,
            drivers: Mutex::new(drivers),
        }
    }

    /// The stream's slots: how many entries may be in flight. Starts at one per worker
    /// and grows while workers answer fast (see [`Budget`]).
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        self.shared.slots.clone()
    }

    /// How many permits [`WorkerPool::slots`] has in all, free or held.
    pub(crate) fn slot_count(&self) -> usize {
        self.shared.slot_count.load(Ordering::Relaxed)
    }

    /// Queues an entry for the next free worker.
    pub(crate) fn submit(&self, ticket: Ticket, payload: Bytes) {
        let work = Work { ticket, payload };
        if self.shared.stopping.is_cancelled() {
            work.finish(Outcome::Aborted, Vec::new(), Duration::ZERO);
            return;
        }
        lock(&self.shared.queue).push_back(work);
        self.shared.queued.notify_one();
    }

    /// Lets the workers finish every entry handed to the pool, the queued ones too (by
    /// design a few milliseconds of work, see [`Budget`]), unless the abort token fires;
    /// then stops the workers: end of file on stdin, then SIGTERM/SIGKILL to the process
    /// group if one has not exited within `kill_grace`. Entries no live worker could take
    /// are reported `Aborted`: they stay pending for the next start. Call after the last
    /// [`WorkerPool::submit`].
    pub(crate) async fn shutdown(&self) {
        self.shared.stopping.cancel();
        let drivers = std::mem::take(&mut *lock(&self.drivers));
        for driver in drivers {
            if let Err(error) = driver.await {
                tracing::error!(stream = %self.shared.who.stream, %error, "worker driver failed");
            }
        }
        let left: Vec<Work> = lock(&self.shared.queue).drain(..).collect();
        if !left.is_empty() {
            tracing::info!(stream = %self.shared.who.stream, entries = left.len(), "entries not started by a worker stay pending");
        }
        for work in left {
            work.finish(Outcome::Aborted, Vec::new(), Duration::ZERO);
        }
    }
}

impl PoolShared {
    /// Moves queued entries into `hand`: up to the current depth (see [`Budget`]) while no
    /// other driver is idle, otherwise one, and only into an empty hand (an idle worker
    /// runs an entry sooner than a busy one's pipe). Returns whether it took any.
    fn take_into(&self, hand: &mut VecDeque<Work>) -> bool {
        if self.abort.is_cancelled() {
            return false;
        }
        let limit = if self.idle.load(Ordering::Relaxed) == 0 {
            self.depth.load(Ordering::Relaxed)
        } else {
            1
        };
        if hand.len() >= limit {
            return false;
        }
        let mut queue = lock(&self.queue);
        let before = hand.len();
        while hand.len() < limit {
            match queue.pop_front() {
                Some(work) => hand.push_back(work),
                None => break,
            }
        }
        let left = !queue.is_empty();
        drop(queue);
        let took = hand.len() > before;
        if took && left {
            // Pass the rest on: one notification may stand for several queued entries.
            self.queued.notify_one();
        }
        took
    }

    /// Folds `answered` entries that took `busy` in all into the service time, and
    /// resizes the depth and the slots to match.
    fn observe(&self, answered: usize, busy: Duration) {
        let Ok(n) = u32::try_from(answered) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut budget = lock(&self.budget);
        budget.service = (budget.service * 7 + busy / n) / 8;
        let ahead = PREFETCH_WINDOW.as_nanos() / budget.service.as_nanos().max(1);
        let depth = usize::try_from(ahead)
            .unwrap_or(usize::MAX)
            .saturating_add(1)
            .min(self.prefetch);
        self.depth.store(depth, Ordering::Relaxed);
        let target = self.workers.saturating_mul(depth);
        if target > budget.slots {
            self.slots.add_permits(target - budget.slots);
            budget.slots = target;
        } else if target < budget.slots {
            // Only free permits can be taken away; the rest go on later calls.
            budget.slots -= self.slots.forget_permits(budget.slots - target);
        }
        self.slot_count.store(budget.slots, Ordering::Relaxed);
    }

    /// Puts `hand` back at the front of the queue, in order, for other workers.
    fn requeue(&self, hand: &mut VecDeque<Work>) {
        if hand.is_empty() {
            return;
        }
        let mut queue = lock(&self.queue);
        while let Some(work) = hand.pop_back() {
            queue.push_front(work);
        }
        drop(queue);
        self.queued.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{Done, Job};
    use std::path::Path;
    use tokio::sync::mpsc;

    /// Generous: the machine may be busy.
    const DEADLINE: Duration = Duration::from_secs(120);

    /// A python worker that parses requests from raw reads (no read-ahead of its own to
    /// hide what the daemon sent), appends `<id> <bytes already waiting behind it>` to
    /// `$OUT` for each, exits 3 on the payload `die`, and replies `ok` otherwise.
    const PY_WORKER: &str = r#"
import os
buf = b""
out = open(os.environ["OUT"], "a")
while True:
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    header, buf = buf.split(b"\n", 1)
    ident, attempt, length = header.split()
    while len(buf) < int(length) + 1:
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    payload, buf = buf[:int(length)], buf[int(length) + 1:]
    out.write("%s %d\n" % (ident.decode(), len(buf)))
    out.flush()
    if payload == b"die":
        os._exit(3)
    os.write(1, b"ok\n")
"#;

    fn pool(argv: &[&str], out: &Path, workers: usize, prefetch: usize) -> WorkerPool {
        pool_with_abort(argv, out, workers, prefetch, CancellationToken::new())
    }

    fn pool_with_abort(
        argv: &[&str],
        out: &Path,
        workers: usize,
        prefetch: usize,
        abort: CancellationToken,
    ) -> WorkerPool {
        let cmd = HandlerCommand {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: vec![("OUT".to_owned(), out.to_string_lossy().into_owned())],
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(5),
        };
        WorkerPool::new(cmd, Consumer::new("s", "g", "c"), workers, prefetch, abort)
    }

    /// Submits one job per payload; their `Done`s arrive on the receiver of `done`.
    fn submit_all(
        pool: &WorkerPool,
        payloads: &[(String, &'static [u8])],
        done: &mpsc::UnboundedSender<Done>,
    ) {
        // The tests submit more than the pool's slots allow: slots of their own.
        let slots = Arc::new(Semaphore::new(payloads.len()));
        for (id, payload) in payloads {
            let job = Job {
                id: id.clone(),
                attempt: 1,
                payload: Bytes::from_static(payload),
                slot: slots.clone().try_acquire_owned().expect("a slot"),
            };
            let (ticket, payload) = Ticket::new(job, done.clone());
            pool.submit(ticket, payload);
        }
    }

    async fn collect(rx: &mut mpsc::UnboundedReceiver<Done>, n: usize) -> Vec<(String, Outcome)> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(done)) => got.push((done.id, done.report.outcome)),
                other => panic!("{} of {n} reports, then {other:?}", got.len()),
            }
        }
        got
    }

    fn assert_all(got: &[(String, Outcome)], outcome: &Outcome) {
        assert!(got.iter().all(|(_, o)| o == outcome), "{got:?}");
    }

    async fn shutdown_in_time(pool: &WorkerPool) {
        tokio::time::timeout(DEADLINE, pool.shutdown())
            .await
            .expect("shutdown in time");
    }

    fn ids(prefix: &str, n: usize) -> Vec<(String, &'static [u8])> {
        (0..n)
            .map(|i| (format!("{prefix}-{i}"), &b"x"[..]))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_worker_gets_entries_ahead_and_a_death_costs_only_its_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("seen");
        let pool = pool(&["python3", "-c", PY_WORKER], &out, 1, 8);
        let (tx, mut rx) = mpsc::unbounded_channel();

        // A busy machine can make a fast worker look slow for a while, and then nothing is
        // written ahead: rounds repeat (with new ids) until one had entries behind `die`.
        let mut exercised = false;
        for round in 0..10 {
            // Answers in well under a millisecond: the pool takes entries ahead.
            submit_all(&pool, &ids(&format!("warm{round}"), 300), &tx);
            let warm = collect(&mut rx, 300).await;
            assert_all(&warm, &Outcome::Success);
            if pool.slot_count() <= 1 {
                continue;
            }
            // `die` with entries written behind it: only `die` fails; the others are
            // handed to the restarted worker and succeed, each run exactly once.
            let die = format!("die{round}");
            let mut batch = vec![(die.clone(), &b"die"[..])];
            batch.extend(ids(&format!("after{round}"), 20));
            submit_all(&pool, &batch, &tx);
            let got = collect(&mut rx, 21).await;
            let (died, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|(id, _)| *id == die);
            assert_eq!(
                died,
                vec![(
                    die.clone(),
                    Outcome::WorkerLost("worker exited (exit code 3)".into())
                )]
            );
            assert_eq!(rest.len(), 20);
            assert_all(&rest, &Outcome::Success);
            let seen = std::fs::read_to_string(&out).expect("worker output");
            for i in 0..20 {
                let n = seen
                    .lines()
                    .filter(|l| l.starts_with(&format!("after{round}-{i} ")))
                    .count();
                assert_eq!(n, 1, "after{round}-{i} handled {n} times:\n{seen}");
            }
            let die_line = seen
                .lines()
                .find(|l| l.starts_with(&format!("{die} ")))
                .expect("die was seen");
            if die_line != format!("{die} 0") {
                exercised = true;
                break;
            }
        }
        pool.shutdown().await;
        assert!(rx.try_recv().is_err(), "a job was reported twice");
        assert!(
            exercised,
            "in 10 rounds, nothing was ever written behind `die`"
        );
    }

    /// A graceful stop runs what the pool has taken, queued entries included: reading
    /// them again at the next start would cost them an attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_finishes_queued_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("seen");
        let pool = pool(&["python3", "-c", PY_WORKER], &out, 1, 8);
        let (tx, mut rx) = mpsc::unbounded_channel();
        submit_all(&pool, &ids("warm", 100), &tx);
        collect(&mut rx, 100).await;
        submit_all(&pool, &ids("last", 50), &tx);
        shutdown_in_time(&pool).await;
        let got = collect(&mut rx, 50).await;
        assert_all(&got, &Outcome::Success);
    }

    /// The abort (second signal, shutdown_timeout) does not wait for anything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_stops_workers_and_reports_every_entry_aborted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("seen");
        let abort = CancellationToken::new();
        let script = "while IFS=' ' read -r id attempt len; do sleep 1000; done";
        let pool = pool_with_abort(&["sh", "-c", script], &out, 2, 8, abort.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        submit_all(&pool, &ids("stuck", 5), &tx);
        abort.cancel();
        shutdown_in_time(&pool).await;
        let got = collect(&mut rx, 5).await;
        assert_all(&got, &Outcome::Aborted);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_workers_take_nothing_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("seen");
        let script = "while IFS=' ' read -r id attempt len; do \
                      dd bs=1 count=$((len + 1)) >/dev/null 2>&1; sleep 0.2; \
                      echo \"$REDIS_STREAMD_WORKER $id\" >> \"$OUT\"; echo ok; done";
        let pool = pool(&["sh", "-c", script], &out, 2, 8);
        let (tx, mut rx) = mpsc::unbounded_channel();
        submit_all(&pool, &ids("slow", 6), &tx);
        let got = collect(&mut rx, 6).await;
        assert_all(&got, &Outcome::Success);
        // 200 ms per entry is far over the prefetch window: one entry per worker.
        assert_eq!(pool.slot_count(), 2);
        let seen = std::fs::read_to_string(&out).expect("worker output");
        for worker in ["0 ", "1 "] {
            assert!(
                seen.lines().any(|l| l.starts_with(worker)),
                "worker {worker}had nothing to do:\n{seen}"
            );
        }
        pool.shutdown().await;
    }
}
