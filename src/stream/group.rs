//! The consume loop's side of `order_scope = "group"` ([`super::lease`] has the design
//! and the Redis steps): the read round that reads and decides in one step, the decision
//! for entries that reached us otherwise, arrivals joining their keys' queues in id
//! order, lease renewal and lost keys, and the end of our leases when the loop stops.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::{JoinError, JoinSet};
use tracing::Instrument;

use crate::ops::shutdown::Shutdown;
use crate::redis::Entry;
use crate::stream::consume::{Busy, StreamLoop};
use crate::stream::read::Waits;
use crate::stream::lease::{Arrival, Decision, Lease};
use crate::stream::order::{Admitted, id_number};

/// A lost key with the entry that held it here when the renewal was sent.
type Lost = Vec<(Bytes, String)>;

/// Group-scope state of one loop.
pub(crate) struct Group {
    lease: Lease,
    /// Entries that reached us otherwise than by the `read` step (our own pending ones at
    /// start, claimed, recovered), with their attempts and slots, waiting for `admit`.
    admitting: Vec<(Entry, u64, OwnedSemaphorePermit)>,
    /// Renewals under way.
    renewals: JoinSet<Lost>,
}

impl Group {
    pub(crate) fn new(lease: Lease) -> Self {
        Group {
            lease,
            admitting: Vec::new(),
            renewals: JoinSet::new(),
        }
    }

    /// The next finished renewal; `None` (at once) when there is none under way.
    pub(super) async fn next_renewal(group: &mut Option<Group>) -> Option<Result<Lost, JoinError>> {
        match group {
            Some(group) if !group.renewals.is_empty() => group.renewals.join_next().await,
            _ => None,
        }
    }

    /// Ends our leases of `keys` (the loop stopped), so their entries still pending here
    /// are taken over at once by the next consumer that meets them.
    pub(super) async fn expire(&self, keys: Vec<Bytes>) {
        if let Err(error) = self.lease.expire(keys).await {
            tracing::warn!(%error, "cannot end the leases of our keys; they end after claim_idle");
        }
    }
}

impl StreamLoop {
    /// Takes an entry that reached us otherwise than by the `read` step: it waits, with
    /// its slot, for the `admit` step of this read round.
    pub(super) fn defer_admission(
        &mut self,
        entry: Entry,
        attempt: u64,
        slot: OwnedSemaphorePermit,
    ) {
        let Some(group) = &mut self.group else {
            return;
        };
        self.busy.insert(entry.id.clone(), Busy::Admitting);
        group.admitting.push((entry, attempt, slot));
    }

    /// The `admit` step for the entries deferred so far, on the reader's connection.
    /// `false` at shutdown.
    pub(super) async fn admit_deferred(
        &mut self,
        shutdown: &Shutdown,
        waits: &mut Waits<'_>,
    ) -> bool {
        let Some(group) = &mut self.group else {
            return true;
        };
        if group.admitting.is_empty() {
            return true;
        }
        let deferred = std::mem::take(&mut group.admitting);
        let lease = group.lease.clone();
        let ids: Vec<String> = deferred.iter().map(|(e, ..)| e.id.clone()).collect();
        let reply = self
            .on_reader(
                async move { lease.admit(&ids).await },
                None,
                shutdown,
                waits,
            )
            .await;
        for (entry, ..) in &deferred {
            self.busy.remove(&entry.id);
        }
        let reply = match reply {
            None => return false,
            Some(Ok(reply)) => reply,
            Some(Err(error)) => {
                // They are ours and pending: the scan for lost deliveries brings them back.
                tracing::warn!(%error, count = deferred.len(), "cannot decide about entries that reached us (lease admit); trying again");
                self.lost_scan = true;
                return true;
            }
        };
        self.metrics.order_taken_over(reply.takeovers);
        let mut decided: HashMap<String, (Option<Bytes>, Decision)> = reply
            .decided
            .into_iter()
            .map(|(id, key, decision)| (id, (key, decision)))
            .collect();
        let (mut arrivals, mut permits) = (reply.taken, Vec::new());
        for (entry, attempt, slot) in deferred {
            let Some((key, decision)) = decided.remove(&entry.id) else {
                continue;
            };
            if self.keeps(&entry.id, &decision) {
                arrivals.push(Arrival {
                    entry,
                    key,
                    attempt,
                });
                permits.push(slot);
            }
        }
        self.arrive(arrivals, &mut permits);
        true
    }

