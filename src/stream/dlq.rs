//! The dead-letter stream: what a DLQ entry contains and how it gets written.
//!
//! A DLQ entry carries every field of the source entry unchanged, in order, then the
//! `dlq_*` fields below. It is written together with the XACK of the source entry by one
//! script that acks only if the XADD worked (see [`crate::redis::dead_letter`]), so an
//! entry is never acked without being dead-lettered. In a Redis Cluster whose source and
//! DLQ keys hash to different slots the two are separate steps (XADD, then XACK); that
//! is warned about once per stream at start ([`warn_if_split`]).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::redis::dead_letter::split_slots;
use crate::redis::{DeadLetter, DlqWrite, Entry, StreamCommands};

/// Why and after how much effort an entry is being dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// `exit code 3`, `killed by signal 9`, `timeout after 30s`, `spawn failed: ...`,
    /// `missing field "payload"`, ...
    pub reason: String,
    /// Attempts made (handler runs, or 0 when the entry could never run).
    pub attempts: u64,
    /// Tail of the last run's stderr (empty when none ran).
    pub stderr: Vec<u8>,
    /// How long the last run took (`None` when none ran).
    pub elapsed: Option<std::time::Duration>,
}

/// The fields of the DLQ entry for `entry`.
pub fn dlq_fields(cmds: &StreamCommands, entry: &Entry, failure: &Failure) -> Vec<(Bytes, Bytes)> {
    let failed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut fields = entry.fields.clone().unwrap_or_default();
    let meta: [(&'static str, Bytes); 8] = [
        ("dlq_source_stream", Bytes::from(cmds.who.stream.clone())),
        ("dlq_source_id", Bytes::from(entry.id.clone())),
        ("dlq_group", Bytes::from(cmds.who.group.clone())),
        ("dlq_consumer", Bytes::from(cmds.who.name.clone())),
        ("dlq_attempts", Bytes::from(failure.attempts.to_string())),
        ("dlq_reason", Bytes::from(failure.reason.clone())),
        ("dlq_stderr", Bytes::from(failure.stderr.clone())),
        ("dlq_failed_at", Bytes::from(failed_at.to_string())),
    ];
    fields.extend(
        meta.into_iter()
            .map(|(k, v)| (Bytes::from_static(k.as_bytes()), v)),
    );
    fields
}

/// Warns once (at the start of a stream's loop) when its DLQ writes cannot be atomic: a
/// Redis Cluster where `stream` and `dlq` hash to different slots.
pub(crate) fn warn_if_split(commands: &fred::prelude::Client, stream: &str, dlq: &str) {
    if let Some((source_slot, dlq_slot)) = split_slots(commands, stream, dlq) {
        let fix = colocated_dlq(stream).map_or_else(
            || "give both keys the same hash tag, e.g. name = \"{orders}\" and dlq = \"{orders}:dlq\"".to_string(),
            |suggestion| format!("set dlq = {suggestion:?}, which hashes like the stream"),
        );
        tracing::warn!(
            stream,
            dlq,
            source_slot,
            dlq_slot,
            "the stream and its dead-letter stream hash to different cluster slots: a dead-letter \
             write is XADD then XACK, not one atomic step (a crash between them leaves a \
             duplicate DLQ entry); to make it atomic, {fix}"
        );
    }
}

/// A DLQ name in the slot of `stream`: `{tag}:dlq` with the stream's own hash tag, or
/// `{stream}:dlq` for a name without one; `None` when neither lands in its slot.
fn colocated_dlq(stream: &str) -> Option<String> {
    let tag = stream
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(stream);
    let candidate = format!("{{{tag}}}:dlq");
    let slot = fred::util::redis_keyslot;
    (slot(candidate.as_bytes()) == slot(stream.as_bytes())).then_some(candidate)
}

/// Dead-letters `entry`, retrying through Redis outages until it is written or `give_up`
/// is cancelled (shutdown gave up waiting; the entry then stays pending and is
/// dead-lettered on its next delivery, because its delivery count is past `max_attempts`).
/// Returns whether it was written.
pub async fn dead_letter(
    cmds: &StreamCommands,
    dlq: &str,
    entry: &Entry,
    failure: &Failure,
    give_up: &CancellationToken,
) -> bool {
    let fields = dlq_fields(cmds, entry, failure);
    let mode = cmds.dlq_write(dlq, fields.len());
    // Split writes only: the XADD is done, the XACK is what remains.
    let mut added = false;
    let mut backoff = Backoff::redis();
    loop {
        let attempt = match (mode, added) {
            (DlqWrite::Atomic, _) => cmds.dead_letter(dlq, &entry.id, fields.clone()).await,
            (DlqWrite::Split, false) => {
                match cmds.dead_letter_add(dlq, &entry.id, fields.clone()).await {
                    Ok(Some(why)) => Ok(DeadLetter::Skipped(why)),
                    Ok(None) => {
                        added = true;
                        continue;
                    }
                    Err(error) => Err(error),
                }
            }
            (DlqWrite::Split, true) => cmds
                .ack(std::slice::from_ref(&entry.id))
                .await
                .map(|_| DeadLetter::Done),
        };
        let error = match attempt {
            Ok(outcome) => return settled(dlq, entry, failure, outcome),
            Err(error) => error,
        };
        let delay = backoff.fail();
        let step = if added {
            "XACK after the dead-letter write"
        } else {
            "dead-letter write"
        };
        tracing::warn!(
            stream = %cmds.who.stream,
            id = %entry.id,
            %error,
            retry_in = ?delay,
            "{step} failed; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = give_up.cancelled() => {
                tracing::error!(
                    stream = %cmds.who.stream,
                    id = %entry.id,
                    written = added,
                    "shutting down before the dead-letter write succeeded; entry stays pending"
                );
                return false;
            }
        }
    }
}

/// Logs what a completed dead-letter write did; whether the entry was written.
fn settled(dlq: &str, entry: &Entry, failure: &Failure, outcome: DeadLetter) -> bool {
    // stream, group and consumer come from the loop's span (the write runs inside it).
    let id = &entry.id;
    let elapsed_ms = failure.elapsed.map(|d| d.as_millis() as u64);
    match outcome {
        DeadLetter::Done => {
            tracing::warn!(
                %id,
                attempt = failure.attempts,
                elapsed_ms,
                reason = %failure.reason,
                dlq,
                "entry moved to the dead-letter stream"
            );
            true
        }
        DeadLetter::AckFailed(error) => {
            tracing::warn!(
                %id,
                attempt = failure.attempts,
                elapsed_ms,
                reason = %failure.reason,
                dlq,
                %error,
                "entry written to the dead-letter stream, but its XACK failed"
            );
            true
        }
        DeadLetter::Skipped(why) => {
            tracing::warn!(
                %id,
                dlq,
                why,
                "entry not dead-lettered: it is no longer pending for this consumer"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn colocated_dlq_names() {
        use super::colocated_dlq;
        assert_eq!(colocated_dlq("orders").as_deref(), Some("{orders}:dlq"));
        assert_eq!(
            colocated_dlq("{shop}.orders").as_deref(),
            Some("{shop}:dlq")
        );
        assert_eq!(colocated_dlq("a{}b").as_deref(), None);
        assert_eq!(colocated_dlq("x}y").as_deref(), None);
    }
}
