//! Batched, retried acknowledgements for one stream.
//!
//! Handler tasks hand over ids and move on; one task per stream turns them into `XACK`
//! batches. An ack that fails (Redis down, reconnect attempts used up) is kept and retried
//! with backoff until Redis confirms it, so an ack is never lost while the daemon lives.
//! On shutdown the batch is flushed once the last handler task has dropped its sender.
//!
//! With `order_scope = "group"` an entry that held an ordering key is acked together with
//! its release from the key's lease (the lease `done` step, [`Lease::done`]): the key is
//! free for other consumers only once the ack is in Redis. Entries settled otherwise
//! (dead-lettered, gone) are only released.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::ops::metrics::StreamMetrics;
use crate::redis::StreamCommands;
use crate::stream::lease::Lease;

/// Largest number of ids in one XACK.
const MAX_BATCH: usize = 512;

/// One settled entry for the ack task.
#[derive(Debug)]
enum Item {
    /// XACK it.
    Ack(String),
    /// XACK it and release it from the lease of its key (group scope).
    AckRelease(String, Bytes),
    /// Only release it from the lease of its key (it was acked otherwise, or is gone).
    Release(String, Bytes),
}

impl Item {
    fn acked_id(&self) -> Option<&String> {
        match self {
            Item::Ack(id) | Item::AckRelease(id, _) => Some(id),
            Item::Release(..) => None,
        }
    }
}

/// The sending side: cheap to clone, one per handler task.
#[derive(Clone, Debug)]
pub struct Acker {
    tx: mpsc::UnboundedSender<Item>,
    unconfirmed: Unconfirmed,
}

/// Ids handed to the acker that Redis has not confirmed yet: still in the pending list,
/// but settled, so nothing may run them again.
#[derive(Clone, Debug, Default)]
struct Unconfirmed(Arc<Mutex<HashSet<String>>>);

impl Unconfirmed {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Acker {
    /// Starts the ack task for `cmds`' stream and group (in the current tracing span),
    /// releasing keys through `lease` in group scope. The task ends when every `Acker`
    /// clone is dropped and all ids are acknowledged.
    pub(crate) fn spawn(
        cmds: StreamCommands,
        lease: Option<Lease>,
        metrics: StreamMetrics,
    ) -> (Acker, AckTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let unconfirmed = Unconfirmed::default();
        let flush = Flush { cmds, lease };
        let handle =
            tokio::spawn(ack_loop(flush, rx, unconfirmed.clone(), metrics).in_current_span());
        let task = AckTask {
            handle,
            unconfirmed: unconfirmed.clone(),
        };
        (Acker { tx, unconfirmed }, task)
    }

    /// Whether `id` is queued for XACK or its XACK is not confirmed yet.
    pub fn is_settling(&self, id: &str) -> bool {
        self.unconfirmed.set().contains(id)
    }

    /// The ids whose XACK Redis has not confirmed yet.
    pub fn unconfirmed(&self) -> Vec<String> {
        self.unconfirmed.set().iter().cloned().collect()
    }

    /// Queues `id` for XACK and, when it held the ordering key `key` (group scope), for
    /// its release from that key's lease in the same step.
    pub fn ack_and_release(&self, id: String, key: Option<Bytes>) {
        self.unconfirmed.set().insert(id.clone());
        let item = match key {
            Some(key) => Item::AckRelease(id, key),
            None => Item::Ack(id),
        };
        // The receiver lives until every sender is gone, so this cannot fail while we
        // hold `self`; if it ever did, the entry stays pending and is handled again.
        let _ = self.tx.send(item);
    }

    /// Queues the release of `id` (settled without an XACK of ours: dead-lettered, gone)
    /// from the lease of its ordering key `key` (group scope).
    pub fn release(&self, id: String, key: Bytes) {
        let _ = self.tx.send(Item::Release(id, key));
    }
}

/// The ack task, for the final flush.
pub(crate) struct AckTask {
    handle: JoinHandle<()>,
    unconfirmed: Unconfirmed,
}

impl AckTask {
    /// Waits up to `within` for the task to acknowledge everything handed to it (every
    /// `Acker` must be dropped). `Err` holds the ids Redis has not confirmed: they stay
    /// pending and run again after a restart or a takeover.
    pub(crate) async fn finish(self, within: std::time::Duration) -> Result<(), Vec<String>> {
        match tokio::time::timeout(within, self.handle).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::error!(%error, "ack task failed");
                Err(self.unconfirmed.set().iter().cloned().collect())
            }
            Err(_) => Err(self.unconfirmed.set().iter().cloned().collect()),
        }
    }
}

/// Where a batch goes: XACK, or the lease `done` step when it releases keys.
struct Flush {
    cmds: StreamCommands,
    lease: Option<Lease>,
}

impl Flush {
    async fn send(&self, batch: &[Item]) -> Result<(), crate::redis::RedisError> {
        let acks: Vec<String> = batch.iter().filter_map(Item::acked_id).cloned().collect();
        let releases: Vec<(String, Bytes)> = batch
            .iter()
            .filter_map(|item| match item {
                Item::AckRelease(id, key) | Item::Release(id, key) => {
                    Some((id.clone(), key.clone()))
                }
                Item::Ack(_) => None,
            })
            .collect();
        match &self.lease {
            Some(lease) if !releases.is_empty() => {
                Box::pin(lease.done(&acks, &releases)).await?;
            }
            _ if !acks.is_empty() => {
                Box::pin(self.cmds.ack(&acks)).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

async fn ack_loop(
    flush: Flush,
    mut rx: mpsc::UnboundedReceiver<Item>,
    unconfirmed: Unconfirmed,
    metrics: StreamMetrics,
) {
    // Grows to the burst size on demand: preallocating MAX_BATCH ids for every stream's
    // idle acker was measurable memory with many streams.
    let mut batch: Vec<Item> = Vec::new();
    while let Some(item) = rx.recv().await {
        batch.push(item);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut backoff = Backoff::redis();
        loop {
            // Boxed: the XACK future is large and the task spends its life idle.
            match Box::pin(flush.send(&batch)).await {
                Ok(()) => {
                    let acked = batch.iter().filter_map(Item::acked_id).count();
                    tracing::debug!(count = acked, "acked");
                    metrics.acked(acked as u64);
                    let mut set = unconfirmed.set();
                    for item in batch.drain(..) {
                        if let Some(id) = item.acked_id() {
                            set.remove(id);
                        }
                    }
                    break;
                }
                Err(error) => {
                    let delay = backoff.fail();
                    tracing::warn!(
                        count = batch.len(),
                        %error,
                        retry_in = ?delay,
                        "XACK failed; keeping the ids and retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
