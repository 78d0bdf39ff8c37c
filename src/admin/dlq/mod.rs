//! `redis-streamd dlq ls|show|stats|replay|purge`: the dead-letter streams of the
//! configured streams, read in batches however long they are.
//!
//! Which DLQs: every configured stream's `dlq` (each once), or with `--stream S` those of
//! the streams named S, keeping only entries whose `dlq_source_stream` is S (several
//! streams may share a DLQ).

mod act;
pub(crate) mod entry;
mod ls;
mod purge;
mod replay;
mod show;
mod stats;

use std::ops::ControlFlow;

use crate::admin::conn::Conn;
use crate::admin::filter::FilterArgs;
use crate::admin::{AdminError, Done, selected_streams};
use crate::config::Config;
use entry::DlqEntry;

pub use ls::LsArgs;
pub use purge::PurgeArgs;
pub use replay::ReplayArgs;
pub use show::ShowArgs;
pub use stats::StatsArgs;

/// Entries read per `XRANGE` while scanning a DLQ.
const SCAN_BATCH: u64 = 500;

/// `redis-streamd dlq ...`
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// One line per dead-letter entry: id, source, failed-at, attempts, reason, stderr,
    /// payload.
    Ls(LsArgs),
    /// Everything about one dead-letter entry.
    Show(ShowArgs),
    /// Dead-letter entries counted by reason, exit code, stream or hour.
    Stats(StatsArgs),
    /// Move entries back to their source streams (original fields, original order) and
    /// remove them from the dead-letter stream.
    Replay(ReplayArgs),
    /// Delete entries from the dead-letter stream.
    Purge(PurgeArgs),
}

pub(crate) async fn run(cmd: DlqCommand, config: &Config) -> Result<Done, AdminError> {
    let conn = Conn::connect(&config.redis).await?;
    let result = match cmd {
        DlqCommand::Ls(args) => ls::run(args, config, &conn).await,
        DlqCommand::Show(args) => show::run(args, config, &conn).await,
        DlqCommand::Stats(args) => stats::run(args, config, &conn).await,
        DlqCommand::Replay(args) => replay::run(args, config, &conn).await,
        DlqCommand::Purge(args) => purge::run(args, config, &conn).await,
    };
    conn.quit().await;
    result
}

/// One dead-letter stream to read, and the source stream its entries must come from
/// (`--stream`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) dlq: String,
    pub(crate) source: Option<String>,
}

impl Target {
    fn admits(&self, entry: &DlqEntry) -> bool {
        self.source
            .as_ref()
            .is_none_or(|s| entry.source_stream().as_deref() == Some(s.as_str()))
    }
}

/// The DLQs to read for `--stream` (all configured streams without it).
pub(crate) fn targets(config: &Config, stream: Option<&str>) -> Result<Vec<Target>, AdminError> {
    let mut out: Vec<Target> = Vec::new();
    for s in selected_streams(config, stream)? {
        let target = Target {
            dlq: s.dlq.clone(),
            source: stream.map(str::to_owned),
        };
        if !out.contains(&target) {
            out.push(target);
        }
    }
    Ok(out)
}

/// Reads `target` from the start in batches, calling `visit` for every entry that passes
/// the target and `filter`, until the end or `visit` breaks. Returns whether it broke.
pub(crate) async fn scan(
    conn: &Conn,
    target: &Target,
    filter: &FilterArgs,
    mut visit: impl FnMut(DlqEntry) -> ControlFlow<()>,
) -> Result<bool, AdminError> {
    let mut start = "-".to_owned();
    loop {
        let batch = conn.range(&target.dlq, &start, "+", SCAN_BATCH).await?;
        let full = batch.len() as u64 == SCAN_BATCH;
        let Some(last) = batch.last().map(|e| e.id.clone()) else {
            return Ok(false);
        };
        for raw in batch {
            let Some(entry) = DlqEntry::parse(&target.dlq, raw) else {
                continue;
            };
            if target.admits(&entry) && filter.matches(&entry) && visit(entry).is_break() {
                return Ok(true);
            }
        }
        if !full {
            return Ok(false);
        }
        start = format!("({last}");
    }
}

/// Looks `id` up in the targets' DLQs; the first DLQ holding it wins.
pub(crate) async fn find(
    conn: &Conn,
    targets: &[Target],
    id: &str,
) -> Result<Option<DlqEntry>, AdminError> {
    check_id(id)?;
    for target in targets {
        if let Some(raw) = conn.entry(&target.dlq, id).await?
            && let Some(entry) = DlqEntry::parse(&target.dlq, raw)
            && target.admits(&entry)
        {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// A stream id as Redis accepts it: `<ms>` or `<ms>-<seq>`.
pub(crate) fn check_id(id: &str) -> Result<(), AdminError> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match id.split_once('-') {
        Some((ms, seq)) => digits(ms) && digits(seq),
        None => digits(id),
    };
    if ok {
        Ok(())
    } else {
        Err(AdminError::Usage(format!(
            "{id:?} is not a stream entry id (such as 1700000000000-0)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("1700000000000-0").is_ok());
        assert!(check_id("17").is_ok());
        assert!(check_id("1-x").is_err());
        assert!(check_id("-").is_err());
        assert!(check_id("").is_err());
    }
}
