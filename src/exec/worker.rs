//! Long-running handlers (`mode = "worker"`): a pool of processes per stream, fed entries
//! over a line-and-length protocol on stdin/stdout.
//!
//! Spawning a process per entry caps throughput at what fork+exec allows; a worker pays
//! that once. The pool has `max_block_read` workers, each driven by one task of its own
//! (its *driver*), which owns the process, writes requests and reads replies.
//!
//! Entries reach the pool through one queue per stream. An idle driver takes the next
//! entry at once. A busy driver may take more, up to `worker_prefetch` entries in hand, but
//! only while no driver is idle: then the extra requests are written to its worker's stdin
//! ahead of time (pipelined), so a fast worker never waits for the daemon between entries
//! and the daemon handles replies in batches. A slow worker does not collect a queue while
//! another worker is free.
//!
//! # Protocol (version 1)
//!
//! For each entry the daemon writes to the worker's stdin a header line, the payload, and
//! a newline:
//!
//! ```text
//! <id> <attempt> <payload length in bytes>\n
//! <payload bytes>\n
//! ```
//!
//! and reads one reply line per request from its stdout, in request order:
//!
//! ```text
//! ok\n                 success: the entry is acked
//! fail <reason>\n      a failed attempt (retried, then dead-lettered)
//! dlq <reason>\n       never retry: straight to the dead-letter stream
//! ```
//!
//! The next request may already be in the pipe before the reply to the current one is
//! written; a worker that reads one request, replies, and reads the next is correct.
//! stdout carries nothing but replies; stderr is logged. End of file on stdin means "exit
//! now". Anything else on stdout, a reply line over 64 KiB, the worker exiting, or no reply
//! within `handler_timeout` (counted from when the entry's turn came: the previous reply)
//! fails that entry's attempt and the worker is replaced (its process group is killed);
//! the entries queued behind it go back to the pool without costing an attempt. Restarts
//! back off exponentially (100 ms up to 30 s) while a worker keeps dying, so a worker that
//! crashes at start never spins the CPU.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::exec::handler::{self, HandlerCommand, LineSplitter, Outcome, Report, StderrTail};
use crate::ops::reaper::{self, OwnChild};

/// Longest reply line accepted, newline included.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Room made in the reply buffer before each read from a worker's stdout.
const READ_CHUNK: usize = 16 * 1024;
/// First restart delay after a worker died; doubles per consecutive death.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// From this many deaths in a row in a pool (no answer in between) on, each restart is
/// logged as an error.
const CRASH_LOOP_DEATHS: u32 = 3;

/// Who the pool works for; becomes worker environment and log fields.
#[derive(Debug, Clone)]
pub struct PoolIdentity {
    pub stream: String,
    pub group: String,
    pub consumer: String,
}

/// One entry attempt for the pool.
pub struct Job {
    pub id: String,
    pub attempt: u64,
    pub payload: Bytes,
    /// Receives the attempt's report, exactly once (`Outcome::Aborted` when shutdown stopped
    /// it, or it never started). Called on a driver task, so it must not block.
    pub done: Box<dyn FnOnce(Report) + Send>,
}

impl Job {
    fn finish(self, outcome: Outcome, stderr_tail: Vec<u8>, elapsed: Duration) {
        (self.done)(Report {
            outcome,
            stderr_tail,
            elapsed,
        });
    }

    /// Appends this job's request frame to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        // Writing to a Vec cannot fail.
        let _ = writeln!(out, "{} {} {}", self.id, self.attempt, self.payload.len());
        out.extend_from_slice(&self.payload);
        out.push(b'\n');
    }
}

/// The workers of one stream, and the queue that feeds them.
pub struct WorkerPool {
    shared: Arc<PoolShared>,
    drivers: Mutex<Vec<JoinHandle<()>>>,
}

