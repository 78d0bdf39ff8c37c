//! The executor seen by the consume loop: how an entry's payload reaches the handler
//! program, either a fresh process per attempt or a pool of long-lived workers.
//!
//! The loop submits a [`Job`] holding one read slot; the executor releases the slot when
//! the run ends and sends exactly one [`Done`] back on its channel. It never calls into
//! the loop: settling (ack, retry, dead-letter) is the loop's decision. The read slots
//! (how many entries a stream may hold) are the executor's to size: `max_block_read`
//! processes, or workers times their prefetch depth.

pub(crate) mod handler;
pub(crate) mod worker;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{HandlerMode, StreamConfig};
use crate::identity::Consumer;
use handler::{HandlerCommand, Invocation};
pub(crate) use handler::{Outcome, Report};
use worker::{PoolIdentity, WorkerPool};

/// Time between SIGTERM and SIGKILL for a handler's process group.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// One attempt at one entry.
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) attempt: u64,
    pub(crate) payload: Bytes,
    /// Held while the run goes on; released when it ends, before its [`Done`] is sent.
    pub(crate) slot: OwnedSemaphorePermit,
}

/// How one submitted job ended.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) id: String,
    pub(crate) attempt: u64,
    pub(crate) report: Report,
}

/// A stream's executor.
pub(crate) struct Executor {
    kind: Kind,
    slots: Arc<Semaphore>,
    done: mpsc::UnboundedSender<Done>,
}

enum Kind {
    PerEntry {
        cmd: Arc<HandlerCommand>,
        who: Arc<Consumer>,
        abort: CancellationToken,
        running: TaskTracker,
        slot_count: usize,
    },
    Pool(WorkerPool),
}

impl Executor {
    /// Builds the executor of one stream. `abort` is the shutdown's abort token.
    pub(crate) fn new(
        cfg: &StreamConfig,
        who: &Consumer,
        abort: CancellationToken,
    ) -> (Executor, mpsc::UnboundedReceiver<Done>) {
        let cmd = HandlerCommand {
            argv: cfg.handler.clone(),
            env: cfg
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: cfg.handler_timeout,
            kill_grace: KILL_GRACE,
        };
        let (done, done_rx) = mpsc::unbounded_channel();
        let (kind, slots) = match cfg.mode {
            HandlerMode::Exec => (
                Kind::PerEntry {
                    cmd: Arc::new(cmd),
                    who: Arc::new(who.clone()),
                    abort,
                    running: TaskTracker::new(),
                    slot_count: cfg.max_block_read,
                },
                Arc::new(Semaphore::new(cfg.max_block_read)),
            ),
            HandlerMode::Worker => {
                let pool = WorkerPool::new(
                    cmd,
                    PoolIdentity {
                        stream: who.stream.clone(),
                        group: who.group.clone(),
                        consumer: who.name.clone(),
                    },
                    cfg.max_block_read,
                    cfg.worker_prefetch,
                    abort,
                );
                let slots = pool.slots();
                (Kind::Pool(pool), slots)
            }
        };
        (Executor { kind, slots, done }, done_rx)
    }

    /// The read slots: one permit per entry the stream may hold.
    pub(crate) fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    /// How many permits the slots have in all, free or held.
    pub(crate) fn slot_count(&self) -> usize {
        match &self.kind {
            Kind::PerEntry { slot_count, .. } => *slot_count,
            Kind::Pool(pool) => pool.slot_count(),
        }
    }

    /// Worker mode reads in batches: a worker answers in microseconds, so reading as soon
    /// as one slot frees means one XREADGROUP (and one XACK) per entry or two, and Redis
    /// round trips become the limit. Per-entry processes take a millisecond to spawn;
    /// there, reading at once is better.
    pub(crate) fn batches_reads(&self) -> bool {
        matches!(self.kind, Kind::Pool(_))
    }

    /// Starts the job; exactly one [`Done`] comes back for it.
    pub(crate) fn submit(&self, job: Job) {
        let Job {
            id,
            attempt,
            payload,
            slot,
        } = job;
        let done = self.done.clone();
        match &self.kind {
            Kind::PerEntry {
                cmd,
                who,
                abort,
                running,
                ..
            } => {
                let (cmd, who, abort) = (cmd.clone(), who.clone(), abort.clone());
                running.spawn(async move {
                    let invocation = Invocation {
                        stream: &who.stream,
                        group: &who.group,
                        consumer: &who.name,
                        id: &id,
                        attempt,
                    };
                    let report = handler::run(&cmd, &invocation, payload, &abort).await;
                    drop(slot);
                    let _ = done.send(Done {
                        id,
                        attempt,
                        report,
                    });
                });
            }
            Kind::Pool(pool) => pool.submit(worker::Job {
                id: id.clone(),
                attempt,
                payload,
                done: Box::new(move |report| {
                    drop(slot);
                    let _ = done.send(Done {
                        id,
                        attempt,
                        report,
                    });
                }),
            }),
        }
    }

    /// Graceful stop: waits for running processes, or lets the pool run what it has
    /// queued and stop its workers. Every `Done` has been sent when it returns.
    pub(crate) async fn shutdown(&self) {
        match &self.kind {
            Kind::PerEntry { running, .. } => {
                running.close();
                running.wait().await;
            }
            Kind::Pool(pool) => pool.shutdown().await,
        }
    }
}
