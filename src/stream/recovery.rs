//! Getting back entries that are ours or nobody's: the lost deliveries of a dropped
//! connection, entries idle past `claim_idle` (XAUTOCLAIM), a due retry's claim, and
//! consumers that left without a goodbye.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::redis::{Entry, RedisError, StreamCommands};
use crate::stream::consume::StreamLoop;
use crate::stream::retry::RetryQueue;

/// How many of our own pending entries one scan for lost deliveries looks at.
const LOST_SCAN_ROWS: usize = 1000;

/// How long a retry waits when its claim failed on a Redis error.
pub(super) const RECLAIM_DELAY: Duration = Duration::from_secs(1);

/// Whether an entry that Redis hands (back) to us is one the loop already has in hand:
/// running, being settled, waiting for its retry, or acked but not yet confirmed. Such an
/// entry must not start a second run.
pub(super) fn in_hand(
    id: &str,
    busy: impl Fn(&str) -> bool,
    retries: &RetryQueue,
    acking: impl Fn(&str) -> bool,
) -> bool {
    busy(id) || retries.contains(id) || acking(id)
}

impl StreamLoop {
    pub(super) fn is_in_hand(&self, id: &str) -> bool {
        in_hand(
            id,
            |id| {
                self.busy.contains_key(id) || self.order.as_ref().is_some_and(|o| o.is_waiting(id))
            },
            &self.retries,
            |id| self.acker.is_settling(id),
        )
    }

    /// After the reader's connection was lost, a read whose reply never arrived may have
    /// delivered entries to us: they are in our pending list, but the loop never saw
    /// them. Waiting for `claim_idle` would delay them and cost them an attempt, so they
    /// are picked up here: every pending entry of ours that is not in hand is taken as it
    /// is (XCLAIM JUSTID, so the lost delivery counts as this attempt) and its fields read
    /// with XRANGE. Returns whether to scan again.
    pub(super) async fn recover_lost(&mut self, permits: &mut Vec<OwnedSemaphorePermit>) -> bool {
        let rows = match self.cmds.my_pending("-", "+", LOST_SCAN_ROWS).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::debug!(%error, "cannot scan own pending entries yet");
                return true;
            }
        };
        for row in rows {
            if permits.is_empty() {
                return true;
            }
            if self.is_in_hand(&row.id) {
                continue;
            }
            let taken = self
                .cmds
                .reclaim_quietly(&row.id, Duration::from_millis(row.idle_ms))
                .await;
            let entry = match taken {
                Ok(true) => self.cmds.entry(&row.id).await,
                Ok(false) => continue,
                Err(error) => Err(error),
            };
            match entry {
                Ok(entry) => {
                    tracing::info!(id = %entry.id, "recovered an entry whose delivery was lost with the connection");
                    self.take(entry, row.deliveries.max(1), permits);
                }
                Err(error) => {
                    tracing::debug!(%error, "recovering own pending entries failed; trying again");
                    return true;
                }
            }
        }
        false
    }

    /// One XAUTOCLAIM page of at most one entry per free slot. Returns the cursor to
    /// continue from on the next round, or `None` when the scan of the pending list is
    /// complete (the next `claim_interval` tick starts a new one).
    pub(super) async fn claim_round(
        &mut self,
        cursor: &str,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) -> Option<String> {
        if permits.is_empty() {
            return Some(cursor.to_owned());
        }
        let claim = match self
            .cmds
            .autoclaim(self.cfg.claim_idle, cursor, permits.len())
            .await
        {
            Ok(claim) => claim,
            Err(error) => {
                tracing::warn!(%error, "XAUTOCLAIM failed; trying again next interval");
                return None;
            }
        };
        for id in &claim.deleted {
            self.deleted(
                id,
                "pending entry was deleted from the stream; redis dropped it from the pending list",
            );
        }
        let attempts = match Box::pin(attempt_numbers(&self.cmds, &claim.entries)).await {
            Ok(attempts) => attempts,
            Err(error) => {
                // Claimed but not started: they are ours now and idle again after
                // claim_idle, so the next scan (ours or another consumer's) takes them.
                tracing::warn!(%error, "cannot read delivery counts of claimed entries");
                return None;
            }
        };
        for entry in claim.entries {
            // XAUTOCLAIM does not look at the owner: it can return our own entries that
            // are waiting for a retry or for their ack. Those are handled already.
            if self.is_in_hand(&entry.id) {
                tracing::debug!(id = %entry.id, "claimed our own settled or retrying entry; leaving it be");
                continue;
            }
            tracing::info!(id = %entry.id, "claimed an entry idle for over claim_idle");
            let attempt = attempts.get(&entry.id).copied().unwrap_or(1);
            self.take(entry, attempt, permits);
        }
        (claim.next_cursor != "0-0").then_some(claim.next_cursor)
    }
}

/// Delivery counts (= attempt numbers) of entries just delivered to us, by id.
pub(super) async fn attempt_numbers(
    cmds: &StreamCommands,
    entries: &[Entry],
) -> Result<HashMap<String, u64>, RedisError> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(HashMap::new());
    };
    let rows = cmds.my_pending(&first.id, &last.id, entries.len()).await?;
    Ok(rows.into_iter().map(|r| (r.id, r.deliveries)).collect())
}