/// What the pool's drivers share.
struct PoolShared {
    cmd: HandlerCommand,
    who: PoolIdentity,
    /// Most entries a driver holds at once (the one being handled included).
    prefetch: usize,
    workers: usize,
    /// The consume loop's slots (entries this stream may have in flight): resized to
    /// `workers * depth` as the depth changes.
    slots: Arc<Semaphore>,
    /// How many entries a busy driver may hold now, `1..=prefetch` (see [`Budget`]).
    depth: AtomicUsize,
    /// Permits `slots` has in all (free or held), mirrored from `budget` for cheap reads.
    slot_count: AtomicUsize,
    budget: Mutex<Budget>,
    queue: Mutex<VecDeque<Job>>,
    /// Wakes an idle driver: a job was queued.
    queued: Notify,
    /// Drivers waiting for a job.
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

/// One worker position: the process when it runs, its restart state, and the jobs it
/// holds.
struct Driver {
    pool: Arc<PoolShared>,
    index: usize,
    worker: Option<Worker>,
    /// Consecutive deaths; reset when the worker answers.
    deaths: u32,
    not_before: Instant,
    /// Jobs taken, oldest first: the first is the one the worker is handling, the rest
    /// have been (or are being) written behind it.
    hand: VecDeque<Job>,
}

struct Worker {
    child: Child,
    /// Keeps the orphan reaper away from this child until it has been waited for.
    registration: OwnChild<'static>,
    pgid: Option<Pid>,
    stdin: ChildStdin,
    /// False once a write failed: the worker closed its stdin (it is exiting).
    stdin_open: bool,
    /// Request bytes not written yet; `written` of them are. Kept with the worker, not
    /// the exchange, so a frame is never cut short (a worker that replies before reading
    /// its request can end an exchange early).
    requests: Vec<u8>,
    written: usize,
    stdout: ChildStdout,
    /// Bytes read from stdout that are not a whole reply line yet.
    replies: Vec<u8>,
    tail: Arc<Mutex<StderrTail>>,
    /// The entry being handled, for stderr log lines.
    current: Arc<Mutex<Option<String>>>,
    stderr_task: JoinHandle<()>,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Fail(String),
    Dlq(String),
}

/// Why an exchange with a worker ended before every job in hand had its reply.
#[derive(Debug)]
enum Broken {
    /// The worker closed its stdout (it exited or is exiting).
    Gone,
    Protocol(String),
    TimedOut,
    Aborted,
}

impl WorkerPool {
    /// Starts one driver task per worker; the processes themselves start with the first
    /// entry. Must be called inside the runtime.
    pub fn new(
        cmd: HandlerCommand,
        who: PoolIdentity,
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
        let now = Instant::now();
        let drivers = (0..workers)
            .map(|index| {
                let driver = Driver {
                    pool: shared.clone(),
                    index,
                    worker: None,
                    deaths: 0,
                    not_before: now,
                    hand: VecDeque::new(),
                };
                // Boxed: an idle driver waits here, and its task is as large as its future.
                tokio::spawn(Box::pin(driver.run()))
            })
            .collect();
        WorkerPool {
            shared,
            drivers: Mutex::new(drivers),
        }
    }

    /// The stream's slots: how many entries may be in flight. Starts at one per worker
    /// and grows while workers answer fast (see [`Budget`]).
    pub fn slots(&self) -> Arc<Semaphore> {
        self.shared.slots.clone()
    }

    /// How many permits [`WorkerPool::slots`] has in all, free or held.
    pub fn slot_count(&self) -> usize {
        self.shared.slot_count.load(Ordering::Relaxed)
    }

    /// Queues an entry for the next free worker.
    pub fn submit(&self, job: Job) {
        if self.shared.stopping.is_cancelled() {
            job.finish(Outcome::Aborted, Vec::new(), Duration::ZERO);
            return;
        }
        lock(&self.shared.queue).push_back(job);
        self.shared.queued.notify_one();
    }