    /// A read round in group scope: the `read` step (entries handed to us, then up to
    /// `count` new ones, each decided), then, if nothing came, a blocking wait for the
    /// stream or our inbox. `false` at shutdown.
    pub(super) async fn group_read(
        &mut self,
        count: usize,
        permits: &mut Vec<OwnedSemaphorePermit>,
        shutdown: &Shutdown,
        waits: &mut Waits<'_>,
    ) -> bool {
        let (Some(group), Some(order)) = (&self.group, &self.order) else {
            return true;
        };
        let lease = group.lease.clone();
        let room = order.room();
        let call = async move { lease.read(count, room).await };
        let reply = match self.on_reader(call, None, shutdown, waits).await {
            None => return false,
            Some(Ok(reply)) => {
                self.read_backoff.reset();
                reply
            }
            Some(Err(error)) => {
                self.lost_scan = true;
                Box::pin(self.read_failed(error, shutdown)).await;
                return true;
            }
        };
        self.metrics.order_taken_over(reply.takeovers);
        let mut arrivals = Vec::with_capacity(reply.read.len());
        for (arrival, decision) in reply.read {
            if self.keeps(&arrival.entry.id, &decision) {
                arrivals.push(arrival);
            }
        }
        for arrival in &reply.handed_in {
            tracing::debug!(id = %arrival.entry.id, "entry handed over to us: we hold its key");
        }
        arrivals.extend(reply.handed_in);
        arrivals.extend(reply.taken);
        self.arrive(arrivals, permits);
        let (Some(tail), Some(group)) = (reply.tail, &self.group) else {
            return true;
        };
        let lease = group.lease.clone();
        let block = self.block_for();
        let wait = async move { lease.wait(&tail, block).await };
        match self.on_reader(wait, Some(block), shutdown, waits).await {
            None => false,
            Some(Ok(())) => true,
            Some(Err(error)) => {
                self.lost_scan = true;
                Box::pin(self.read_failed(error, shutdown)).await;
                true
            }
        }
    }

    /// Whether an entry decided by a lease step stays with us (logs and counts those that
    /// do not, and takeovers).
    fn keeps(&self, id: &str, decision: &Decision) -> bool {
        match decision {
            Decision::Handed(holder) => {
                tracing::debug!(%id, %holder, "another consumer holds the entry's key: handed the entry over to it");
                self.metrics.order_handed_over();
                false
            }
            Decision::TakenOver(from) => {
                tracing::info!(%id, %from, "took the entry's key over from a consumer that did not renew its hold within claim_idle, with the key's pending entries");
                true
            }
            Decision::Mine | Decision::Free => true,
        }
    }

    /// Entries that are ours now join their keys' queues, in id order (an earlier entry of
    /// a key always before a later one), or run when their key is free here: with one of
    /// `permits`, else a free slot, else as soon as one is free.
    fn arrive(&mut self, mut arrivals: Vec<Arrival>, permits: &mut Vec<OwnedSemaphorePermit>) {
        arrivals.sort_by_key(|a| id_number(&a.entry.id));
        arrivals.dedup_by(|a, b| a.entry.id == b.entry.id);
        for Arrival {
            entry,
            key,
            attempt,
        } in arrivals
        {
            if self.is_in_hand(&entry.id) {
                tracing::debug!(id = %entry.id, "already in hand; skipping a second delivery");
                continue;
            }
            self.metrics.read(1);
            let Some(order) = &mut self.order else {
                return;
            };
            match order.admit_keyed(entry, attempt, key) {
                Admitted::Run {
                    entry,
                    attempt,
                    keyed,
                } => {
                    if !keyed {
                        self.metrics.order_unkeyed();
                    }
                    match permits
                        .pop()
                        .or_else(|| self.slots.clone().try_acquire_owned().ok())
                    {
                        Some(slot) => self.start(entry, attempt, slot),
                        None => order.push_ready(entry, attempt),
                    }
                }
                Admitted::Queued => {
                    tracing::debug!("entry waits for the entry before it with the same key")
                }
            }
        }
        self.order_changed();
    }

    /// On refresh: renews the leases of the keys we hold; their entries are kept fresh
    /// with them, so they are dropped from `ids`, the generic refresh, and unkeyed entries
    /// waiting for a slot are added to it.
    pub(super) fn renew_leases(&mut self, ids: &mut Vec<String>) {
        let (Some(group), Some(order)) = (&mut self.group, &self.order) else {
            return;
        };
        ids.retain(|id| order.key_held_by(id).is_none());
        ids.extend(order.unkeyed_ready_ids().cloned());
        let held = order.held_keys();
        let lease = group.lease.clone();
        group.renewals.spawn(
            async move {
                match lease.renew(&held).await {
                    Ok(lost) => lost
                        .into_iter()
                        .filter_map(|key| {
                            let holder = held.iter().find(|h| h.key == key)?.holder.clone();
                            Some((key, holder))
                        })
                        .collect(),
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew the leases of our keys");
                        Vec::new()
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// Keys another consumer took over from us (our hold was not renewed in time): their
    /// waiting entries are that consumer's now.
    pub(super) fn leases_lost(&mut self, lost: Lost) {
        let Some(order) = &mut self.order else {
            return;
        };
        for (key, holder) in lost {
            if let Some(dropped) = order.lose(&key, &holder) {
                let key: String = String::from_utf8_lossy(&key).chars().take(100).collect();
                tracing::warn!(%key, %holder, dropped, "another consumer took this key over (our hold on it was not renewed within claim_idle); the entries waiting for it are that consumer's now");
            }
        }
        self.order_changed();
    }

    /// The loop stops: the keys we hold now, whose leases end once the loop is done.
    pub(super) fn stop_holding(&mut self) -> Vec<Bytes> {
        let (Some(group), Some(order)) = (&mut self.group, &self.order) else {
            return Vec::new();
        };
        group.admitting.clear();
        group.renewals.abort_all();
        order.held_keys().into_iter().map(|k| k.key).collect()
    }
}
