//! The dead-letter stream: what a DLQ entry contains and how it gets written.
//!
//! A DLQ entry carries every field of the source entry unchanged, in order, then the
//! `dlq_*` fields below. It is written together with the XACK of the source entry in one
//! MULTI/EXEC, so an entry is never both dead-lettered and still pending.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::redis::{Entry, StreamCommands};

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
    let mut backoff = Backoff::redis();
    loop {
        match cmds.dead_letter(dlq, &entry.id, fields.clone()).await {
            Ok(()) => {
                tracing::warn!(
                    stream = %cmds.who.stream,
                    group = %cmds.who.group,
                    id = %entry.id,
                    attempt = failure.attempts,
                    elapsed_ms = failure.elapsed.map(|d| d.as_millis() as u64),
                    reason = %failure.reason,
                    dlq,
                    "entry moved to the dead-letter stream"
                );
                return true;
            }
            Err(error) => {
                let delay = backoff.fail();
                tracing::warn!(
                    stream = %cmds.who.stream,
                    id = %entry.id,
                    %error,
                    retry_in = ?delay,
                    "dead-letter write failed; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = give_up.cancelled() => {
                        tracing::error!(
                            stream = %cmds.who.stream,
                            id = %entry.id,
                            "shutting down before the dead-letter write succeeded; entry stays pending"
                        );
                        return false;
                    }
                }
            }
        }
    }
}
