//! One stream's consume loop: the state of one (stream, group, consumer) in one struct,
//! and a `run` that only waits for the next event and dispatches it.
//!
//! Events: a free read slot (read and start entries), an executor report (settle the
//! entry), a finished background step (a retry's claim, a DLQ write), and timers (claim
//! scan, refreshing the entries we hold, sampling the group). Redis work that may take
//! long runs as tasks; their results come back as events, so the loop alone changes its
//! state and never waits on Redis while entries are waiting to be settled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::StreamConfig;
use crate::exec::{Done, Executor, Job, Outcome};
use crate::identity::Consumer;
use crate::ops::http::Health;
use crate::ops::metrics::StreamMetrics;
use crate::ops::notify::Liveness;
use crate::ops::shutdown::Shutdown;
use crate::redis::{Entry, RedisError, StreamCommands};
use crate::stream::ack::{AckTask, Acker};
use crate::stream::dlq::{self, Failure};
use crate::stream::group::Group;
use crate::stream::lease::Lease;
use crate::stream::order::{Admitted, Order};
use crate::stream::read::Waits;
use crate::stream::recovery::{self, Claimed};
use crate::stream::retry::{Retry, RetryQueue};
use crate::stream::settle::{self, Admit, Settle};

/// How often lag and pending count are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a waiting loop proves to the watchdog that it is alive.
const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// What a loop reports to: metrics, `/readyz`, and the systemd watchdog.
pub struct LoopHooks {
    pub metrics: StreamMetrics,
    pub health: Arc<Health>,
    pub liveness: Arc<Liveness>,
    /// Sample the group's lag and pending count for the metrics (only worth the
    /// `XINFO GROUPS` calls when someone can scrape them).
    pub sample_group: bool,
}

/// What the loop is doing with an entry it holds.
pub(super) enum Busy {
    /// A due retry is claiming it again.
    Claiming,
    /// The executor has it.
    Running(Entry),
    /// Its DLQ write is under way.
    DeadLettering,
    /// Waiting for the lease `admit` step (`order_scope = "group"`).
    Admitting,
}

/// The timers whose ticks become [`Event`]s (they also run while a read blocks).
pub(super) struct Timers {
    refresh: Interval,
    sample: Interval,
}

impl Timers {
    fn new(cfg: &StreamConfig) -> Self {
        let period = cfg.claim_idle / 3;
        let refresh = tokio::time::interval_at(Instant::now() + period, period);
        let mut sample = tokio::time::interval(SAMPLE_INTERVAL);
        sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Timers { refresh, sample }
    }
}

/// Something the loop reacts to.
pub(super) enum Event {
    /// The executor finished a job.
    Done(Done),
    /// A due retry's claim finished.
    Claimed(Result<Claimed, JoinError>),
    /// A DLQ write finished (written, or given up at abort) for this id.
    Written(Result<String, JoinError>),
    /// Time to keep the entries we hold fresh.
    Refresh,
    /// Time to sample the group for the metrics.
    Sample,
    /// A refresh or a sample finished (each logs its own trouble).
    Chore,
    /// A lease renewal finished: keys found in another consumer's hands, each with the
    /// entry that held it here when asked (`order_scope = "group"`).
    Renewed(Result<Vec<(Bytes, String)>, JoinError>),
}