    /// Lets the workers finish every entry handed to the pool, the queued ones too (by
    /// design a few milliseconds of work, see [`Budget`]), unless the abort token fires;
    /// then stops the workers: end of file on stdin, then SIGTERM/SIGKILL to the process
    /// group if one has not exited within `kill_grace`. Entries no live worker could take
    /// are reported `Aborted`: they stay pending for the next start. Call after the last
    /// [`WorkerPool::submit`].
    pub async fn shutdown(&self) {
        self.shared.stopping.cancel();
        let drivers = std::mem::take(&mut *lock(&self.drivers));
        for driver in drivers {
            if let Err(error) = driver.await {
                tracing::error!(stream = %self.shared.who.stream, %error, "worker driver failed");
            }
        }
        let left: Vec<Job> = lock(&self.shared.queue).drain(..).collect();
        if !left.is_empty() {
            tracing::info!(stream = %self.shared.who.stream, entries = left.len(), "entries not started by a worker stay pending");
        }
        for job in left {
            job.finish(Outcome::Aborted, Vec::new(), Duration::ZERO);
        }
    }
}

impl PoolShared {
    /// Moves queued jobs into `hand`: up to the current depth (see [`Budget`]) while no
    /// other driver is idle, otherwise one, and only into an empty hand (an idle worker
    /// runs an entry sooner than a busy one's pipe). Returns whether it took any.
    fn take_into(&self, hand: &mut VecDeque<Job>) -> bool {
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
                Some(job) => hand.push_back(job),
                None => break,
            }
        }
        let left = !queue.is_empty();
        drop(queue);
        let took = hand.len() > before;
        if took && left {
            // Pass the rest on: one notification may stand for several queued jobs.
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
    fn requeue(&self, hand: &mut VecDeque<Job>) {
        if hand.is_empty() {
            return;
        }
        let mut queue = lock(&self.queue);
        while let Some(job) = hand.pop_back() {
            queue.push_front(job);
        }
        drop(queue);
        self.queued.notify_one();
    }

    fn spawn(&self, index: usize) -> std::io::Result<Worker> {
        let Some((program, args)) = self.cmd.argv.split_first() else {
            return Err(std::io::Error::other("empty handler argv"));
        };
        let mut command = handler::base_command(
            program,
            args,
            &self.cmd,
            &self.who.stream,
            &self.who.group,
            &self.who.consumer,
        );
        command
            .env("REDIS_STREAMD_WORKER", index.to_string())
            .env("REDIS_STREAMD_PROTOCOL", "1");
        let (mut child, registration) = reaper::own_children().spawn(&mut command)?;
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            handler::signal_group(pgid, Signal::SIGKILL);
            return Err(std::io::Error::other("worker pipes missing"));
        };
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let current = Arc::new(Mutex::new(None));
        let stderr_task = tokio::spawn(log_stderr(
            stderr,
            self.who.stream.clone(),
            index,
            tail.clone(),
            current.clone(),
        ));
        tracing::info!(stream = %self.who.stream, worker = index, pid = pgid.map(Pid::as_raw), "worker started");
        Ok(Worker {
            child,
            registration,
            pgid,
            stdin,
            stdin_open: true,
            requests: Vec::new(),
            written: 0,
            stdout,
            replies: Vec::new(),
            tail,
            current,
            stderr_task,
        })
    }
}

impl Driver {
    async fn run(mut self) {
        loop {
            if self.hand.is_empty() && !self.wait_for_job().await {
                break;
            }
            if !self.ensure_worker().await {
                if self.pool.stopping.is_cancelled() {
                    // No worker to finish with; live ones take what is queued.
                    break;
                }
                continue;
            }
            self.exchange().await;
        }
        if let Some(worker) = self.worker.take() {
            tracing::debug!(stream = %self.pool.who.stream, worker = self.index, "stopping worker");
            worker.stop(self.pool.cmd.kill_grace, true).await;
        }
    }

    /// Waits until a job is in hand. `false`: the pool is stopping and its queue is empty,
    /// or shutdown is aborting.
    async fn wait_for_job(&mut self) -> bool {
        let pool = self.pool.clone();
        loop {
            if pool.abort.is_cancelled() {
                return false;
            }
            let notified = pool.queued.notified();
            tokio::pin!(notified);
            // Registered before looking at the queue, so a job queued in between wakes us.
            notified.as_mut().enable();
            if pool.take_into(&mut self.hand) {
                return true;
            }
            if pool.stopping.is_cancelled() {
                return false;
            }
            pool.idle.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = notified => {}
                _ = pool.stopping.cancelled() => {}
                _ = pool.abort.cancelled() => {}
            }
            pool.idle.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Makes sure a worker runs, starting one if the restart backoff allows. `false`: no
    /// worker now; the jobs in hand were handed back (or the first one failed to start).
    async fn ensure_worker(&mut self) -> bool {
        self.reap_if_exited().await;
        if self.worker.is_some() {
            return true;
        }
        let wait = self.not_before.saturating_duration_since(Instant::now());
        if !wait.is_zero() || self.pool.abort.is_cancelled() {
            // Other workers may run them meanwhile.
            self.pool.requeue(&mut self.hand);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.pool.stopping.cancelled() => {}
                _ = self.pool.abort.cancelled() => {}
            }
            return false;
        }
        match self.pool.spawn(self.index) {
            Ok(worker) => {
                self.worker = Some(worker);
                true
            }
            Err(error) => {
                self.died("could not be started");
                if let Some(job) = self.hand.pop_front() {
                    job.finish(
                        Outcome::SpawnFailed(error.to_string()),
                        Vec::new(),
                        Duration::ZERO,
                    );
                }
                self.pool.requeue(&mut self.hand);
                false
            }
        }
    }

