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
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handler::{self, HandlerCommand, LineSplitter, Outcome, Report, StderrTail};
use crate::reaper::{self, OwnChild};

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
    fn finish(self, outcome: Outcome, stderr_tail: Vec<u8>, started: Instant) {
        (self.done)(Report {
            outcome,
            stderr_tail,
            elapsed: started.elapsed(),
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
    queue: Mutex<VecDeque<Job>>,
    /// Wakes an idle driver: a job was queued.
    queued: Notify,
    /// Drivers waiting for a job.
    idle: AtomicUsize,
    /// Worker deaths since any worker of the pool last answered: a crash loop shows here
    /// even when the deaths are spread over several workers.
    deaths_in_a_row: AtomicU32,
    /// Set by [`WorkerPool::shutdown`]: take no new jobs, finish those in hand, stop.
    stopping: CancellationToken,
    /// The daemon's abort (second signal or shutdown_timeout): stop handling at once.
    abort: CancellationToken,
}

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
        let shared = Arc::new(PoolShared {
            cmd,
            who,
            prefetch: prefetch.max(1),
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

    /// Queues an entry for the next free worker.
    pub fn submit(&self, job: Job) {
        if self.shared.stopping.is_cancelled() {
            job.finish(Outcome::Aborted, Vec::new(), Instant::now());
            return;
        }
        lock(&self.shared.queue).push_back(job);
        self.shared.queued.notify_one();
    }

    /// Stops taking entries, lets every worker finish the ones in hand (unless the abort
    /// token fires), then stops the workers: end of file on stdin, then SIGTERM/SIGKILL to
    /// the process group if one has not exited within `kill_grace`. Entries still queued
    /// are reported `Aborted`: they stay pending for the next start.
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
            job.finish(Outcome::Aborted, Vec::new(), Instant::now());
        }
    }
}

impl PoolShared {
    /// Moves queued jobs into `hand`. A driver with nothing in hand takes one; one that
    /// is busy takes up to `prefetch` in all, but only while no other driver is idle (an
    /// idle worker runs the entry sooner than a busy one). Returns whether it took any.
    fn take_into(&self, hand: &mut VecDeque<Job>) -> bool {
        if self.stopping.is_cancelled() {
            return false;
        }
        let limit = if self.idle.load(Ordering::Relaxed) == 0 {
            self.prefetch
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
                continue;
            }
            self.exchange().await;
        }
        if let Some(worker) = self.worker.take() {
            tracing::debug!(stream = %self.pool.who.stream, worker = self.index, "stopping worker");
            worker.stop(self.pool.cmd.kill_grace, true).await;
        }
    }

    /// Waits until a job is in hand. `false`: the pool is stopping.
    async fn wait_for_job(&mut self) -> bool {
        let pool = self.pool.clone();
        loop {
            if pool.stopping.is_cancelled() || pool.abort.is_cancelled() {
                return false;
            }
            let notified = pool.queued.notified();
            tokio::pin!(notified);
            // Registered before looking at the queue, so a job queued in between wakes us.
            notified.as_mut().enable();
            if pool.take_into(&mut self.hand) {
                return true;
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
                        Instant::now(),
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
        // Request bytes not yet written, and how many jobs of `hand` they cover.
        let mut out: Vec<u8> = Vec::new();
        let mut out_pos = 0usize;
        let mut encoded = 0usize;
        let mut stdin_open = true;
        let mut started = Instant::now();
        worker.turn_of(self.hand.front());
        let broken = loop {
            while let Some(job) = self.hand.get(encoded) {
                job.encode(&mut out);
                encoded += 1;
            }
            if self.hand.is_empty() {
                return;
            }
            let deadline = started + pool.cmd.timeout;
            worker.replies.reserve(READ_CHUNK);
            let Worker {
                stdin,
                stdout,
                replies,
                ..
            } = &mut *worker;
            let event = tokio::select! {
                biased;
                _ = pool.abort.cancelled() => Err(Broken::Aborted),
                read = stdout.read_buf(replies) => match read {
                    Ok(0) | Err(_) => Err(Broken::Gone),
                    Ok(_) => Ok(true),
                },
                written = stdin.write(out.get(out_pos..).unwrap_or_default()), if stdin_open && out_pos < out.len() => {
                    match written {
                        Ok(n) if n > 0 => {
                            out_pos += n;
                            if out_pos >= out.len() {
                                out.clear();
                                out_pos = 0;
                            }
                        }
                        // Its stdin is closed: it is exiting, and its stdout says how.
                        _ => stdin_open = false,
                    }
                    Ok(false)
                }
                _ = tokio::time::sleep_until(deadline.into()) => Err(Broken::TimedOut),
            };
            match event {
                Ok(false) => {}
                Ok(true) => {
                    let answered = settle_replies(worker, &mut self.hand, &mut started);
                    encoded -= answered.count;
                    if answered.count > 0 {
                        self.deaths = 0;
                        pool.deaths_in_a_row.store(0, Ordering::Relaxed);
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
                    job.finish(Outcome::Aborted, Vec::new(), started);
                }
                return;
            }
            Broken::Gone => gone("worker exited".to_owned()),
            Broken::Protocol(message) => gone(format!("worker protocol error: {message}")),
            Broken::TimedOut => Outcome::TimedOut(self.pool.cmd.timeout),
        };
        self.died(&outcome.reason());
        let stderr = std::mem::take(&mut *lock(&tail)).into_vec();
        if let Some(job) = self.hand.pop_front() {
            job.finish(outcome, stderr, started);
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
        job.finish(outcome, stderr, *started);
        *started = Instant::now();
        worker.turn_of(hand.front());
    }
    worker.replies.drain(..consumed);
    if result.is_ok() && worker.replies.len() > MAX_REPLY_BYTES {
        result = Err(Broken::Protocol(format!(
            "reply line longer than {MAX_REPLY_BYTES} bytes"
        )));
    }
    Answered { count, result }
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
