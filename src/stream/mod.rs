//! The consume loop: one per stream, with backpressure, a task per entry (exec mode) or
//! a hand-over to the worker pool (worker mode), and retries.
//!
//! Backpressure is a semaphore of slots: `max_block_read` in exec mode; in worker mode
//! `max_block_read` times the pool's current prefetch depth (the pool resizes it, see
//! `worker`). A read asks for exactly as many entries as there are free slots
//! (`max_block_read - in_flight` in exec mode) and each entry holds its slot until its
//! handler has finished with it, so no more than `max_block_read` handler processes of a
//! stream ever run at once. With no free slot the loop does not read; it waits for one.
//!
//! A failed attempt does not hold a slot while it waits: the task reports the id and a due
//! time back to the loop, which keeps a timer heap. When a retry is due the loop claims
//! the entry again (`XCLAIM`, which bumps Redis's delivery counter: that counter is the
//! attempt number, so it survives restarts and takeovers by other consumers).
//!
//! On start the loop first re-reads its own pending list (id `0`), so a restarted daemon
//! with the same consumer name finishes what it had before it reads new entries.

pub(crate) mod ack;
pub(crate) mod dlq;
pub(crate) mod payload;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::StreamConfig;
use crate::exec::{Done, Executor, Job, Outcome, Report};
use crate::identity::Consumer;
use crate::ops::metrics::{Health, StreamMetrics};
use crate::ops::notify::Liveness;
use crate::ops::shutdown::Shutdown;
use crate::redis::{Entry, RedisError, StreamCommands};
use crate::stream::ack::Acker;
use crate::stream::dlq::Failure;

/// How many of our own pending entries one scan for lost deliveries looks at.
const LOST_SCAN_ROWS: usize = 1000;

/// How long the final acks may take once every handler is done, when Redis is slow or
/// down; after that, the unacked entries stay pending and are handled again later.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// What a loop reports to: metrics, `/readyz`, and the systemd watchdog.
pub struct LoopHooks {
    pub metrics: StreamMetrics,
    pub health: Arc<Health>,
    pub liveness: Arc<Liveness>,
    /// Sample the group's lag and pending count for the metrics (only worth the
    /// `XINFO GROUPS` calls when someone can scrape them).
    pub sample_group: bool,
}

/// How often lag and pending count are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a waiting loop proves to the watchdog that it is alive.
const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A failed entry waiting for its next attempt.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Retry {
    due: Instant,
    id: String,
}

/// State shared by the loop and its entry tasks.
struct Shared {
    cfg: StreamConfig,
    executor: Executor,
    /// DLQ writes of entries whose `Done` came back (the settler cannot wait on Redis).
    settling: TaskTracker,
    /// Entries handed to the executor, until their `Done`: the entry and its in-flight mark.
    running: Mutex<HashMap<String, (Entry, InFlight)>>,
    metrics: StreamMetrics,
    cmds: StreamCommands,
    acker: Acker,
    retry_tx: mpsc::UnboundedSender<Retry>,
    /// Ids whose handler is running (or about to): a due retry or a claimed entry that is
    /// already here must not start a second handler.
    in_flight: Mutex<HashSet<String>>,
    abort: CancellationToken,
}

impl Shared {
    fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Checks that an attempt can run. Everything but `Run` settles the entry here.
    fn prepare(&self, entry: &Entry, attempt: u64) -> Prepared {
        let cfg = &self.cfg;
        if entry.fields.is_none() {
            tracing::warn!(stream = %cfg.name, id = %entry.id, "entry was deleted from the stream while pending; acking it away");
            return Prepared::Deleted;
        }
        if attempt > cfg.max_attempts {
            return Prepared::DeadLetter(Failure {
                reason: format!(
                    "delivered {attempt} times, more than max_attempts ({})",
                    cfg.max_attempts
                ),
                attempts: attempt - 1,
                stderr: Vec::new(),
            });
        }
        match payload::stdin_for(cfg.payload, &cfg.payload_field, &cfg.name, entry) {
            Ok(stdin) => Prepared::Run(stdin),
            Err(reason) => Prepared::DeadLetter(Failure {
                reason,
                attempts: 0,
                stderr: Vec::new(),
            }),
        }
    }

    fn handler_finished(&self, report: &Report) {
        self.metrics.in_flight_dec();
        if report.outcome != Outcome::Aborted {
            self.metrics.handler_duration(report.elapsed);
        }
    }

