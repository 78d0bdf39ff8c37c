//! One stream's consume loop: the state of one (stream, group, consumer) in one struct,
//! and a `run` that only waits for the next event and dispatches it.
//!
//! Events: a free read slot (read and start entries), an executor report (settle the
//! entry), a finished background step (a retry's claim, a DLQ write), and timers (claim
//! scan, refreshing the entries we hold, sampling the group). Redis work that may take
//! long runs as tasks; their results come back as events, so the loop alone changes its
//! state and never waits on Redis while entries are waiting to be settled.

use std::collections::HashMap;
use std::future::Future;
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
use crate::ops::metrics::{Health, StreamMetrics};
use crate::ops::notify::{Heartbeat, Liveness};
use crate::ops::shutdown::Shutdown;
use crate::redis::{Entry, RedisError, StreamCommands};
use crate::stream::ack::{AckTask, Acker};
use crate::stream::dlq::{self, Failure};
use crate::stream::group::Group;
use crate::stream::lease::Lease;
use crate::stream::order::{Admitted, Order};
use crate::stream::recovery::{self, Claimed};
use crate::stream::retry::{Retry, RetryQueue};
use crate::stream::settle::{self, Admit, Settle};

/// How long the final acks may take once every handler is done, when Redis is slow or
/// down; after that, the unacked entries stay pending and are handled again later.
pub const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// How long each goodbye to Redis (leaving the group, closing the reader) may take.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often lag and pending count are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a waiting loop proves to the watchdog that it is alive.
const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How long worker mode waits for more free slots before a read (see
/// [`Executor::batches_reads`]).
const READ_LINGER: Duration = Duration::from_millis(1);

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
struct Timers {
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

/// What a read waits with: the event timers and the watchdog beat.
pub(super) struct Waits<'a> {
    timers: &'a mut Timers,
    beat: &'a mut Interval,
    alive: &'a Heartbeat,
}

/// Something the loop reacts to.
enum Event {
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
    reader: Arc<StreamCommands>,
    executor: Arc<Executor>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Entries this stream may hold (owned and sized by the executor).
    pub(super) slots: Arc<Semaphore>,
    pub(super) acker: Acker,
    ack_task: AckTask,
    /// Reconnects of the reader's connection (see [`StreamLoop::recover_lost`]).
    reconnects: broadcast::Receiver<fred::types::config::Server>,
    pub(super) metrics: StreamMetrics,
    health: Arc<Health>,
    liveness: Arc<Liveness>,
    sample_group: bool,
    abort: CancellationToken,
    span: tracing::Span,
    /// Ids this loop holds: claimed for a retry, running, or being dead-lettered. A due
    /// retry or a claimed entry that is here must not start a second run.
    pub(super) busy: HashMap<String, Busy>,
    pub(super) retries: RetryQueue,
    /// Per-key order (`order_by`): entries waiting behind their key.
    pub(super) order: Option<Order>,
    /// `order_scope = "group"`: keys held across the group.
    pub(super) group: Option<Group>,
    claims: JoinSet<Claimed>,
    writes: JoinSet<String>,
    /// Refreshes and samples: dropped (aborted) when the loop ends.
    chores: JoinSet<()>,
    /// Some(cursor) while we are still working through our own pending list.
    backlog_cursor: Option<String>,
    /// Some(cursor) while an XAUTOCLAIM scan of the group's pending list is under way.
    claim_cursor: Option<String>,
    /// Set when the reader's connection was lost: a read's reply may have been lost
    /// with it, after Redis delivered the entries to us.
    pub(super) lost_scan: bool,
    pub(super) read_backoff: Backoff,
    /// Set once the loop stops reading: nothing new starts.
    stopping: bool,
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

    async fn ensure_group(&self) -> Result<(), RedisError> {
        let cfg = &self.cfg;
        if self.cmds.ensure_group(&cfg.start_id).await? {
            tracing::info!(stream = %cfg.name, group = %cfg.group, start_id = %cfg.start_id, "created consumer group");
        }
        Ok(())
    }

    /// Runs until shutdown, then waits for running handlers and the last acks.
    pub async fn run(self, shutdown: Shutdown) {
        let span = self.span.clone();
        self.consume(shutdown).instrument(span).await;
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
    async fn next_event(&mut self, timers: &mut Timers) -> Event {
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

    fn handle(&mut self, event: Event) {
        match event {
            Event::Done(done) => self.finished(done),
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

    /// One round with at least one free slot: start due retries, recover, claim, then
    /// read as many entries as there are free slots and start them. `false` at shutdown.
    async fn read_round(
        &mut self,
        first: OwnedSemaphorePermit,
        shutdown: &Shutdown,
        waits: &mut Waits<'_>,
    ) -> bool {
        let mut permits = vec![first];
        while let Ok(more) = self.slots.clone().try_acquire_owned() {
            permits.push(more);
        }
        if self.executor.batches_reads() && !(self.claims.is_empty() && self.writes.is_empty()) {
            gather_slots(
                &self.slots,
                &mut permits,
                self.executor.slot_count().div_ceil(2),
            )
            .await;
        }
        self.start_due_retries(&mut permits);
        self.start_ready(&mut permits);
        self.lost_scan |= self.reconnected();
        if self.lost_scan && self.backlog_cursor.is_none() && !permits.is_empty() {
            self.lost_scan = Box::pin(self.recover_lost(&mut permits)).await;
        }
        if self.backlog_cursor.is_none()
            && let Some(cursor) = self.claim_cursor.take()
        {
            self.claim_cursor = Box::pin(self.claim_round(&cursor, &mut permits)).await;
        }
        // Group scope: entries recovered or claimed above are decided before the read.
        if !Box::pin(self.admit_deferred(shutdown, waits)).await {
            return false;
        }
        // With per-key order, a read may bring entries that wait behind their key: read
        // no more than there is room for them.
        let count = match &self.order {
            Some(order) => permits.len().min(order.room()),
            None => permits.len(),
        };
        if count == 0 {
            if !permits.is_empty() {
                // Every slot could run, but the waiting room is full: wait for a change.
                return self.wait_for_room(shutdown, waits).await;
            }
            return true;
        }
        if self.group.is_some() && self.backlog_cursor.is_none() {
            return Box::pin(self.group_read(count, &mut permits, shutdown, waits)).await;
        }
        let Some(read) = self.read(count, shutdown, waits).await else {
            return false;
        };
        let entries = match read {
            Ok(entries) => {
                self.read_backoff.reset();
                entries
            }
            Err(error) => {
                self.lost_scan = true;
                Box::pin(self.read_failed(error, shutdown)).await;
                return true;
            }
        };
        if self.backlog_cursor.is_none() {
            for entry in entries {
                // A fresh delivery (`>`) always has delivery count 1.
                self.take(entry, 1, &mut permits);
            }
            return true;
        }
        match Box::pin(recovery::attempt_numbers(&self.cmds, &entries)).await {
            Ok(attempts) => {
                self.backlog_cursor = entries.last().map(|e| e.id.clone());
                if self.backlog_cursor.is_none() {
                    tracing::debug!("own pending entries done; reading new ones");
                }
                for entry in entries {
                    let attempt = attempts.get(&entry.id).copied().unwrap_or(1);
                    self.take(entry, attempt, &mut permits);
                }
                // Group scope: they are decided now (they hold slots meanwhile).
                return Box::pin(self.admit_deferred(shutdown, waits)).await;
            }
            // The read bumped their counters; they stay pending and the cursor stays
            // put, so the next round reads them again.
            Err(error) => Box::pin(self.read_failed(error, shutdown)).await,
        }
        true
    }

    /// Reads up to `count` entries: our own pending ones while the backlog lasts, then new
    /// ones with BLOCK. While the read blocks, reports and background steps are handled;
    /// a retry that falls due before the read would return interrupts it (CLIENT UNBLOCK
    /// ... TIMEOUT: it returns as if timed out, delivering nothing), so a retry is never
    /// late by up to `block`. `None` at shutdown.
    async fn read(
        &mut self,
        count: usize,
        shutdown: &Shutdown,
        waits: &mut Waits<'_>,
    ) -> Option<Result<Vec<Entry>, RedisError>> {
        let (id, block) = match &self.backlog_cursor {
            Some(cursor) => (cursor.clone(), None),
            None => (">".to_owned(), Some(self.block_for())),
        };
        let reader = self.reader.clone();
        let read = async move { reader.read(count, block, &id).await };
        self.on_reader(read, block, shutdown, waits).await
    }

    /// Waits for `call` on the reader's connection, handling reports, background steps
    /// and timers meanwhile; `block` is how long it may block in Redis, if it does (see
    /// [`StreamLoop::read`]). `None` at shutdown.
    pub(super) async fn on_reader<T>(
        &mut self,
        call: impl Future<Output = T>,
        block: Option<Duration>,
        shutdown: &Shutdown,
        waits: &mut Waits<'_>,
    ) -> Option<T> {
        let ends = block.map(|block| Instant::now() + block);
        // Boxed: an idle loop waits here, and its task is as large as this state.
        let mut read = Box::pin(call);
        let mut wake_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                r = &mut read => return Some(r),
                // Dropping the read is safe: anything it delivered is in our pending
                // list and is picked up by the next start (or another consumer's claim).
                _ = shutdown.stopping() => return None,
                event = self.next_event(waits.timers) => self.handle(event),
                _ = waits.beat.tick() => waits.alive.beat(),
                _ = sleep_until_some(wake_at) => {
                    wake_at = None;
                    self.reader.unblock().await;
                }
            }
            if let (Some(ends), Some(due)) = (ends, self.retries.next_due())
                && due < ends
                && wake_at.is_none_or(|w| due < w)
            {
                wake_at = Some(due);
            }
        }
    }

    /// Waits (holding the round's slots) until something happens that may make room for
    /// waiting entries, or a retry falls due. `false` at shutdown.
    async fn wait_for_room(&mut self, shutdown: &Shutdown, waits: &mut Waits<'_>) -> bool {
        let due = self.retries.next_due();
        tokio::select! {
            _ = shutdown.stopping() => return false,
            event = self.next_event(waits.timers) => self.handle(event),
            _ = waits.beat.tick() => waits.alive.beat(),
            _ = sleep_until_some(due) => {}
        }
        true
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
    fn start_due_retries(&mut self, permits: &mut Vec<OwnedSemaphorePermit>) {
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

    /// Keeps the entries we hold fresh (idle time reset) every `claim_idle / 3`, so other
    /// consumers' XAUTOCLAIM never takes an entry whose handler is healthy. Entries whose
    /// ack is not confirmed yet (Redis was away) and reruns waiting for resources are ours
    /// too.
    fn refresh(&mut self) {
        let mut ids: Vec<String> = self.busy.keys().cloned().collect();
        ids.extend(self.retries.reruns().cloned());
        if self.group.is_some() {
            // Group scope: entries of held keys are kept fresh with their leases.
            self.renew_leases(&mut ids);
        } else if let Some(order) = &self.order {
            ids.extend(order.waiting_ids().cloned());
        }
        ids.extend(self.acker.unconfirmed());
        if ids.is_empty() {
            return;
        }
        let cmds = self.cmds.clone();
        self.chores.spawn(
            async move {
                if let Err(error) = Box::pin(cmds.touch(ids)).await {
                    tracing::warn!(%error, "cannot refresh running entries (XCLAIM JUSTID)");
                }
            }
            .in_current_span(),
        );
    }

    /// Samples the group's pending count and lag into the metrics.
    fn sample(&mut self) {
        let (cmds, metrics) = (self.cmds.clone(), self.metrics.clone());
        self.chores.spawn(
            async move {
                match Box::pin(cmds.group_stats()).await {
                    Ok(Some((pending, lag))) => {
                        metrics.set_pending(i64::try_from(pending).unwrap_or(i64::MAX));
                        // Unknown lag (Redis cannot tell after some trims) is exported as -1.
                        metrics.set_lag(lag.and_then(|l| i64::try_from(l).ok()).unwrap_or(-1));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::debug!(%error, "XINFO GROUPS failed"),
                }
            }
            .in_current_span(),
        );
    }

    /// How long the next `>` read may block: `block`, but no longer than until the next
    /// retry is due.
    pub(super) fn block_for(&mut self) -> Duration {
        let block = self.cfg.block;
        match self.retries.next_due() {
            Some(due) => block
                .min(due.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1)),
            None => block,
        }
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

    pub(super) async fn read_failed(&mut self, error: RedisError, shutdown: &Shutdown) {
        let delay = self.read_backoff.fail();
        if error.is_nogroup() {
            tracing::warn!("consumer group is gone (NOGROUP); recreating it");
            if let Err(error) = self.ensure_group().await {
                tracing::warn!(%error, "recreating the consumer group failed");
            }
        } else {
            tracing::warn!(%error, retry_in = ?delay, "XREADGROUP failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.stopping() => {}
        }
    }

    /// After stop: no reads; running handlers finish (or are aborted by the shutdown
    /// clock); waiting retries are dropped and stay pending for the next start.
    async fn drain(mut self, mut timers: Timers) {
        self.stopping = true;
        // Claims under way and waiting retries are dropped: their entries are ours and
        // pending, and the next start (or another consumer's claim) runs them.
        self.retries.clear();
        self.claims.abort_all();
        self.busy
            .retain(|_, b| !matches!(b, Busy::Claiming | Busy::Admitting));
        let held_keys = self.stop_holding();
        if let Some(order) = &mut self.order {
            let waiting = match self.group {
                // Running entries keep their keys until settled: their acks release them.
                Some(_) => order.clear_waiting(),
                None => order.clear(),
            };
            if waiting > 0 {
                tracing::info!(
                    waiting,
                    "entries waiting for their key stay pending for the next start"
                );
            }
            self.order_changed();
        }
        let running = self
            .busy
            .values()
            .filter(|b| matches!(b, Busy::Running(_)))
            .count();
        if running > 0 {
            tracing::info!(running, "waiting for running handlers");
        }
        let executor = self.executor.clone();
        let mut stopped = std::pin::pin!(async move { executor.shutdown().await });
        let mut executor_done = false;
        while !executor_done || !self.busy.is_empty() {
            tokio::select! {
                () = &mut stopped, if !executor_done => executor_done = true,
                event = self.next_event(&mut timers) => self.handle(event),
            }
        }
        self.chores.abort_all();
        let StreamLoop {
            cmds,
            acker,
            ack_task,
            reader,
            group,
            ..
        } = self;
        // Dropping the last Acker lets the ack task flush and end.
        drop(acker);
        if let Err(left) = ack_task.finish(FINAL_FLUSH).await {
            tracing::error!(
                unacked = left.len(),
                ids = %preview(&left),
                "final acks did not reach redis in time; those entries stay pending and will run again"
            );
        }
        let goodbye = async {
            if let Some(group) = &group {
                group.expire(held_keys).await;
            }
            recovery::leave_group_if_idle(&cmds).await;
            reader.quit().await;
        };
        if tokio::time::timeout(GOODBYE_TIMEOUT * 2, goodbye)
            .await
            .is_err()
        {
            tracing::warn!("redis did not answer the goodbye in time");
        }
        tracing::info!("consume loop stopped");
    }
}

/// The first few of `ids`, for a log line.
fn preview(ids: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = ids
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if ids.len() > SHOWN {
        text.push_str(",…");
    }
    text
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

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