/// What came of a due retry's claim.
pub(super) enum Claimed {
    /// Ours again, its delivery counter bumped: run attempt `attempt` with `slot`.
    Entry {
        entry: Entry,
        attempt: u64,
        slot: OwnedSemaphorePermit,
    },
    /// Deleted from the stream meanwhile.
    Gone { id: String },
    /// No longer pending, or taken over by another consumer: theirs to run.
    NotOurs { id: String },
    /// Redis failed; try again later.
    Failed { id: String },
}

/// Takes a due retry's entry again if it is still ours (XCLAIM, which makes the next
/// attempt). Runs as a task: it waits on Redis.
pub(super) async fn claim_for_retry(
    cmds: StreamCommands,
    id: String,
    slot: OwnedSemaphorePermit,
) -> Claimed {
    let failed = |id: String, error: RedisError| {
        tracing::warn!(%id, %error, retry_in = ?RECLAIM_DELAY, "cannot claim entry for retry");
        Claimed::Failed { id }
    };
    let row = match cmds.pending_entry(&id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            tracing::debug!(%id, "no longer pending; nothing to retry");
            return Claimed::NotOurs { id };
        }
        Err(error) => return failed(id, error),
    };
    if row.consumer != cmds.who.name {
        tracing::info!(%id, owner = %row.consumer, "entry was taken over by another consumer; leaving the retry to it");
        return Claimed::NotOurs { id };
    }
    // min-idle = the idle time just seen: if anyone touched the entry since, no claim.
    match cmds.claim(&id, Duration::from_millis(row.idle_ms)).await {
        Ok(Some(entry)) => Claimed::Entry {
            entry,
            attempt: row.deliveries + 1,
            slot,
        },
        // Nothing claimed: the entry was deleted (XCLAIM then drops it from the pending
        // list) or someone touched it since we looked.
        Ok(None) => match cmds.entry(&id).await {
            Ok(entry) if entry.fields.is_none() => Claimed::Gone { id },
            // Touched by our own lease renewal (order_scope = "group" keeps a key's
            // retrying entry fresh) between the two steps: still ours, claim it again.
            Ok(_) if still_ours(&cmds, &id).await => {
                tracing::debug!(%id, "entry was refreshed while claimed for its retry; claiming it again");
                Claimed::Failed { id }
            }
            Ok(_) => {
                tracing::debug!(%id, "claimed elsewhere; nothing to retry");
                Claimed::NotOurs { id }
            }
            Err(error) => failed(id, error),
        },
        Err(error) => failed(id, error),
    }
}

/// Whether `id` is pending at our consumer (an error counts as no: the caller then leaves
/// the entry to whoever has it).
async fn still_ours(cmds: &StreamCommands, id: &str) -> bool {
    matches!(cmds.pending_entry(id).await, Ok(Some(row)) if row.consumer == cmds.who.name)
}

/// Removes other consumers that have been idle longer than `reap_idle` and hold no
/// pending entries (crashed or decommissioned workers that never said goodbye).
pub(super) async fn reap_idle_consumers(cmds: &StreamCommands, reap_idle: Duration) {
    let consumers = match cmds.consumers().await {
        Ok(consumers) => consumers,
        Err(error) => {
            tracing::debug!(%error, "XINFO CONSUMERS failed");
            return;
        }
    };
    let reap_ms = reap_idle.as_millis() as u64;
    for consumer in consumers {
        if consumer.name == cmds.who.name || consumer.pending > 0 || consumer.idle_ms < reap_ms {
            continue;
        }
        match cmds.delete_consumer(&consumer.name).await {
            Ok(_) => {
                tracing::info!(consumer = %consumer.name, idle_ms = consumer.idle_ms, "removed idle consumer with no pending entries")
            }
            Err(error) => tracing::debug!(%error, "XGROUP DELCONSUMER failed"),
        }
    }
}

/// On a clean stop, a consumer with nothing pending removes itself from the group so
/// `XINFO CONSUMERS` does not fill up with dead names. One with pending entries stays:
/// deleting it would drop those entries from the pending list.
pub(super) async fn leave_group_if_idle(cmds: &StreamCommands) {
    match cmds.my_pending("-", "+", 1).await {
        Ok(rows) if rows.is_empty() => match cmds.delete_consumer(&cmds.who.name).await {
            Ok(_) => tracing::info!("left the consumer group (nothing pending)"),
            Err(error) => tracing::debug!(%error, "XGROUP DELCONSUMER failed"),
        },
        Ok(_) => tracing::info!("entries still pending; staying in the group for recovery"),
        Err(error) => tracing::debug!(%error, "cannot check own pending entries"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::retry::Retry;
    use tokio::time::Instant;

    #[test]
    fn entries_in_hand_are_left_be() {
        let mut retries = RetryQueue::default();
        retries.push("retrying".into(), Instant::now(), Retry::Claim);
        let busy = |id: &str| id == "running";
        let acking = |id: &str| id == "acked";
        for id in ["running", "retrying", "acked"] {
            assert!(in_hand(id, busy, &retries, acking), "{id}");
        }
        assert!(!in_hand("new", busy, &retries, acking));
    }
}