    /// Settles a finished attempt: ack, retry, or nothing (aborted). Returns the entry and
    /// its failure when it must go to the DLQ, the one outcome that waits on Redis.
    fn settle(&self, entry: Entry, attempt: u64, report: Report) -> Option<(Entry, Failure)> {
        let cfg = &self.cfg;
        let elapsed_ms = report.elapsed.as_millis() as u64;
        let final_failure = match &report.outcome {
            Outcome::Success => {
                // debug, not info: one line per success is most of a busy daemon's log
                // volume and measurable per-entry cost; successes are counted in the metrics.
                tracing::debug!(stream = %cfg.name, group = %cfg.group, id = %entry.id, attempt, elapsed_ms, "handled");
                self.acker.ack(entry.id);
                return None;
            }
            Outcome::Aborted => {
                tracing::warn!(stream = %cfg.name, group = %cfg.group, id = %entry.id, attempt, elapsed_ms, "handler terminated by shutdown; entry stays pending");
                return None;
            }
            Outcome::Exited(code) if cfg.dlq_exit_codes.contains(code) => true,
            Outcome::Rejected(_) => true,
            _ => attempt >= cfg.max_attempts,
        };
        self.metrics.failed_attempt();
        let reason = report.outcome.reason();
        if final_failure {
            let failure = Failure {
                reason,
                attempts: attempt,
                stderr: report.stderr_tail,
            };
            return Some((entry, failure));
        }
        let delay = backoff(cfg, attempt);
        tracing::warn!(stream = %cfg.name, group = %cfg.group, id = %entry.id, attempt, elapsed_ms, %reason, retry_in = ?delay, "attempt failed");
        self.metrics.retry();
        let _ = self.retry_tx.send(Retry {
            due: Instant::now() + delay,
            id: entry.id,
        });
        None
    }

    async fn dead_letter(&self, entry: &Entry, failure: &Failure) {
        if dlq::dead_letter(&self.cmds, &self.cfg.dlq, entry, failure, &self.abort).await {
            self.metrics.dead_lettered();
        }
    }
}

/// What [`Shared::prepare`] found.
enum Prepared {
    /// Run the handler with this stdin.
    Run(bytes::Bytes),
    /// The entry is gone from the stream: ack it away.
    Deleted,
    /// Never runs: straight to the DLQ.
    DeadLetter(Failure),
}

/// Work an attempt still has to wait for, run as a task by the caller.
type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Marks an id as in flight for as long as it lives.
struct InFlight {
    shared: Arc<Shared>,
    id: String,
}

impl InFlight {
    /// `None` when `id` is already in flight.
    fn enter(shared: &Arc<Shared>, id: &str) -> Option<InFlight> {
        let mut set = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.to_owned()).then(|| InFlight {
            shared: shared.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut set = self
            .shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(&self.id);
    }
}

/// One stream's consume loop, ready to run.
pub struct StreamLoop {
    shared: Arc<Shared>,
    /// Entries this stream may have in flight: `max_block_read` handlers in exec mode;
    /// in worker mode sized by the pool.
    slots: Arc<Semaphore>,
    /// Commands on this loop's own connection, used only for the blocking read.
    reader: StreamCommands,
    retry_rx: mpsc::UnboundedReceiver<Retry>,
    /// The executor's reports, one per submitted job.
    done_rx: Option<mpsc::UnboundedReceiver<Done>>,
    acker_task: JoinHandle<()>,
    /// Reconnects of the reader's connection (see [`StreamLoop::recover_lost`]).
    reconnects: broadcast::Receiver<fred::types::config::Server>,
    health: Arc<Health>,
    liveness: Arc<Liveness>,
    sample_group: bool,
}

impl StreamLoop {
    /// `commands` is the shared client for acks, claims and DLQ writes; `reader` must be a
    /// connection of this loop's own.
    pub fn new(
        cfg: StreamConfig,
        consumer: &str,
        commands: fred::prelude::Client,
        reader: fred::prelude::Client,
        shutdown: &Shutdown,
        hooks: LoopHooks,
    ) -> Self {
        let cmds = StreamCommands::new(commands, Consumer::new(&cfg.name, &cfg.group, consumer));
        let reader = StreamCommands::new(reader, cmds.who.clone());
        let reconnects = reader.reconnects();
        let (acker, acker_task) = Acker::spawn(cmds.clone(), hooks.metrics.clone());
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (executor, done_rx) = Executor::new(&cfg, &cmds.who, shutdown.abort_token().clone());
        let slots = executor.slots();
        let shared = Arc::new(Shared {
            cfg,
            executor,
            settling: TaskTracker::new(),
            running: Mutex::new(HashMap::new()),
            metrics: hooks.metrics,
            cmds,
            acker,
            retry_tx,
            in_flight: Mutex::new(HashSet::new()),
            abort: shutdown.abort_token().clone(),
        });
        StreamLoop {
            shared,
            slots,
            reader,
            retry_rx,
            done_rx: Some(done_rx),
            acker_task,
            reconnects,
            health: hooks.health,
            liveness: hooks.liveness,
            sample_group: hooks.sample_group,
        }
    }