    /// Writes the jobs in hand (and those taken meanwhile) and settles them as their
    /// replies come, until nothing is in hand or the worker breaks.
    async fn exchange(&mut self) {
        let pool = self.pool.clone();
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        // How many jobs at the front of `hand` have their requests in `worker.requests`.
        let mut encoded = 0usize;
        let mut started = Instant::now();
        worker.turn_of(self.hand.front());
        let mut deadline = started + pool.cmd.timeout;
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        let broken = loop {
            while let Some(job) = self.hand.get(encoded) {
                job.encode(&mut worker.requests);
                encoded += 1;
            }
            if self.hand.is_empty() {
                return;
            }
            if started + pool.cmd.timeout != deadline {
                deadline = started + pool.cmd.timeout;
                timer.as_mut().reset(deadline.into());
            }
            worker.replies.reserve(READ_CHUNK);
            let Worker {
                stdin,
                stdin_open,
                stdout,
                replies,
                requests,
                written,
                ..
            } = &mut *worker;
            let event = tokio::select! {
                biased;
                _ = pool.abort.cancelled() => Err(Broken::Aborted),
                read = stdout.read_buf(replies) => match read {
                    Ok(0) | Err(_) => Err(Broken::Gone),
                    Ok(_) => Ok(true),
                },
                n = stdin.write(requests.get(*written..).unwrap_or_default()), if *stdin_open && *written < requests.len() => {
                    match n {
                        Ok(n) if n > 0 => {
                            *written += n;
                            if *written >= requests.len() {
                                requests.clear();
                                *written = 0;
                            }
                        }
                        // Its stdin is closed: it is exiting, and its stdout says how.
                        _ => *stdin_open = false,
                    }
                    Ok(false)
                }
                _ = &mut timer => Err(Broken::TimedOut),
            };
            match event {
                Ok(false) => {}
                Ok(true) => {
                    let answered = settle_replies(worker, &mut self.hand, &mut started);
                    encoded -= answered.count;
                    if answered.count > 0 {
                        self.deaths = 0;
                        pool.deaths_in_a_row.store(0, Ordering::Relaxed);
                        pool.observe(answered.count, answered.busy);
                    }
                    if let Err(broken) = answered.result {
                        break broken;
                    }
                    if pool.take_into(&mut self.hand) && encoded == 0 {
                        worker.turn_of(self.hand.front());
                    }
                }
                Err(broken) => break broken,
            }
        };
        self.broke(broken, started).await;
    }

    /// The worker failed the job it was handling (or shutdown aborted everything): it is
    /// replaced, whatever state it is in, and the jobs behind that one go back to the pool.
    async fn broke(&mut self, broken: Broken, started: Instant) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let tail = worker.tail.clone();
        let status = worker.stop(self.pool.cmd.kill_grace, false).await;
        let gone = |what: String| match status {
            Some(status) => {
                Outcome::WorkerLost(format!("{what} ({})", handler::outcome_of(status).reason()))
            }
            None => Outcome::WorkerLost(what),
        };
        let outcome = match broken {
            Broken::Aborted => {
                for job in self.hand.drain(..) {
                    job.finish(Outcome::Aborted, Vec::new(), started.elapsed());
                }
                return;
            }
            Broken::Gone => gone("worker exited".to_owned()),
            Broken::Protocol(message) => gone(format!("worker protocol error: {message}")),
            Broken::TimedOut => Outcome::TimedOut(self.pool.cmd.timeout),
        };
        self.died(&outcome.reason());
        let stderr = std::mem::take(&mut *lock(&tail)).into_vec();
        let elapsed = started.elapsed();
        if matches!(outcome, Outcome::TimedOut(_)) {
            self.pool.observe(1, elapsed);
        }
        if let Some(job) = self.hand.pop_front() {
            job.finish(outcome, stderr, elapsed);
        }
        self.pool.requeue(&mut self.hand);
    }

    /// A worker that exited while idle is replaced before it is given an entry, so the
    /// entry does not pay for it.
    async fn reap_if_exited(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        if let Ok(Some(status)) = worker.child.try_wait() {
            let reason = handler::outcome_of(status).reason();
            if let Some(worker) = self.worker.take() {
                worker.stop(self.pool.cmd.kill_grace, false).await;
            }
            self.died(&format!("exited while idle ({reason})"));
        }
    }

    fn died(&mut self, why: &str) {
        self.deaths = self.deaths.saturating_add(1);
        let doublings = self.deaths.saturating_sub(1).min(16);
        let delay = RESTART_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(RESTART_BACKOFF_MAX);
        self.not_before = Instant::now() + delay;
        let stream = &self.pool.who.stream;
        let in_a_row = self
            .pool
            .deaths_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if in_a_row >= CRASH_LOOP_DEATHS {
            tracing::error!(%stream, worker = self.index, deaths = in_a_row, %why, restart_in = ?delay, "worker keeps dying; restarting with backoff");
        } else {
            tracing::warn!(%stream, worker = self.index, %why, restart_in = ?delay, "worker lost; it will be restarted");
        }
    }
}

