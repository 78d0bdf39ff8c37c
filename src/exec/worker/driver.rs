//! One worker position of the pool: its driver task owns the worker process (started,
//! restarted with backoff, stopped), writes the requests of the entries it holds and
//! settles them as their replies come.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::protocol::{self, MAX_REPLY_BYTES, Reply};
use super::{PoolShared, Work};
use crate::backoff::Backoff;
use crate::exec::Outcome;
use crate::exec::output::{self, Origin, StderrTail, lock};
use crate::exec::process::Process;

/// Room made in the reply buffer before each read from a worker's stdout.
const READ_CHUNK: usize = 16 * 1024;
/// Restart delays after a worker died: doubling per consecutive death.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// From this many deaths in a row in a pool (no answer in between) on, each restart is
/// logged as an error.
const CRASH_LOOP_DEATHS: u32 = 3;
/// How long a stopped worker's stderr is still read.
const STDERR_DRAIN_GRACE: Duration = Duration::from_millis(200);

/// One worker position: the process when it runs, its restart state, and the entries it
/// holds.
pub(super) struct Driver {
    pool: Arc<PoolShared>,
    index: usize,
    worker: Option<Worker>,
    /// Restart delay; reset when the worker answers.
    restarts: Backoff,
    not_before: Instant,
    /// Entries taken, oldest first: the first is the one the worker is handling, the rest
    /// have been (or are being) written behind it.
    hand: VecDeque<Work>,
}