    /// Creates the consumer group if it is missing, retrying through Redis errors until it
    /// works or shutdown begins. A key of another type (WRONGTYPE) is not retried.
    pub async fn prepare(&self, shutdown: &Shutdown) -> Result<(), RedisError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.ensure_group().await {
                Ok(()) => return Ok(()),
                Err(error) if error.is_wrongtype() => {
                    tracing::error!(stream = %self.shared.cfg.name, %error, "the stream's key holds another type of value");
                    return Err(error);
                }
                Err(error) => {
                    let delay = backoff.fail();
                    tracing::warn!(stream = %self.shared.cfg.name, %error, retry_in = ?delay, "cannot set up consumer group; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.stopping() => return Err(RedisError::Stopped),
                    }
                }
            }
        }
    }

    async fn ensure_group(&self) -> Result<(), RedisError> {
        let cfg = &self.shared.cfg;
        if self.shared.cmds.ensure_group(&cfg.start_id).await? {
            tracing::info!(stream = %cfg.name, group = %cfg.group, start_id = %cfg.start_id, "created consumer group");
        }
        Ok(())
    }

    /// Runs until shutdown, then waits for every entry task and the last acks.
    pub async fn run(mut self, shutdown: Shutdown) {
        let cfg = &self.shared.cfg;
        tracing::info!(
            stream = %cfg.name,
            group = %cfg.group,
            consumer = %self.shared.cmds.who.name,
            max_block_read = cfg.max_block_read,
            "consume loop started"
        );
        let slots = self.slots.clone();
        let mut tasks = JoinSet::new();
        let mut retries = RetryQueue::default();
        // Some(cursor) while we are still working through our own pending list.
        let mut backlog_cursor = Some("0".to_owned());
        let mut claim_timer = tokio::time::interval(cfg.claim_interval);
        claim_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut claim_cursor: Option<String> = None;
        let mut read_backoff = Backoff::redis();
        // Set when the reader's connection was lost: a read's reply may have been lost
        // with it, after Redis delivered the entries to us.
        let mut lost_scan = false;
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(self.shared.clone(), heartbeat_stop.clone()));
        if self.sample_group {
            tokio::spawn(sample_group(self.shared.clone(), heartbeat_stop.clone()));
        }
        let settler_stop = CancellationToken::new();
        let settler = match self.done_rx.take() {
            Some(done_rx) => tokio::spawn(settle_done(
                self.shared.clone(),
                done_rx,
                settler_stop.clone(),
            )),
            None => tokio::spawn(async {}),
        };
        let alive = self.liveness.register(cfg.name.clone());
        let mut beats = tokio::time::interval(BEAT_INTERVAL);
        self.health.loop_started();

        loop {
            alive.beat();
            let permit = tokio::select! {
                biased;
                _ = shutdown.stopping() => break,
                _ = beats.tick() => continue,
                Some(retry) = self.retry_rx.recv() => {
                    retries.push(retry);
                    continue;
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    log_task_end(&self.shared.cfg.name, done);
                    continue;
                }
                _ = claim_timer.tick() => {
                    Box::pin(self.reap_idle_consumers()).await;
                    claim_cursor.get_or_insert_with(|| "0-0".to_owned());
                    continue;
                }
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let mut permits = vec![permit];
            while let Ok(more) = slots.clone().try_acquire_owned() {
                permits.push(more);
            }
            if self.batches_reads() && !tasks.is_empty() {
                gather_slots(&slots, &mut permits, self.slot_count().div_ceil(2)).await;
            }

            self.start_due_retries(&mut retries, &mut permits, &mut tasks);
            lost_scan |= self.reconnected();
            if lost_scan && backlog_cursor.is_none() && !permits.is_empty() {
                lost_scan =
                    Box::pin(self.recover_lost(&mut retries, &mut permits, &mut tasks)).await;
            }
            if backlog_cursor.is_none()
                && let Some(cursor) = claim_cursor.take()
            {
                claim_cursor =
                    Box::pin(self.claim_round(&mut retries, &cursor, &mut permits, &mut tasks))
                        .await;
            }
            if permits.is_empty() {
                continue;
            }

            let (id, block) = match &backlog_cursor {
                Some(cursor) => (cursor.clone(), None),
                None => (">".to_owned(), Some(self.block_for(&mut retries))),
            };
            // While the read blocks, keep taking retries and finished tasks. A retry that
            // falls due before the read would return interrupts it (CLIENT UNBLOCK ...
            // TIMEOUT: it returns as if timed out, delivering nothing), so a retry is never
            // late by up to `block`.
            // Boxed: an idle loop waits here, and its task is as large as this state.
            let mut read = Box::pin(self.reader.read(permits.len(), block, &id));
            let mut wake_at: Option<Instant> = None;
            let read = loop {
                tokio::select! {
                    biased;
                    r = &mut read => break Some(r),
                    // Dropping the read is safe: anything it delivered is in our pending
                    // list and is picked up by the next start (or another consumer's claim).
                    _ = shutdown.stopping() => break None,
                    Some(retry) = self.retry_rx.recv() => {
                        if block.is_some() {
                            wake_at = Some(wake_at.map_or(retry.due, |w| w.min(retry.due)));
                        }
                        retries.push(retry);
                    }
                    Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                        log_task_end(&self.shared.cfg.name, done);
                    }
                    _ = beats.tick() => alive.beat(),
                    _ = sleep_until_some(wake_at) => {
                        wake_at = None;
                        self.reader.unblock().await;
                    }
                }
            };
            let Some(read) = read else { break };
            let entries = match read {
                Ok(entries) => {
                    read_backoff.reset();
                    entries
                }
                Err(error) => {
                    lost_scan = true;
                    Box::pin(self.read_failed(error, &mut read_backoff, &shutdown)).await;
                    continue;
                }
            };

            if backlog_cursor.is_some() {
                match Box::pin(self.attempt_numbers(&entries)).await {
                    Ok(attempts) => {
                        backlog_cursor = entries.last().map(|e| e.id.clone());
                        if backlog_cursor.is_none() {
                            tracing::debug!(stream = %self.shared.cfg.name, "own pending entries done; reading new ones");
                        }
                        for entry in entries {
                            let attempt = attempts.get(&entry.id).copied().unwrap_or(1);
                            self.spawn_attempt(entry, attempt, &mut permits, &mut tasks);
                        }
                    }
                    Err(error) => {
                        // The read bumped their counters; they stay pending and the
                        // cursor stays put, so the next round reads them again.
                        Box::pin(self.read_failed(error, &mut read_backoff, &shutdown)).await;
                    }
                }
            } else {
                for entry in entries {
                    // A fresh delivery (`>`) always has delivery count 1.
                    self.spawn_attempt(entry, 1, &mut permits, &mut tasks);
                }
            }
        }

        // No longer reading: not ready, and a long drain is no hang for the watchdog.
        // (Rarely taken paths are boxed above and below: an idle loop's task is as large
        // as its largest state, and with a hundred streams that is resident memory.)
        self.health.loop_stopped();
        drop(alive);
        Box::pin(self.drain(tasks, heartbeat, heartbeat_stop, (settler, settler_stop))).await;
    }

    /// Worker mode reads in batches: a worker answers in microseconds, so reading as soon
    /// as one slot frees means one XREADGROUP (and one XACK) per entry or two, and Redis
    /// round trips become the limit. Per-entry processes take a millisecond to spawn;
    /// there, reading at once is better.
    fn batches_reads(&self) -> bool {
        self.shared.executor.batches_reads()
    }

    /// How many permits `slots` has in all, free or held.
    fn slot_count(&self) -> usize {
        self.shared.executor.slot_count()
    }

    /// Whether the reader reconnected since the last call.
    fn reconnected(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.reconnects.try_recv() {
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => any = true,
                Err(_) => return any,
            }
        }
    }

    /// After the reader's connection was lost, a read whose reply never arrived may have
    /// delivered entries to us: they are in our pending list, but the loop never saw
    /// them. Waiting for `claim_idle` would delay them and cost them an attempt, so they
    /// are picked up here: every pending entry of ours that is not running, waiting for a
    /// retry or being acked is taken as it is (XCLAIM JUSTID, so the lost delivery counts
    /// as this attempt) and its fields read with XRANGE. Returns whether to scan again.
    async fn recover_lost(
        &mut self,
        retries: &mut RetryQueue,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
    ) -> bool {
        let cmds = &self.shared.cmds;
        let stream = &self.shared.cfg.name;
        let rows = match cmds.my_pending("-", "+", LOST_SCAN_ROWS).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::debug!(%stream, %error, "cannot scan own pending entries yet");
                return true;
            }
        };
        for row in rows {
            if permits.is_empty() {
                return true;
            }
            // Order matters: an entry task queues its ack or its retry before it leaves
            // the in-flight set, so once it is seen out of flight, both are visible.
            if self.shared.is_in_flight(&row.id) {
                continue;
            }
            while let Ok(retry) = self.retry_rx.try_recv() {
                retries.push(retry);
            }
            if retries.contains(&row.id) || self.shared.acker.is_settling(&row.id) {
                continue;
            }
            let taken = cmds
                .reclaim_quietly(&row.id, Duration::from_millis(row.idle_ms))
                .await;
            let entry = match taken {
                Ok(true) => cmds.entry(&row.id).await,
                Ok(false) => continue,
                Err(error) => Err(error),
            };
            match entry {
                Ok(entry) => {
                    tracing::info!(%stream, id = %entry.id, "recovered an entry whose delivery was lost with the connection");
                    self.spawn_attempt(entry, row.deliveries.max(1), permits, tasks);
                }
                Err(error) => {
                    tracing::debug!(%stream, %error, "recovering own pending entries failed; trying again");
                    return true;
                }
            }
        }
        false
    }

    /// One XAUTOCLAIM page of at most one entry per free slot. Returns the cursor to
    /// continue from on the next round, or `None` when the scan of the pending list is
    /// complete (the next `claim_interval` tick starts a new one).
    async fn claim_round(
        &mut self,
        retries: &mut RetryQueue,
        cursor: &str,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
    ) -> Option<String> {
        let cfg = &self.shared.cfg;
        if permits.is_empty() {
            return Some(cursor.to_owned());
        }
        let claim = match self
            .shared
            .cmds
            .autoclaim(cfg.claim_idle, cursor, permits.len())
            .await
        {
            Ok(claim) => claim,
            Err(error) => {
                tracing::warn!(stream = %cfg.name, %error, "XAUTOCLAIM failed; trying again next interval");
                return None;
            }
        };
        for id in &claim.deleted {
            tracing::warn!(stream = %cfg.name, %id, "pending entry was deleted from the stream; redis dropped it from the pending list");
        }
        let attempts = match Box::pin(self.attempt_numbers(&claim.entries)).await {
            Ok(attempts) => attempts,
            Err(error) => {
                // Claimed but not started: they are ours now and idle again after
                // claim_idle, so the next scan (ours or another consumer's) takes them.
                tracing::warn!(stream = %cfg.name, %error, "cannot read delivery counts of claimed entries");
                return None;
            }
        };
        while let Ok(retry) = self.retry_rx.try_recv() {
            retries.push(retry);
        }
        for entry in claim.entries {
            // XAUTOCLAIM does not look at the owner: it can return our own entries that
            // are waiting for a retry or for their ack. Those are handled already.
            if retries.contains(&entry.id) || self.shared.acker.is_settling(&entry.id) {
                tracing::debug!(stream = %cfg.name, id = %entry.id, "claimed our own settled or retrying entry; leaving it be");
                continue;
            }
            tracing::info!(stream = %cfg.name, id = %entry.id, "claimed an entry idle for over claim_idle");
            let attempt = attempts.get(&entry.id).copied().unwrap_or(1);
            self.spawn_attempt(entry, attempt, permits, tasks);
        }
        (claim.next_cursor != "0-0").then_some(claim.next_cursor)
    }

    /// Removes other consumers that have been idle longer than `reap_idle` and hold no
    /// pending entries (crashed or decommissioned workers that never said goodbye).
    async fn reap_idle_consumers(&self) {
        let cfg = &self.shared.cfg;
        let cmds = &self.shared.cmds;
        let consumers = match cmds.consumers().await {
            Ok(consumers) => consumers,
            Err(error) => {
                tracing::debug!(stream = %cfg.name, %error, "XINFO CONSUMERS failed");
                return;
            }
        };
        let reap_ms = cfg.reap_idle.as_millis() as u64;
        for consumer in consumers {
            if consumer.name == cmds.who.name || consumer.pending > 0 || consumer.idle_ms < reap_ms
            {
                continue;
            }
            match cmds.delete_consumer(&consumer.name).await {
                Ok(_) => {
                    tracing::info!(stream = %cfg.name, consumer = %consumer.name, idle_ms = consumer.idle_ms, "removed idle consumer with no pending entries")
                }
                Err(error) => {
                    tracing::debug!(stream = %cfg.name, %error, "XGROUP DELCONSUMER failed")
                }
            }
        }
    }

    /// After stop: no reads; running handlers finish (or are aborted by the shutdown
    /// clock); queued retries are dropped and stay pending for the next start.
    async fn drain(
        self,
        mut tasks: JoinSet<()>,
        heartbeat: JoinHandle<()>,
        heartbeat_stop: CancellationToken,
        (settler, settler_stop): (JoinHandle<()>, CancellationToken),
    ) {
        let name = self.shared.cfg.name.clone();
        // A read dropped by the stop may still block the reader connection; release it so
        // closing the connection does not wait for `block`.
        self.reader.unblock().await;
        let running = tasks.len() + lock_running(&self.shared).len();
        if running > 0 {
            tracing::info!(stream = %name, running, "waiting for running handlers");
        }
        while let Some(done) = tasks.join_next().await {
            log_task_end(&name, done);
        }
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        self.shared.executor.shutdown().await;
        // Every Done is sent: let the settler take the last ones and end.
        settler_stop.cancel();
        if let Err(error) = settler.await {
            tracing::error!(stream = %name, %error, "settler task failed");
        }
        self.shared.settling.close();
        self.shared.settling.wait().await;
        let cmds = self.shared.cmds.clone();
        let StreamLoop {
            shared,
            acker_task,
            reader,
            ..
        } = self;
        // Dropping the last Acker lets the ack task flush and end.
        drop(shared);
        match tokio::time::timeout(FINAL_FLUSH, acker_task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(stream = %name, %error, "ack task failed"),
            Err(_) => tracing::error!(
                stream = %name,
                "final acks did not reach redis in time; those entries stay pending and will run again"
            ),
        }
        leave_group_if_idle(&cmds).await;
        reader.quit().await;
        tracing::info!(stream = %name, "consume loop stopped");
    }

    /// How long the next `>` read may block: `block`, but no longer than until the next
    /// retry is due.
    fn block_for(&self, retries: &mut RetryQueue) -> Duration {
        let block = self.shared.cfg.block;
        match retries.next_due() {
            Some(due) => block
                .min(due.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1)),
            None => block,
        }
    }

    /// Delivery counts (= attempt numbers) of entries just delivered to us, by id.
    async fn attempt_numbers(&self, entries: &[Entry]) -> Result<HashMap<String, u64>, RedisError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let rows = self
            .shared
            .cmds
            .my_pending(&first.id, &last.id, entries.len())
            .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.deliveries)).collect())
    }

    async fn read_failed(&self, error: RedisError, backoff: &mut Backoff, shutdown: &Shutdown) {
        let name = &self.shared.cfg.name;
        let delay = backoff.fail();
        if error.is_nogroup() {
            tracing::warn!(stream = %name, group = %self.shared.cfg.group, "consumer group is gone (NOGROUP); recreating it");
            if let Err(error) = self.ensure_group().await {
                tracing::warn!(stream = %name, %error, "recreating the consumer group failed");
            }
        } else {
            tracing::warn!(stream = %name, %error, retry_in = ?delay, "XREADGROUP failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.stopping() => {}
        }
    }

    fn start_due_retries(
        &self,
        retries: &mut RetryQueue,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
    ) {
        let now = Instant::now();
        while !permits.is_empty() {
            let Some(retry) = retries.pop_due(now) else {
                break;
            };
            let Some(guard) = InFlight::enter(&self.shared, &retry.id) else {
                continue;
            };
            let Some(permit) = permits.pop() else { break };
            tasks.spawn(retry_entry(self.shared.clone(), retry.id, permit, guard));
        }
    }

    fn spawn_attempt(
        &self,
        entry: Entry,
        attempt: u64,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
    ) {
        let Some(guard) = InFlight::enter(&self.shared, &entry.id) else {
            tracing::debug!(stream = %self.shared.cfg.name, id = %entry.id, "already running; skipping duplicate delivery");
            return;
        };
        // A read never returns more entries than it asked for, and it asked for one per
        // permit; if Redis ever did, the extra entry stays pending for a later round.
        let Some(permit) = permits.pop() else {
            tracing::warn!(stream = %self.shared.cfg.name, id = %entry.id, "read returned more entries than requested; leaving it pending");
            return;
        };
        self.shared.metrics.read(1);
        if let Some(work) = start_attempt(&self.shared, entry, attempt, permit, guard) {
            tasks.spawn(work);
        }
    }
}