/// One stream's consume loop, ready to run.
pub struct StreamLoop {
    pub(super) cfg: StreamConfig,
    /// Commands on the shared client: acks, claims, DLQ writes.
    pub(super) cmds: StreamCommands,
    /// Commands on this loop's own connection, used only for the blocking read.
    pub(super) reader: Arc<StreamCommands>,
    pub(super) executor: Arc<Executor>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Done>,
    /// Entries this stream may hold (owned and sized by the executor).
    pub(super) slots: Arc<Semaphore>,
    pub(super) acker: Acker,
    pub(super) ack_task: AckTask,
    /// Reconnects of the reader's connection (see [`StreamLoop::recover_lost`]).
    pub(super) reconnects: broadcast::Receiver<fred::types::config::Server>,
    pub(super) metrics: StreamMetrics,
    pub(super) health: Arc<Health>,
    pub(super) liveness: Arc<Liveness>,
    pub(super) sample_group: bool,
    pub(super) abort: CancellationToken,
    pub(super) span: tracing::Span,
    /// Ids this loop holds: claimed for a retry, running, or being dead-lettered. A due
    /// retry or a claimed entry that is here must not start a second run.
    pub(super) busy: HashMap<String, Busy>,
    pub(super) retries: RetryQueue,
    /// Per-key order (`order_by`): entries waiting behind their key.
    pub(super) order: Option<Order>,
    /// `order_scope = "group"`: keys held across the group.
    pub(super) group: Option<Group>,
    pub(super) claims: JoinSet<Claimed>,
    pub(super) writes: JoinSet<String>,
    /// Refreshes and samples: dropped (aborted) when the loop ends.
    pub(super) chores: JoinSet<()>,
    /// Some(cursor) while we are still working through our own pending list.
    pub(super) backlog_cursor: Option<String>,
    /// Some(cursor) while an XAUTOCLAIM scan of the group's pending list is under way.
    pub(super) claim_cursor: Option<String>,
    /// Set when the reader's connection was lost: a read's reply may have been lost
    /// with it, after Redis delivered the entries to us.
    pub(super) lost_scan: bool,
    pub(super) read_backoff: Backoff,
    /// Set once the loop stops reading: nothing new starts.
    pub(super) stopping: bool,
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
        let who = Consumer::new(&cfg.name, &cfg.group, consumer);
        let span = tracing::info_span!("stream", stream = %who.stream, group = %who.group, consumer = %who.name);
        // Tasks the acker and the executor start belong to this stream's span.
        let _in_span = span.enter();
        let lease = Lease::new(&cfg, &who, reader.clone(), commands.clone());
        let cmds = StreamCommands::new(commands, who.clone());
        let reader = StreamCommands::new(reader, who.clone());
        let reconnects = reader.reconnects();
        let (acker, ack_task) = Acker::spawn(cmds.clone(), lease.clone(), hooks.metrics.clone());
        let abort = shutdown.abort_token().clone();
        let (executor, done_rx) = Executor::new(&cfg, &who, abort.clone());
        drop(_in_span);
        StreamLoop {
            slots: executor.slots(),
            executor: Arc::new(executor),
            done_rx,
            cmds,
            reader: Arc::new(reader),
            acker,
            ack_task,
            reconnects,
            metrics: hooks.metrics,
            health: hooks.health,
            liveness: hooks.liveness,
            sample_group: hooks.sample_group,
            abort,
            span,
            busy: HashMap::new(),
            retries: RetryQueue::default(),
            order: cfg
                .order
                .as_ref()
                .map(|o| Order::new(o.key.clone(), &cfg.payload_field, o.waiting_max)),
            group: lease.map(Group::new),
            claims: JoinSet::new(),
            writes: JoinSet::new(),
            chores: JoinSet::new(),
            backlog_cursor: Some("0".to_owned()),
            claim_cursor: None,
            lost_scan: false,
            read_backoff: Backoff::redis(),
            stopping: false,
            cfg,
        }
    }

    /// Creates the consumer group if it is missing, retrying through Redis errors until it
    /// works or shutdown begins. A key of another type (WRONGTYPE) is not retried.
    pub async fn create_group(&self, shutdown: &Shutdown) -> Result<(), RedisError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let cfg = &self.cfg;
        loop {
            match self.ensure_group().await {
                Ok(()) => return Ok(()),
                Err(error) if error.is_wrongtype() => {
                    tracing::error!(stream = %cfg.name, %error, "the stream's key holds another type of value");
                    return Err(error);
                }
                Err(error) => {
                    let delay = backoff.fail();
                    tracing::warn!(stream = %cfg.name, %error, retry_in = ?delay, "cannot set up consumer group; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.stopping() => return Err(RedisError::Stopped),
                    }
                }
            }
        }
    }

    pub(super) async fn ensure_group(&self) -> Result<(), RedisError> {
        let cfg = &self.cfg;
        if self.cmds.ensure_group(&cfg.start_id).await? {
            tracing::info!(stream = %cfg.name, group = %cfg.group, start_id = %cfg.start_id, "created consumer group");
        }
        Ok(())
    }

    /// Runs until shutdown, then waits for running handlers and the last acks.
    /// (Not an `async fn`: that would keep a second copy of the loop in the task.)
    pub fn run(self, shutdown: Shutdown) -> impl std::future::Future<Output = ()> + Send {
        let span = self.span.clone();
        self.consume(shutdown).instrument(span)
    }

    async fn consume(mut self, shutdown: Shutdown) {
        tracing::info!(
            max_block_read = self.cfg.max_block_read,
            "consume loop started"
        );
        let mut timers = Timers::new(&self.cfg);
        let mut beat = tokio::time::interval(BEAT_INTERVAL);
        let mut claim = tokio::time::interval(self.cfg.claim_interval);
        claim.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let alive = self.liveness.register(self.cfg.name.clone());
        self.health.loop_started();
        let slots = self.slots.clone();
        loop {
            alive.beat();
            let slot = tokio::select! {
                biased;
                _ = shutdown.stopping() => break,
                _ = beat.tick() => continue,
                event = self.next_event(&mut timers) => {
                    self.handle(event);
                    continue;
                }
                _ = claim.tick() => {
                    Box::pin(recovery::reap_idle_consumers(&self.cmds, self.cfg.reap_idle)).await;
                    self.claim_cursor.get_or_insert_with(|| "0-0".to_owned());
                    continue;
                }
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let mut waits = Waits {
                timers: &mut timers,
                beat: &mut beat,
                alive: &alive,
            };
            if !self.read_round(slot, &shutdown, &mut waits).await {
                break;
            }
        }
        // No longer reading: not ready, and a long drain is no hang for the watchdog.
        // (Rarely taken paths are boxed: an idle loop's task is as large as its largest
        // state, and with a hundred streams that is resident memory.)
        self.health.loop_stopped();
        drop(alive);
        Box::pin(self.drain(timers)).await;
    }

    /// The next report, finished background step or timer tick. Never resolves when
    /// there is none (the caller selects on other things too).
    pub(super) async fn next_event(&mut self, timers: &mut Timers) -> Event {
        tokio::select! {
            Some(done) = self.done_rx.recv() => Event::Done(done),
            Some(claimed) = self.claims.join_next(), if !self.claims.is_empty() => Event::Claimed(claimed),
            Some(written) = self.writes.join_next(), if !self.writes.is_empty() => Event::Written(written),
                        Some(_) = self.chores.join_next(), if !self.chores.is_empty() => Event::Chore,
            Some(renewed) = Group::next_renewal(&mut self.group) => Event::Renewed(renewed),
            _ = timers.refresh.tick() => Event::Refresh,
            _ = timers.sample.tick(), if self.sample_group => Event::Sample,
        }
    }

    pub(super) fn handle(&mut self, event: Event) {
        match event {
            Event::Done(done) => {
                self.finished(done);
                // Reports come in bursts (a worker's pipelined replies, a batch of
                // handlers): settle what is queued now, not one select round each.
                while let Ok(done) = self.done_rx.try_recv() {
                    self.finished(done);
                }
            }
            Event::Claimed(Ok(claimed)) => self.claimed(claimed),
            Event::Written(Ok(id)) => {
                self.busy.remove(&id);
                if let Some(key) = self.released(&id) {
                    self.acker.release(id, key);
                }
            }
            Event::Claimed(Err(error)) | Event::Written(Err(error)) => {
                // Claims are cancelled on purpose when the loop stops.
                if !error.is_cancelled() {
                    tracing::error!(%error, "entry task failed; its entry stays pending");
                }
            }
            Event::Refresh => self.refresh(),
            Event::Sample => self.sample(),
            Event::Chore => {}
            Event::Renewed(Ok(lost)) => self.leases_lost(lost),
            Event::Renewed(Err(error)) => {
                if !error.is_cancelled() {
                    tracing::error!(%error, "lease renewal task failed");
                }
            }
        }
    }

    /// Takes a delivered entry: one slot, then admitted, run or settled at once.
    pub(super) fn take(
        &mut self,
        entry: Entry,
        attempt: u64,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) {
        if self.busy.contains_key(&entry.id)
            || self.order.as_ref().is_some_and(|o| o.is_waiting(&entry.id))
        {
            tracing::debug!(id = %entry.id, "already running; skipping duplicate delivery");
            return;
        }
        // A read never returns more entries than it asked for, and it asked for one per
        // permit; if Redis ever did, the extra entry stays pending for a later round.
        let Some(slot) = permits.pop() else {
            tracing::warn!(id = %entry.id, "read returned more entries than requested; leaving it pending");
            return;
        };
        if self.group.is_some() {
            // Counted as read once decided ours (it may be handed over).
            return self.defer_admission(entry, attempt, slot);
        }
        self.metrics.read(1);
        let Some(order) = &mut self.order else {
            return self.start(entry, attempt, slot);
        };
        match order.admit(entry, attempt) {
            Admitted::Run {
                entry,
                attempt,
                keyed,
            } => {
                if !keyed {
                    self.metrics.order_unkeyed();
                }
                self.start(entry, attempt, slot);
            }
            // It waits without its slot: a hot key does not hold up other keys' reads.
            Admitted::Queued => {
                tracing::debug!("entry waits for the entry before it with the same key")
            }
        }
        self.order_changed();
    }

    /// The entry `id` is settled for good (acked, dead-lettered, deleted, or another
    /// consumer's now): the next entry of its key, if any, may run. In group scope,
    /// returns the key it held, to release from the key's lease in Redis.
    fn released(&mut self, id: &str) -> Option<Bytes> {
        let order = self.order.as_mut()?;
        let key = match &self.group {
            Some(_) => order.key_held_by(id).cloned(),
            None => None,
        };
        order.settled(id);
        self.start_ready(&mut Vec::new());
        key
    }

    /// Starts entries whose key came free, with `permits` first, then free slots.
    pub(super) fn start_ready(&mut self, permits: &mut Vec<OwnedSemaphorePermit>) {
        while !self.stopping {
            let Some(order) = &mut self.order else { return };
            if !order.has_ready() {
                break;
            }
            let Some(slot) = permits
                .pop()
                .or_else(|| self.slots.clone().try_acquire_owned().ok())
            else {
                break;
            };
            let Some((entry, attempt, waited)) = order.next_ready() else {
                break;
            };
            tracing::debug!(id = %entry.id, waited_ms = waited.as_millis() as u64, "the entry before it with the same key is done; starting");
            self.metrics.order_waited(waited);
            self.start(entry, attempt, slot);
        }
        self.order_changed();
    }

    /// Updates the ordering gauges.
    pub(super) fn order_changed(&self) {
        if let Some(order) = &self.order {
            self.metrics.set_order(order.waiting(), order.keys_held());
        }
    }

    /// Starts attempt `attempt` at `entry` with `slot`, or settles it when it cannot run.
    pub(super) fn start(&mut self, entry: Entry, attempt: u64, slot: OwnedSemaphorePermit) {
        match settle::admit(&self.cfg, &entry, attempt) {
            Admit::Run(payload) => {
                self.metrics.in_flight_inc();
                self.executor.submit(Job {
                    id: entry.id.clone(),
                    attempt,
                    payload,
                    slot,
                });
                self.busy.insert(entry.id.clone(), Busy::Running(entry));
            }
            Admit::Deleted => {
                self.busy.remove(&entry.id);
                let key = self.released(&entry.id);
                self.deleted(
                    &entry.id,
                    "entry was deleted from the stream while pending; acking it away",
                );
                self.acker.ack_and_release(entry.id, key);
            }
            // The slot is held until the write is done, as a run would hold it.
            Admit::DeadLetter(failure) => self.dead_letter(entry, failure, Some(slot)),
        }
    }

    /// Settles the entry of a finished job.
    fn finished(&mut self, done: Done) {
        let Some(Busy::Running(entry)) = self.busy.remove(&done.id) else {
            tracing::error!(id = %done.id, "report for an entry that is not running; ignoring it");
            return;
        };
        self.metrics.in_flight_dec();
        if done.report.outcome != Outcome::Aborted {
            self.metrics.handler_duration(done.report.elapsed);
        }
        let (id, attempt) = (done.id, done.attempt);
        let elapsed_ms = done.report.elapsed.as_millis() as u64;
        match settle::after_run(&self.cfg, attempt, done.report) {
            Settle::Ack => {
                // debug, not info: one line per success is most of a busy daemon's log
                // volume and measurable per-entry cost; successes are counted in metrics.
                tracing::debug!(%id, attempt, elapsed_ms, "handled");
                let key = self.released(&id);
                self.acker.ack_and_release(id, key);
            }
            Settle::KeepPending => {
                tracing::warn!(%id, attempt, elapsed_ms, "handler terminated by shutdown; entry stays pending");
            }
            Settle::Retry { delay, reason } => {
                self.metrics.failed_attempt();
                tracing::warn!(%id, attempt, elapsed_ms, %reason, retry_in = ?delay, "attempt failed");
                self.metrics.retry();
                if !self.stopping {
                    self.retries.push(id, Instant::now() + delay, Retry::Claim);
                }
            }
            Settle::Wait { delay, reason } => {
                self.metrics.resource_wait();
                tracing::warn!(%id, attempt, elapsed_ms, %reason, retry_in = ?delay, "cannot start the handler for want of resources; the entry waits without using an attempt");
                if !self.stopping {
                    self.busy.insert(id.clone(), Busy::Claiming);
                    self.retries
                        .push(id, Instant::now() + delay, Retry::Rerun { entry, attempt });
                }
            }
            Settle::DeadLetter(failure) => {
                self.metrics.failed_attempt();
                self.dead_letter(entry, failure, None);
            }
        }
    }

    /// Writes `entry` to the DLQ (and acks it) in a task of its own.
    fn dead_letter(&mut self, entry: Entry, failure: Failure, slot: Option<OwnedSemaphorePermit>) {
        self.busy.insert(entry.id.clone(), Busy::DeadLettering);
        let (cmds, dlq, abort) = (self.cmds.clone(), self.cfg.dlq.clone(), self.abort.clone());
        let metrics = self.metrics.clone();
        self.writes.spawn(
            async move {
                if dlq::dead_letter(&cmds, &dlq, &entry, &failure, &abort).await {
                    metrics.dead_lettered();
                }
                drop(slot);
                entry.id
            }
            .in_current_span(),
        );
    }

    /// Logs an entry that vanished from the stream while we held it, and counts it.
    pub(super) fn deleted(&self, id: &str, what: &'static str) {
        self.metrics.deleted_entry();
        tracing::warn!(%id, "{what}");
    }

    /// Starts the retries that are due, one free slot each.
    pub(super) fn start_due_retries(&mut self, permits: &mut Vec<OwnedSemaphorePermit>) {
        let now = Instant::now();
        while !permits.is_empty() {
            let Some((id, retry)) = self.retries.pop_due(now) else {
                break;
            };
            match retry {
                Retry::Rerun { entry, attempt } => {
                    let Some(slot) = permits.pop() else { break };
                    self.start(entry, attempt, slot);
                }
                Retry::Claim => {
                    if self.busy.contains_key(&id) {
                        continue;
                    }
                    let Some(slot) = permits.pop() else { break };
                    self.busy.insert(id.clone(), Busy::Claiming);
                    let cmds = self.cmds.clone();
                    self.claims
                        .spawn(recovery::claim_for_retry(cmds, id, slot).in_current_span());
                }
            }
        }
    }

    /// A due retry's claim came back.
    fn claimed(&mut self, claimed: Claimed) {
        match claimed {
            Claimed::Entry {
                entry,
                attempt,
                slot,
            } if !self.stopping => self.start(entry, attempt, slot),
            // Claimed but stopping: it is ours and pending; the next start runs it.
            Claimed::Entry { entry, .. } => {
                self.busy.remove(&entry.id);
            }
            Claimed::Gone { id } => {
                self.busy.remove(&id);
                self.deleted(
                    &id,
                    "entry was deleted from the stream while waiting for its retry",
                );
                if let Some(key) = self.released(&id) {
                    self.acker.release(id, key);
                }
            }
            Claimed::NotOurs { id } => {
                self.busy.remove(&id);
                if let Some(key) = self.released(&id) {
                    self.acker.release(id, key);
                }
            }
            Claimed::Failed { id } => {
                self.busy.remove(&id);
                if !self.stopping {
                    let due = Instant::now() + recovery::RECLAIM_DELAY;
                    self.retries.push(id, due, Retry::Claim);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The loop inside the test process, against a real redis-server: no binary, no CLI.

    use std::time::Duration;

    use fred::prelude::{Client, KeysInterface, StreamsInterface};

    use super::*;
    use crate::config::RedisConfig;
    use crate::ops::metrics::Metrics;
    use crate::redis;
    use crate::test_support::RedisServer;

    /// Polls `cond` every 50 ms for up to a minute (a busy machine is slow, never wrong).
    async fn eventually<F, Fut>(what: &str, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn pending(client: &Client) -> u64 {
        let summary: Vec<fred::types::Value> =
            client.xpending("s", "g", ()).await.expect("XPENDING");
        summary.first().and_then(|v| v.as_u64()).unwrap_or(u64::MAX)
    }

    /// Hooks for a loop of stream `s`, group `g`, with nobody watching.
    fn hooks() -> LoopHooks {
        LoopHooks {
            metrics: Metrics::new().stream("s", "g"),
            health: Health::new(1),
            liveness: Liveness::new(),
            sample_group: false,
        }
    }

    /// An idle loop's task is as large as its largest state, for every configured stream:
    /// rarely taken paths (and fred's large command futures) are boxed to keep it small.
    #[tokio::test]
    async fn an_idle_loop_task_stays_small() {
        let server = RedisServer::start();
        let redis_cfg = RedisConfig::for_tests(&server.url());
        let shutdown = Shutdown::new();
        let commands = redis::connect(&redis_cfg, shutdown.stop_token())
            .await
            .expect("connect");
        let reader = commands.clone_new();
        let cfg = StreamConfig::for_tests(&["/bin/true"]);
        let stream_loop = StreamLoop::new(cfg, "t", commands, reader, &shutdown, hooks());
        let task = stream_loop.run(shutdown);
        let size = std::mem::size_of_val(&task);
        assert!(size < 6 * 1024, "the loop's future takes {size} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_successes_retries_and_dead_letters_failures() {
        let server = RedisServer::start();
        let redis_cfg = RedisConfig::for_tests(&server.url());
        let shutdown = Shutdown::new();
        let commands = redis::connect(&redis_cfg, shutdown.stop_token())
            .await
            .expect("connect");
        let reader = redis::connect(&redis_cfg, shutdown.stop_token())
            .await
            .expect("connect reader");
        for payload in ["a", "bad", "b", "c"] {
            let _: String = commands
                .xadd("s", false, None, "*", vec![("payload", payload)])
                .await
                .expect("XADD");
        }
        let cfg = StreamConfig {
            start_id: "0".into(),
            block: Duration::from_millis(100),
            max_attempts: 2,
            retry_backoff: Duration::from_millis(10),
            ..StreamConfig::for_tests(&["/bin/sh", "-c", "read -r p; [ \"$p\" != bad ]"])
        };
        let stream_loop = StreamLoop::new(cfg, "t", commands.clone(), reader, &shutdown, hooks());
        stream_loop.create_group(&shutdown).await.expect("group");
        let running = tokio::spawn(stream_loop.run(shutdown.clone()));

        let c = &commands;
        eventually("3 acked, 1 dead-lettered after 2 attempts", || async move {
            let dlq: u64 = c.xlen("s:dlq").await.unwrap_or(0);
            dlq == 1 && pending(c).await == 0
        })
        .await;
        let dead: Vec<fred::types::Value> = commands
            .xrange("s:dlq", "-", "+", None)
            .await
            .expect("XRANGE");
        let text = format!("{dead:?}");
        assert!(
            text.contains("exit code 1") && text.contains("dlq_attempts"),
            "{text}"
        );

        shutdown.stop();
        tokio::time::timeout(Duration::from_secs(60), running)
            .await
            .expect("the loop stops")
            .expect("the loop task ends cleanly");
        let _: i64 = commands.del("s").await.expect("DEL");
    }
}