/// What [`settle_replies`] did.
struct Answered {
    /// Jobs settled (taken off the front of the hand).
    count: usize,
    /// Their handling times, summed.
    busy: Duration,
    result: Result<(), Broken>,
}

/// Settles one job per complete reply line in `worker.replies`, in order. A reply that
/// cannot be parsed leaves its job at the front of `hand` and breaks the exchange.
fn settle_replies(
    worker: &mut Worker,
    hand: &mut VecDeque<Job>,
    started: &mut Instant,
) -> Answered {
    let mut count = 0;
    let mut busy = Duration::ZERO;
    let mut consumed = 0;
    let mut result = Ok(());
    while let Some(end) = worker
        .replies
        .get(consumed..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        let line = worker
            .replies
            .get(consumed..=consumed + end)
            .unwrap_or_default();
        consumed += end + 1;
        let Some(job) = hand.pop_front() else {
            result = Err(Broken::Protocol(
                "a reply with no request outstanding".to_owned(),
            ));
            break;
        };
        let outcome = match parse_reply(line) {
            Ok(Reply::Ok) => Outcome::Success,
            Ok(Reply::Fail(reason)) => Outcome::Failed(reason),
            Ok(Reply::Dlq(reason)) => Outcome::Rejected(reason),
            Err(message) => {
                hand.push_front(job);
                result = Err(Broken::Protocol(message));
                break;
            }
        };
        let stderr = if outcome == Outcome::Success {
            Vec::new()
        } else {
            std::mem::take(&mut *lock(&worker.tail)).into_vec()
        };
        count += 1;
        let now = Instant::now();
        let took = now.saturating_duration_since(*started);
        busy += took;
        job.finish(outcome, stderr, took);
        *started = now;
        worker.turn_of(hand.front());
    }
    worker.replies.drain(..consumed);
    if result.is_ok() && worker.replies.len() > MAX_REPLY_BYTES {
        result = Err(Broken::Protocol(format!(
            "reply line longer than {MAX_REPLY_BYTES} bytes"
        )));
    }
    Answered {
        count,
        busy,
        result,
    }
}

impl Worker {
    /// `job` is now the one the worker is handling: stderr lines name it, and the stderr
    /// tail kept for the DLQ starts afresh.
    fn turn_of(&self, job: Option<&Job>) {
        let mut current = lock(&self.current);
        match (current.as_mut(), job) {
            (Some(id), Some(job)) => id.clone_from(&job.id),
            (None, Some(job)) => *current = Some(job.id.clone()),
            (_, None) => *current = None,
        }
        drop(current);
        *lock(&self.tail) = StderrTail::default();
    }