/// Failed entries waiting for their next attempt, earliest first. Scheduling an id again
/// replaces its earlier due time (an entry claimed and failed again meanwhile must not get
/// two retries).
#[derive(Default)]
struct RetryQueue {
    heap: BinaryHeap<Reverse<Retry>>,
    due: HashMap<String, Instant>,
}

impl RetryQueue {
    fn push(&mut self, retry: Retry) {
        self.due.insert(retry.id.clone(), retry.due);
        self.heap.push(Reverse(retry));
    }

    fn contains(&self, id: &str) -> bool {
        self.due.contains_key(id)
    }

    fn next_due(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.heap.peek().map(|Reverse(r)| r.due)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Retry> {
        if self.next_due()? > now {
            return None;
        }
        let Reverse(retry) = self.heap.pop()?;
        self.due.remove(&retry.id);
        Some(retry)
    }

    /// Drops heap tops that were rescheduled since they were pushed.
    fn drop_stale(&mut self) {
        while let Some(Reverse(top)) = self.heap.peek() {
            if self.due.get(&top.id) == Some(&top.due) {
                return;
            }
            self.heap.pop();
        }
    }
}

/// Keeps the entries of running handlers (and of unconfirmed acks) fresh (idle time reset) every `claim_idle / 3`,
/// so other consumers' XAUTOCLAIM never takes an entry whose handler is healthy.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let period = shared.cfg.claim_idle / 3;
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Entries whose ack is not confirmed yet (Redis was away) are ours too: kept fresh,
        // nobody's XAUTOCLAIM runs them again before the ack lands.
        let mut ids: Vec<String> = {
            let set = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            set.iter().cloned().collect()
        };
        ids.extend(shared.acker.unconfirmed());
        if ids.is_empty() {
            continue;
        }
        if let Err(error) = Box::pin(shared.cmds.touch(ids)).await {
            tracing::warn!(stream = %shared.cfg.name, %error, "cannot refresh running entries (XCLAIM JUSTID)");
        }
    }
}