/// A running worker process and its pipes.
struct Worker {
    process: Process,
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

/// Why an exchange with a worker ended before every entry in hand had its reply.
#[derive(Debug)]
enum Broken {
    /// The worker closed its stdout (it exited or is exiting).
    Gone,
    Protocol(String),
    TimedOut,
    Aborted,
}

impl Driver {
    pub(super) fn new(pool: Arc<PoolShared>, index: usize) -> Self {
        Driver {
            pool,
            index,
            worker: None,
            restarts: Backoff::new(RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX),
            not_before: Instant::now(),
            hand: VecDeque::new(),
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            if self.hand.is_empty() && !self.wait_for_work().await {
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

    /// Waits until an entry is in hand. `false`: the pool is stopping and its queue is
    /// empty, or shutdown is aborting.
    async fn wait_for_work(&mut self) -> bool {
        let pool = self.pool.clone();
        loop {
            if pool.abort.is_cancelled() {
                return false;
            }
            let notified = pool.queued.notified();
            tokio::pin!(notified);
            // Registered before looking at the queue, so an entry queued in between wakes us.
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
    /// worker now; the entries in hand were handed back (or the first one failed to start).
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
        match Worker::start(&self.pool, self.index) {
            Ok(worker) => {
                self.worker = Some(worker);
                true
            }
            Err(error) => {
                self.died("could not be started");
                if let Some(work) = self.hand.pop_front() {
                    let outcome = Outcome::of_spawn_error(&error);
                    work.finish(outcome, Vec::new(), Duration::ZERO);
                }
                self.pool.requeue(&mut self.hand);
                false
            }
        }
    }

    /// Writes the requests of the entries in hand (and of those taken meanwhile) and
    /// settles them as their replies come, until nothing is in hand or the worker breaks.
    async fn exchange(&mut self) {
        let pool = self.pool.clone();
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        // How many entries at the front of `hand` have their requests in `worker.requests`.
        let mut encoded = 0usize;
        let mut started = Instant::now();
        worker.turn_of(self.hand.front());
        let mut deadline = started + pool.cmd.timeout;
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        let broken = loop {
            while let Some(work) = self.hand.get(encoded) {
                work.encode(&mut worker.requests);
                encoded += 1;
            }
            if self.hand.is_empty() {
                return;
            }
            if started + pool.cmd.timeout != deadline {
                deadline = started + pool.cmd.timeout;
                timer.as_mut().reset(deadline.into());
            }
            match worker.step(&pool.abort, timer.as_mut()).await {
                Ok(false) => {}
                Ok(true) => {
                    let answered = settle_replies(worker, &mut self.hand, &mut started);
                    encoded -= answered.count;
                    if answered.count > 0 {
                        self.restarts.reset();
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

    /// The worker failed the entry it was handling (or shutdown aborted everything): it is
    /// replaced, whatever state it is in, and the entries behind that one go back to the
    /// pool.
    async fn broke(&mut self, broken: Broken, started: Instant) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let tail = worker.tail.clone();
        let status = worker.stop(self.pool.cmd.kill_grace, false).await;
        let gone = |what: String| match status {
            Some(status) => {
                Outcome::WorkerLost(format!("{what} ({})", Outcome::of_exit(status).reason()))
            }
            None => Outcome::WorkerLost(what),
        };
        let outcome = match broken {
            Broken::Aborted => {
                for work in self.hand.drain(..) {
                    work.finish(Outcome::Aborted, Vec::new(), started.elapsed());
                }
                return;
            }
            Broken::Gone => gone("worker exited".to_owned()),
            Broken::Protocol(message) => gone(format!("worker protocol error: {message}")),
            Broken::TimedOut => Outcome::TimedOut(self.pool.cmd.timeout),
        };
        self.died(&outcome.reason());
        let stderr = lock(&tail).take();
        let elapsed = started.elapsed();
        if matches!(outcome, Outcome::TimedOut(_)) {
            self.pool.observe(1, elapsed);
        }
        if let Some(work) = self.hand.pop_front() {
            work.finish(outcome, stderr, elapsed);
        }
        self.pool.requeue(&mut self.hand);
    }

    /// A worker that exited while idle is replaced before it is given an entry, so the
    /// entry does not pay for it.
    async fn reap_if_exited(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        if let Some(status) = worker.process.exited() {
            let reason = Outcome::of_exit(status).reason();
            if let Some(worker) = self.worker.take() {
                worker.stop(self.pool.cmd.kill_grace, false).await;
            }
            self.died(&format!("exited while idle ({reason})"));
        }
    }

    fn died(&mut self, why: &str) {
        let delay = self.restarts.fail();
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
    /// Entries settled (taken off the front of the hand).
    count: usize,
    /// Their handling times, summed.
    busy: Duration,
    result: Result<(), Broken>,
}

/// Settles one entry per complete reply line in `worker.replies`, in order. A reply that
/// cannot be parsed leaves its entry at the front of `hand` and breaks the exchange.
fn settle_replies(
    worker: &mut Worker,
    hand: &mut VecDeque<Work>,
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
        let Some(work) = hand.pop_front() else {
            result = Err(Broken::Protocol(
                "a reply with no request outstanding".to_owned(),
            ));
            break;
        };
        let outcome = match protocol::parse_reply(line) {
            Ok(Reply::Ok) => Outcome::Success,
            Ok(Reply::Fail(reason)) => Outcome::Failed(reason),
            Ok(Reply::Dlq(reason)) => Outcome::Rejected(reason),
            Err(message) => {
                hand.push_front(work);
                result = Err(Broken::Protocol(message));
                break;
            }
        };
        let stderr = if outcome == Outcome::Success {
            Vec::new()
        } else {
            lock(&worker.tail).take()
        };
        count += 1;
        let now = Instant::now();
        let took = now.saturating_duration_since(*started);
        busy += took;
        work.finish(outcome, stderr, took);
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
    /// Starts worker number `index` of `pool`.
    fn start(pool: &PoolShared, index: usize) -> std::io::Result<Worker> {
        let mut command = pool.cmd.command(&pool.who)?;
        command
            .env("REDIS_STREAMD_WORKER", index.to_string())
            .env("REDIS_STREAMD_PROTOCOL", "1");
        let (process, pipes) = Process::spawn(&mut command)?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (pipes.stdin, pipes.stdout, pipes.stderr)
        else {
            // Dropping `process` kills its group.
            return Err(std::io::Error::other("worker pipes missing"));
        };
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let current = Arc::new(Mutex::new(None));
        let stream = pool.who.stream.clone();
        let stderr_task = log_stderr(stderr, stream, index, tail.clone(), current.clone());
        let stderr_task = tokio::spawn(stderr_task.in_current_span());
        tracing::info!(stream = %pool.who.stream, worker = index, pid = process.pid(), "worker started");
        Ok(Worker {
            process,
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

    /// Waits for the next thing to happen with the worker: a read from stdout (`true`:
    /// replies to look at), a write of pending request bytes (`false`), or the end of the
    /// exchange (abort, timeout, end of stdout).
    async fn step(
        &mut self,
        abort: &CancellationToken,
        timer: Pin<&mut Sleep>,
    ) -> Result<bool, Broken> {
        self.replies.reserve(READ_CHUNK);
        let Worker {
            stdin,
            stdin_open,
            stdout,
            replies,
            requests,
            written,
            ..
        } = self;
        tokio::select! {
            biased;
            _ = abort.cancelled() => Err(Broken::Aborted),
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
            _ = timer => Err(Broken::TimedOut),
        }
    }

    /// `work` is now the entry the worker is handling: stderr lines name it, and the
    /// stderr tail kept for the DLQ starts afresh.
    fn turn_of(&self, work: Option<&Work>) {
        let mut current = lock(&self.current);
        match (current.as_mut(), work) {
            (Some(id), Some(work)) => {
                id.clear();
                id.push_str(work.ticket.id());
            }
            (None, Some(work)) => *current = Some(work.ticket.id().to_owned()),
            (_, None) => *current = None,
        }
        drop(current);
        lock(&self.tail).take();
    }

    /// Ends the worker and reaps it. `polite`: close stdin first and give it `grace` to
    /// exit on its own (shutdown); otherwise SIGTERM at once (it failed an entry). Then
    /// SIGKILL after `grace`. Returns its exit status when known.
    async fn stop(self, grace: Duration, polite: bool) -> Option<std::process::ExitStatus> {
        let Worker {
            process,
            stdin,
            mut stderr_task,
            ..
        } = self;
        drop(stdin);
        let stop = async move {
            if polite {
                tokio::time::sleep(grace).await;
            }
        };
        let ended = process.end(stop, grace, || {}).await;
        if tokio::time::timeout(STDERR_DRAIN_GRACE, &mut stderr_task)
            .await
            .is_err()
        {
            stderr_task.abort();
        }
        ended.status.ok()
    }
}

/// Logs a worker's stderr lines (naming the entry in hand) and keeps its tail.
async fn log_stderr(
    pipe: ChildStderr,
    stream: String,
    index: usize,
    tail: Arc<Mutex<StderrTail>>,
    current: Arc<Mutex<Option<String>>>,
) {
    let origin = Origin::Worker {
        stream: &stream,
        index,
        current: &current,
    };
    // A read error ends the worker's stderr like end of file does.
    let _ = output::read_output(pipe, origin, |chunk| lock(&tail).push(chunk)).await;
}