    /// Ends the worker and reaps it. `polite`: close stdin first and give it `grace` to
    /// exit on its own (shutdown); otherwise SIGTERM at once (it failed an entry).
    /// Returns its exit status when known.
    async fn stop(mut self, grace: Duration, polite: bool) -> Option<std::process::ExitStatus> {
        drop(self.stdin);
        if !polite {
            handler::terminate(self.pgid);
        }
        let mut status = tokio::time::timeout(grace, self.child.wait()).await;
        if polite && status.is_err() {
            handler::terminate(self.pgid);
            status = tokio::time::timeout(grace, self.child.wait()).await;
        }
        let status = match status {
            Ok(Ok(status)) => Some(status),
            _ => {
                handler::signal_group(self.pgid, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        drop(self.registration);
        // Whatever it left in its group goes with it.
        handler::signal_group(self.pgid, Signal::SIGKILL);
        if tokio::time::timeout(Duration::from_millis(200), &mut self.stderr_task)
            .await
            .is_err()
        {
            self.stderr_task.abort();
        }
        status
    }
}

/// Parses a reply line (with its newline).
pub fn parse_reply(line: &[u8]) -> Result<Reply, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| "reply is not UTF-8".to_owned())?;
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    let reason = |default: &str| {
        let rest = rest.trim();
        if rest.is_empty() {
            default.to_owned()
        } else {
            rest.to_owned()
        }
    };
    match verb {
        "ok" => Ok(Reply::Ok),
        "fail" => Ok(Reply::Fail(reason("worker reported failure"))),
        "dlq" => Ok(Reply::Dlq(reason("worker rejected the entry"))),
        _ => {
            let mut shown: String = text.chars().take(80).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            Err(format!("unexpected reply {shown:?}"))
        }
    }
}

async fn log_stderr(
    mut pipe: tokio::process::ChildStderr,
    stream: String,
    index: usize,
    tail: Arc<Mutex<StderrTail>>,
    current: Arc<Mutex<Option<String>>>,
) {
    let mut buf = vec![0u8; 8192];
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| {
        let id = lock(&current).clone().unwrap_or_default();
        let text = String::from_utf8_lossy(line);
        tracing::info!(%stream, worker = index, %id, output = "stderr", "{}", text.trim_end());
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default();
                lock(&tail).push(chunk);
                lines.push(chunk, &mut emit);
            }
        }
    }
    lines.finish(&mut emit);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let who = PoolIdentity {
            stream: "s".into(),
            group: "g".into(),
            consumer: "c".into(),
        };
        WorkerPool::new(cmd, who, workers, prefetch, abort)
    }

    /// Submits one job per payload; their reports arrive on the receiver as (id, outcome).
    fn submit_all(
        pool: &WorkerPool,
        payloads: &[(String, &'static [u8])],
        reports: &mpsc::UnboundedSender<(String, Outcome)>,
    ) {
        for (id, payload) in payloads {
            let (tx, id2) = (reports.clone(), id.clone());
            pool.submit(Job {
                id: id.clone(),
                attempt: 1,
                payload: Bytes::from_static(payload),
                done: Box::new(move |report| {
                    let _ = tx.send((id2, report.outcome));
                }),
            });
        }
    }

    async fn collect(
        rx: &mut mpsc::UnboundedReceiver<(String, Outcome)>,
        n: usize,
    ) -> Vec<(String, Outcome)> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(DEADLINE, rx.recv()).await {
                Ok(Some(report)) => got.push(report),
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

        // Answers in well under a millisecond: the pool takes entries ahead.
        submit_all(&pool, &ids("warm", 300), &tx);
        let warm = collect(&mut rx, 300).await;
        assert_all(&warm, &Outcome::Success);
        assert!(
            pool.slot_count() > 1,
            "slots did not grow: {}",
            pool.slot_count()
        );

        // `die` with entries written behind it: only `die` fails; the others are handed to
        // the restarted worker and succeed, each run exactly once.
        let mut batch = vec![("die".to_owned(), &b"die"[..])];
        batch.extend(ids("after", 20));
        submit_all(&pool, &batch, &tx);
        let got = collect(&mut rx, 21).await;
        let (die, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|(id, _)| id == "die");
        assert_eq!(
            die,
            vec![(
                "die".to_owned(),
                Outcome::WorkerLost("worker exited (exit code 3)".into())
            )]
        );
        assert_eq!(rest.len(), 20);
        assert_all(&rest, &Outcome::Success);
        pool.shutdown().await;
        assert!(rx.try_recv().is_err(), "a job was reported twice");

        let seen = std::fs::read_to_string(&out).expect("worker output");
        let die_line = seen
            .lines()
            .find(|l| l.starts_with("die "))
            .expect("die was seen");
        assert_ne!(
            die_line, "die 0",
            "nothing was written behind `die`: {seen}"
        );
        for i in 0..20 {
            let n = seen
                .lines()
                .filter(|l| l.starts_with(&format!("after-{i} ")))
                .count();
            assert_eq!(n, 1, "after-{i} handled {n} times:\n{seen}");
        }
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

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"ok\n"), Ok(Reply::Ok));
        assert_eq!(parse_reply(b"ok\r\n"), Ok(Reply::Ok));
        assert_eq!(
            parse_reply(b"fail disk full\n"),
            Ok(Reply::Fail("disk full".into()))
        );
        assert_eq!(
            parse_reply(b"fail\n"),
            Ok(Reply::Fail("worker reported failure".into()))
        );
        assert_eq!(
            parse_reply(b"dlq bad json\n"),
            Ok(Reply::Dlq("bad json".into()))
        );
        assert!(parse_reply(b"OK\n").is_err());
        assert!(parse_reply(b"\n").is_err());
        assert!(parse_reply(&[0xff, b'\n']).is_err());
    }
}
