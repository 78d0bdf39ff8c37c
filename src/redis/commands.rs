//! The stream commands the daemon speaks, for one (stream, group, consumer).

use std::time::Duration;

use fred::prelude::{
    Client, ClientInterface, ClientLike, Error as FredError, ErrorKind, EventInterface, Options,
    StreamsInterface,
};
use fred::types::{ClientUnblockFlag, Value};

use super::RedisError;
use super::reply::{
    AutoClaim, ConsumerInfo, Entry, PendingEntry, integer, parse_autoclaim_reply,
    parse_consumers_reply, parse_entries, parse_pending_reply, parse_read_reply, rows_of_pairs,
    text,
};
use crate::identity::Consumer;

/// How long after its block time a read's reply may be late before the reader's
/// connection is considered dead.
const READ_MARGIN: Duration = Duration::from_secs(5);
/// How long a read waits for the reconnect it started after a timeout.
const RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// The stream commands for one (stream, group, consumer).
#[derive(Clone)]
pub struct StreamCommands {
    pub(super) client: Client,
    /// The consumer these commands act as.
    pub(crate) who: Consumer,
}

impl StreamCommands {
    pub(crate) fn new(client: Client, who: Consumer) -> Self {
        StreamCommands { client, who }
    }

    /// `XGROUP CREATE ... MKSTREAM`; an existing group is fine. Returns true if created.
    pub async fn ensure_group(&self, start_id: &str) -> Result<bool, RedisError> {
        let created: Result<Value, FredError> = self
            .client
            .xgroup_create(&self.who.stream, &self.who.group, start_id, true)
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if e.details().starts_with("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS key id`. `id` is `>` for new
    /// entries or an id to page through our own pending list.
    ///
    /// A reply that has not come [`READ_MARGIN`] after the block time is given up on and
    /// the connection replaced: the node is frozen or gone without a word (a primary
    /// stopped before its failover, a dead network path), and a blocked connection is
    /// never checked for that by fred. The error makes the loop scan its pending list
    /// once the new connection is up, for entries the abandoned read delivered.
    pub async fn read(
        &self,
        count: usize,
        block: Option<Duration>,
        id: &str,
    ) -> Result<Vec<Entry>, RedisError> {
        let block_ms = block.map(|b| (b.as_millis() as u64).max(1));
        let limit = block.unwrap_or_default() + READ_MARGIN;
        let options = Options {
            timeout: Some(limit),
            ..Options::default()
        };
        let reply: Result<Value, FredError> = self
            .client
            .with_options(&options)
            .xreadgroup(
                &self.who.group,
                &self.who.name,
                Some(count as u64),
                block_ms,
                false,
                &self.who.stream,
                id,
            )
            .await;
        match reply {
            Ok(reply) => parse_read_reply(reply),
            Err(error) if *error.kind() == ErrorKind::Timeout => {
                tracing::warn!(
                    stream = %self.who.stream,
                    waited = ?limit,
                    "no reply to XREADGROUP in time; replacing the reader's connection"
                );
                let reconnect = self.client.force_reconnection();
                if tokio::time::timeout(RECONNECT_WAIT, reconnect)
                    .await
                    .is_err()
                {
                    tracing::debug!(stream = %self.who.stream, "reader reconnect still under way");
                }
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Ends a blocking read on this client's connection early, as if its BLOCK had timed
    /// out (no entries delivered). fred sends `CLIENT UNBLOCK id TIMEOUT` on a side
    /// connection. Not being blocked is fine.
    pub async fn unblock(&self) {
        if let Err(error) = self
            .client
            .unblock_self(Some(ClientUnblockFlag::Timeout))
            .await
        {
            tracing::trace!(%error, "CLIENT UNBLOCK");
        }
    }

    /// Hears about every reconnect of this client's connection.
    pub fn reconnects(&self) -> tokio::sync::broadcast::Receiver<fred::types::config::Server> {
        self.client.reconnect_rx()
    }

    /// Confirms `id` is still ours by claiming it to ourselves with JUSTID (delivery
    /// counter untouched, idle time reset), only if it has been idle at least `min_idle`:
    /// a claim by anyone else since then makes this a no-op. Returns whether it is ours.
    pub async fn reclaim_quietly(&self, id: &str, min_idle: Duration) -> Result<bool, RedisError> {
        let reply = self.xclaim(id, min_idle, true).await?;
        Ok(matches!(reply, Value::Array(ids) if !ids.is_empty()))
    }

    /// The entry `id` read with XRANGE (no effect on the pending list). `fields` is
    /// `None` when it was deleted from the stream.
    pub async fn entry(&self, id: &str) -> Result<Entry, RedisError> {
        let reply: Value = self
            .client
            .xrange(&self.who.stream, id, id, Some(1))
            .await?;
        let found = parse_entries(reply, "XRANGE")?.into_iter().next();
        Ok(found.unwrap_or_else(|| Entry {
            id: id.to_owned(),
            fields: None,
        }))
    }

    /// Closes this client's connection (bounded: Redis may be down).
    pub async fn quit(&self) {
        if tokio::time::timeout(Duration::from_secs(5), self.client.quit())
            .await
            .is_err()
        {
            tracing::debug!(stream = %self.who.stream, "redis connection did not close in time");
        }
    }

    /// `XACK` for a batch of ids. Returns how many were still pending.
    pub async fn ack(&self, ids: &[String]) -> Result<u64, RedisError> {
        Ok(self
            .client
            .xack(&self.who.stream, &self.who.group, ids.to_vec())
            .await?)
    }

    /// The pending-list row of one entry, if it is still pending in the group.
    pub async fn pending_entry(&self, id: &str) -> Result<Option<PendingEntry>, RedisError> {
        let reply: Value = self
            .client
            .xpending(&self.who.stream, &self.who.group, (id, id, 1))
            .await?;
        Ok(parse_pending_reply(reply)?.into_iter().next())
    }

    /// This consumer's pending rows between `start` and `end` (inclusive), at most `count`.
    pub async fn my_pending(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, RedisError> {
        let reply: Value = self
            .client
            .xpending(
                &self.who.stream,
                &self.who.group,
                (start, end, count as u64, self.who.name.as_str()),
            )
            .await?;
        parse_pending_reply(reply)
    }

    /// Takes `id` over for this consumer if it has been idle at least `min_idle` (so a
    /// concurrent claim by someone else makes this one a no-op), incrementing its delivery
    /// counter and returning its fields. `None` when the claim did not happen or the entry
    /// was deleted.
    pub async fn claim(&self, id: &str, min_idle: Duration) -> Result<Option<Entry>, RedisError> {
        let reply = self.xclaim(id, min_idle, false).await?;
        Ok(parse_entries(reply, "XCLAIM")?
            .into_iter()
            .find(|e| e.fields.is_some()))
    }

    /// `XCLAIM key group <us> <min_idle> <ids...> [JUSTID]`: takes entries idle at least
    /// `min_idle` to this consumer. Without JUSTID their delivery counters go up and the
    /// entries come back; with it only their ids, counters untouched.
    async fn xclaim(
        &self,
        ids: impl Into<fred::types::streams::MultipleIDs> + Send,
        min_idle: Duration,
        justid: bool,
    ) -> Result<Value, RedisError> {
        Ok(self
            .client
            .xclaim(
                &self.who.stream,
                &self.who.group,
                &self.who.name,
                min_idle.as_millis() as u64,
                ids,
                None,
                None,
                None,
                false,
                justid,
            )
            .await?)
    }

    /// Resets the idle time of entries whose handlers are running here (`XCLAIM ... JUSTID`
    /// to ourselves), so other consumers' XAUTOCLAIM never takes a healthy entry. JUSTID
    /// leaves the delivery counter alone.
    pub async fn touch(&self, ids: Vec<String>) -> Result<(), RedisError> {
        self.xclaim(ids, Duration::ZERO, true).await?;
        Ok(())
    }

    /// One `XAUTOCLAIM` step from `cursor`: entries idle at least `min_idle` move to us
    /// (delivery counters + 1). Returns the next cursor (`0-0` when the scan is complete),
    /// the claimed entries, and the ids Redis found deleted from the stream (Redis 7 drops
    /// those from the pending list by itself; fred's typed helper loses this third part).
    pub async fn autoclaim(
        &self,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<AutoClaim, RedisError> {
        let reply: Value = self
            .client
            .xautoclaim(
                &self.who.stream,
                &self.who.group,
                &self.who.name,
                min_idle.as_millis() as u64,
                cursor,
                Some(count as u64),
                false,
            )
            .await?;
        parse_autoclaim_reply(reply)
    }

    /// `(pending, lag)` of our group from `XINFO GROUPS`; lag is `None` when Redis cannot
    /// tell (it may not after trims or deletions; Redis 6.2 has no lag at all).
    pub async fn group_stats(&self) -> Result<Option<(u64, Option<u64>)>, RedisError> {
        const CMD: &str = "XINFO GROUPS";
        let reply: Value = self.client.xinfo_groups(&self.who.stream).await?;
        for row in rows_of_pairs(reply, CMD)? {
            let mut name = None;
            let (mut pending, mut lag) = (0, None);
            for (key, value) in row {
                match key.as_str() {
                    "name" => name = Some(text(value, CMD)?),
                    "pending" => pending = integer(value, CMD)?,
                    "lag" => lag = integer(value, CMD).ok(),
                    _ => {}
                }
            }
            if name.as_deref() == Some(self.who.group.as_str()) {
                return Ok(Some((pending, lag)));
            }
        }
        Ok(None)
    }

    /// Consumers of the group: (name, pending, idle_ms).
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>, RedisError> {
        let reply: Value = self
            .client
            .xinfo_consumers(&self.who.stream, &self.who.group)
            .await?;
        parse_consumers_reply(reply)
    }

    /// `XGROUP DELCONSUMER`; returns how many pending entries the consumer had.
    pub async fn delete_consumer(&self, name: &str) -> Result<u64, RedisError> {
        Ok(self
            .client
            .xgroup_delconsumer(&self.who.stream, &self.who.group, name)
            .await?)
    }
}
