//! Batched, retried acknowledgements for one stream.
//!
//! Handler tasks hand over ids and move on; one task per stream turns them into `XACK`
//! batches. An ack that fails (Redis down, reconnect attempts used up) is kept and retried
//! with backoff until Redis confirms it, so an ack is never lost while the daemon lives.
//! On shutdown the batch is flushed once the last handler task has dropped its sender.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::ops::metrics::StreamMetrics;
use crate::redis::StreamCommands;

/// Largest number of ids in one XACK.
const MAX_BATCH: usize = 512;

/// The sending side: cheap to clone, one per handler task.
#[derive(Clone, Debug)]
pub struct Acker {
    tx: mpsc::UnboundedSender<String>,
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
    /// Starts the ack task for `cmds`' stream and group (in the current tracing span).
    /// The task ends when every `Acker` clone is dropped and all ids are acknowledged.
    pub fn spawn(cmds: StreamCommands, metrics: StreamMetrics) -> (Acker, AckTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let unconfirmed = Unconfirmed::default();
        let handle =
            tokio::spawn(ack_loop(cmds, rx, unconfirmed.clone(), metrics).in_current_span());
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

    /// Queues `id` for XACK.
    pub fn ack(&self, id: String) {
        self.unconfirmed.set().insert(id.clone());
        // The receiver lives until every sender is gone, so this cannot fail while we
        // hold `self`; if it ever did, the entry stays pending and is handled again.
        let _ = self.tx.send(id);
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

async fn ack_loop(
    cmds: StreamCommands,
    mut rx: mpsc::UnboundedReceiver<String>,
    unconfirmed: Unconfirmed,
    metrics: StreamMetrics,
) {
    // Grows to the burst size on demand: preallocating MAX_BATCH ids for every stream's
    // idle acker was measurable memory with many streams.
    let mut batch: Vec<String> = Vec::new();
    while let Some(id) = rx.recv().await {
        batch.push(id);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        let mut backoff = Backoff::redis();
        loop {
            // Boxed: the XACK future is large and the task spends its life idle.
            match Box::pin(cmds.ack(&batch)).await {
                Ok(_) => {
                    tracing::debug!(count = batch.len(), "acked");
                    metrics.acked(batch.len() as u64);
                    let mut set = unconfirmed.set();
                    for id in batch.drain(..) {
                        set.remove(&id);
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
