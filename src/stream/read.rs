//! The read side of a consume loop: one round per free read slot (due retries, ready
//! ordered entries, lost deliveries, claims, then `XREADGROUP` for the rest), and the
//! blocking read itself, during which reports, background steps and timers are still
//! handled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::time::{Instant, Interval};

use crate::ops::notify::Heartbeat;
use crate::ops::shutdown::Shutdown;
use crate::redis::{Entry, RedisError};
use crate::stream::consume::{StreamLoop, Timers};
use crate::stream::recovery;

/// How long worker mode waits for more free slots before a read (see
/// [`Executor::batches_reads`]).
const READ_LINGER: Duration = Duration::from_millis(1);

/// What a read waits with: the event timers and the watchdog beat.
pub(super) struct Waits<'a> {
    pub(super) timers: &'a mut Timers,
    pub(super) beat: &'a mut Interval,
    pub(super) alive: &'a Heartbeat,
}

/// Sleeps until `at`, or forever when `None`.
pub(super) async fn sleep_until_some(at: Option<Instant>) {
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
impl StreamLoop {
    /// One round with at least one free slot: start due retries, recover, claim, then
    /// read as many entries as there are free slots and start them. `false` at shutdown.
    pub(super) async fn read_round(
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
            // Boxed, as every rarely taken path here: an idle loop's task is as large as
            // its largest state.
            let want = self.executor.slot_count().div_ceil(2);
            Box::pin(gather_slots(&self.slots, &mut permits, want)).await;
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
                return Box::pin(self.wait_for_room(shutdown, waits)).await;
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
                    Box::pin(self.reader.unblock()).await;
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
}