/// Samples the group's pending count and lag into the metrics until `stop`.
async fn sample_group(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        match Box::pin(shared.cmds.group_stats()).await {
            Ok(Some((pending, lag))) => {
                shared
                    .metrics
                    .set_pending(i64::try_from(pending).unwrap_or(i64::MAX));
                // Unknown lag (Redis cannot tell after some trims) is exported as -1.
                shared
                    .metrics
                    .set_lag(lag.and_then(|l| i64::try_from(l).ok()).unwrap_or(-1));
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(stream = %shared.cfg.name, %error, "XINFO GROUPS failed"),
        }
    }
}

/// On a clean stop, a consumer with nothing pending removes itself from the group so
/// `XINFO CONSUMERS` does not fill up with dead names. One with pending entries stays:
/// deleting it would drop those entries from the pending list.
async fn leave_group_if_idle(cmds: &StreamCommands) {
    match cmds.my_pending("-", "+", 1).await {
        Ok(rows) if rows.is_empty() => match cmds.delete_consumer(&cmds.who.name).await {
            Ok(_) => {
                tracing::info!(stream = %cmds.who.stream, consumer = %cmds.who.name, "left the consumer group (nothing pending)")
            }
            Err(error) => {
                tracing::debug!(stream = %cmds.who.stream, %error, "XGROUP DELCONSUMER failed")
            }
        },
        Ok(_) => {
            tracing::info!(stream = %cmds.who.stream, "entries still pending; staying in the group for recovery")
        }
        Err(error) => {
            tracing::debug!(stream = %cmds.who.stream, %error, "cannot check own pending entries")
        }
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log_task_end(stream: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done {
        tracing::error!(stream, %error, "entry task failed; its entry stays pending");
    }
}

/// How long worker mode waits for more free slots before a read (see
/// [`StreamLoop::batches_reads`]).
const READ_LINGER: Duration = Duration::from_millis(1);

/// Collects more free slots until there are `want`, or [`READ_LINGER`] has passed.
async fn gather_slots(
    slots: &Arc<Semaphore>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    want: usize,
) {
    let deadline = Instant::now() + READ_LINGER;
    while permits.len() < want {
        tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permits.push(permit),
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// Delay before attempt `failed + 1`: `retry_backoff * 2^(failed - 1)`, capped.
pub(crate) fn backoff(cfg: &StreamConfig, failed: u64) -> Duration {
    Backoff::delay_after(cfg.retry_backoff, cfg.retry_backoff_max, failed)
}

/// A due retry: take the entry again if it is still ours, then run it.
async fn retry_entry(
    shared: Arc<Shared>,
    id: String,
    permit: OwnedSemaphorePermit,
    guard: InFlight,
) {
    let cmds = &shared.cmds;
    let row = match cmds.pending_entry(&id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            tracing::debug!(stream = %cmds.who.stream, %id, "no longer pending; nothing to retry");
            return;
        }
        Err(error) => return reschedule(&shared, id, error),
    };
    if row.consumer != cmds.who.name {
        tracing::info!(stream = %cmds.who.stream, %id, owner = %row.consumer, "entry was taken over by another consumer; leaving the retry to it");
        return;
    }
    // min-idle = the idle time just seen: if anyone touched the entry since, no claim.
    match cmds.claim(&id, Duration::from_millis(row.idle_ms)).await {
        Ok(Some(entry)) => {
            if let Some(work) = start_attempt(&shared, entry, row.deliveries + 1, permit, guard) {
                work.await;
            }
        }
        Ok(None) => {
            tracing::debug!(stream = %cmds.who.stream, %id, "entry deleted or claimed elsewhere; nothing to retry");
        }
        Err(error) => reschedule(&shared, id, error),
    }
}

fn reschedule(shared: &Shared, id: String, error: RedisError) {
    let delay = Duration::from_secs(1);
    tracing::warn!(stream = %shared.cmds.who.stream, %id, %error, retry_in = ?delay, "cannot claim entry for retry");
    let _ = shared.retry_tx.send(Retry {
        due: Instant::now() + delay,
        id,
    });
}

/// Starts one attempt at `entry`. What it must wait for (a per-entry handler process, a
/// DLQ write) comes back for the caller to run as a task; in worker mode a runnable entry
/// goes to the pool, whose driver settles it, and nothing comes back.
fn start_attempt(
    shared: &Arc<Shared>,
    entry: Entry,
    attempt: u64,
    permit: OwnedSemaphorePermit,
    guard: InFlight,
) -> Option<Pending> {
    let stdin = match shared.prepare(&entry, attempt) {
        Prepared::Run(stdin) => stdin,
        Prepared::Deleted => {
            shared.acker.ack(entry.id);
            return None;
        }
        Prepared::DeadLetter(failure) => {
            let shared = shared.clone();
            return Some(Box::pin(async move {
                shared.dead_letter(&entry, &failure).await;
                drop((permit, guard));
            }));
        }
    };
    shared.metrics.in_flight_inc();
    let job = Job {
        id: entry.id.clone(),
        attempt,
        payload: stdin,
        slot: permit,
    };
    // The guard lives until the entry is settled (its ack or retry queued, or its DLQ
    // write done), so nothing starts it twice meanwhile.
    lock_running(shared).insert(entry.id.clone(), (entry, guard));
    shared.executor.submit(job);
    None
}

fn lock_running(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<String, (Entry, InFlight)>> {
    shared.running.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settles entries as the executor reports them, until `stop` (after the executor's
/// shutdown, when every `Done` has been sent).
async fn settle_done(
    shared: Arc<Shared>,
    mut done_rx: mpsc::UnboundedReceiver<Done>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            Some(done) = done_rx.recv() => settle_one(&shared, done),
            _ = stop.cancelled() => break,
        }
    }
    while let Ok(done) = done_rx.try_recv() {
        settle_one(&shared, done);
    }
}

fn settle_one(shared: &Arc<Shared>, done: Done) {
    let Some((entry, guard)) = lock_running(shared).remove(&done.id) else {
        tracing::error!(stream = %shared.cfg.name, id = %done.id, "a report for an entry that is not running");
        return;
    };
    shared.handler_finished(&done.report);
    if let Some((entry, failure)) = shared.settle(entry, done.attempt, done.report) {
        let dlq = shared.clone();
        shared.settling.spawn(async move {
            dlq.dead_letter(&entry, &failure).await;
            drop(guard);
        });
    }
}
