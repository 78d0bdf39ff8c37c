//! Keeping a consume loop's hold in Redis true while it runs (refreshing the entries it
//! holds, sampling the group for the metrics) and ending it (the drain: running handlers
//! finish, the last acks go out, the consumer says goodbye).

use std::time::Duration;

use tracing::Instrument;

use crate::stream::consume::{Busy, StreamLoop, Timers};
use crate::stream::recovery;

/// How long the final acks may take once every handler is done, when Redis is slow or
/// down; after that, the unacked entries stay pending and are handled again later.
pub const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// How long each goodbye to Redis (leaving the group, closing the reader) may take.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

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
impl StreamLoop {
    /// Keeps the entries we hold fresh (idle time reset) every `claim_idle / 3`, so other
    /// consumers' XAUTOCLAIM never takes an entry whose handler is healthy. Entries whose
    /// ack is not confirmed yet (Redis was away) and reruns waiting for resources are ours
    /// too.
    pub(super) fn refresh(&mut self) {
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
    pub(super) fn sample(&mut self) {
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

    /// After stop: no reads; running handlers finish (or are aborted by the shutdown
    /// clock); waiting retries are dropped and stay pending for the next start.
    pub(super) async fn drain(mut self, mut timers: Timers) {
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
