//! `redis-streamd dlq replay`: moves dead-letter entries back to their source streams,
//! with their original fields in their original order plus the loop guard.
//!
//! Nothing lost, nothing doubled:
//! - Where the DLQ and the source stream share a slot (always, outside Cluster) one Lua
//!   script adds the entry to the source and deletes it from the DLQ, and only if it is
//!   still in the DLQ: atomic, and a repeated run or a retried call never adds twice.
//! - Otherwise (Cluster, keys in different slots) a move is four steps: note the DLQ id
//!   in the hash `<dlq>:replaying`, XADD to the source (one attempt, never retried behind
//!   our back), XDEL from the DLQ, remove the note. A run that died between the steps
//!   leaves the note; the next replay of that DLQ looks for an entry carrying
//!   `redis_streamd_replayed_from = <dlq>/<id>` in the source stream from the noted time
//!   on, and finishes the move (XDEL) if it is there, or forgets the note if it is not.
//!
//! Ctrl-C or SIGTERM stop the run between two entries; the audit entry and the summary
//! say what was done, and running the same command again replays the rest.

use std::io::Write;

use super::act::{self, Audit, Batch, Request, Selection, Skip};
use super::entry::{DlqEntry, REPLAYED_FROM_FIELD};
use super::{Target, targets};
use crate::admin::confirm::confirm;
use crate::admin::conn::Conn;
use crate::admin::output::entries;
use crate::admin::output::note;
use crate::admin::progress::{Pacer, Progress, Rate, parse_rate, stop_on_signal};
use crate::admin::timefmt::now_ms;
use crate::admin::{AdminError, Done};
use crate::config::Config;
use tokio_util::sync::CancellationToken;

/// How far before the noted time a recovery looks for the replayed entry (clock skew
/// between this host and the Redis node of the source stream).
const RECOVERY_MARGIN_MS: u64 = 60_000;

/// `dlq replay (ID... | filters | --all) [--stream S] [--rate 50/s] [--dry-run] [--yes]
/// [--max-replays 3]`
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    req: Request,
    /// Entries per second: 50/s, 600/m, 0 for no limit.
    #[arg(long, value_name = "RATE", default_value = "50/s", value_parser = parse_rate)]
    rate: Rate,
    /// Print how many entries would be replayed and the first of them; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    yes: bool,
    /// Skip entries already replayed this many times (their redis_streamd_replays field).
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_replays: u64,
}

/// What a run did in one DLQ.
#[derive(Debug, Default)]
struct Tally {
    replayed: Vec<String>,
    /// Selected, but no longer in the DLQ when their turn came.
    gone: u64,
}

pub(crate) async fn run(
    args: ReplayArgs,
    config: &Config,
    conn: &Conn,
) -> Result<Done, AdminError> {
    let req = &args.req;
    req.check("replay")?;
    let targets = targets(config, req.stream.as_deref())?;
    if !args.dry_run {
        finish_interrupted(conn, &targets).await?;
    }
    let max = args.max_replays;
    let sel = act::select(conn, &targets, req, |e| match e.source_stream() {
        None => Some(Skip::NoSource),
        Some(_) if e.replays() >= max => Some(Skip::MaxReplays),
        Some(_) => None,
    })
    .await?;
    act::report_missing(&sel, &targets);
    let total = sel.total();
    let mut out = std::io::stdout().lock();
    if total == 0 {
        writeln!(out, "nothing to replay{}", skipped_note(&sel, max))?;
        return Ok(Done::Nothing);
    }
    let dlqs: Vec<&str> = sel.batches.iter().map(|b| b.dlq.as_str()).collect();
    if args.dry_run {
        writeln!(
            out,
            "would replay {} from {}{}",
            entries(total),
            dlqs.join(", "),
            skipped_note(&sel, max)
        )?;
        drop(out);
        act::print_preview(&sel)?;
        return Ok(Done::Ok);
    }
    let question = format!(
        "Replay {} from {} to their source streams at {}",
        entries(total),
        dlqs.join(", "),
        args.rate
    );
    drop(out);
    if !confirm(args.yes, &question)? {
        note!("nothing done");
        return Ok(Done::Nothing);
    }
    execute(conn, &sel, req, args.rate, max).await
}

fn skipped_note(sel: &Selection, max: u64) -> String {
    let mut note = String::new();
    if sel.max_replays > 0 {
        note.push_str(&format!(
            "; skipping {} at --max-replays {max}",
            sel.max_replays
        ));
    }
    if sel.no_source > 0 {
        note.push_str(&format!(
            "; skipping {} without dlq_source_stream",
            sel.no_source
        ));
    }
    note
}

async fn execute(
    conn: &Conn,
    sel: &Selection,
    req: &Request,
    rate: Rate,
    max: u64,
) -> Result<Done, AdminError> {
    let stop = stop_on_signal()?;
    let mut pacer = Pacer::new(rate);
    let mut progress = Progress::new("replaying", sel.total());
    let mut lines = Vec::new();
    let mut interrupted = false;
    let (mut replayed, mut gone) = (0u64, 0u64);
    for batch in &sel.batches {
        let mut tally = Tally::default();
        let result = replay_batch(conn, batch, &mut tally, &mut pacer, &mut progress, &stop).await;
        let handled = tally.replayed.len() + tally.gone as usize;
        interrupted = stop.is_cancelled() && handled < batch.ids.len();
        let audit = Audit {
            action: "replay",
            dlq: &batch.dlq,
            selection: req.describe(),
            count: tally.replayed.len() as u64,
            skipped: sel.skipped_in(&batch.dlq),
            interrupted,
            ids: &tally.replayed,
        };
        progress.finish();
        let audited = act::audit(conn, &audit).await;
        replayed += tally.replayed.len() as u64;
        gone += tally.gone;
        lines.push(format!(
            "replayed {} from {}",
            entries(tally.replayed.len() as u64),
            batch.dlq
        ));
        if let Err(e) = result {
            note!("redis-streamd: stopped after replaying {replayed} entries");
            return Err(e);
        }
        audited?;
        if interrupted {
            break;
        }
    }
    progress.finish();
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    if sel.max_replays > 0 {
        writeln!(
            out,
            "skipped {} at --max-replays {max}",
            entries(sel.max_replays)
        )?;
    }
    if sel.no_source > 0 {
        writeln!(
            out,
            "skipped {} without dlq_source_stream",
            entries(sel.no_source)
        )?;
    }
    if gone > 0 {
        writeln!(
            out,
            "{gone} entries were no longer in the dead-letter stream"
        )?;
    }
    if interrupted {
        writeln!(
            out,
            "interrupted: replayed {replayed} of {} entries; run the same command again to replay the rest",
            sel.total()
        )?;
        return Ok(Done::Interrupted);
    }
    Ok(Done::Ok)
}

async fn replay_batch(
    conn: &Conn,
    batch: &Batch,
    tally: &mut Tally,
    pacer: &mut Pacer,
    progress: &mut Progress,
    stop: &CancellationToken,
) -> Result<(), AdminError> {
    for id in &batch.ids {
        if !pacer.next(stop).await {
            return Ok(());
        }
        let entry = conn
            .entry(&batch.dlq, id)
            .await?
            .and_then(|raw| DlqEntry::parse(&batch.dlq, raw));
        let moved = match entry {
            Some(e) => move_back(conn, &e).await?,
            None => false,
        };
        if moved {
            tally.replayed.push(id.clone());
        } else {
            tally.gone += 1;
        }
        progress.advance(1, &batch.dlq);
    }
    Ok(())
}

/// The hash noting two-step moves in progress: DLQ id → unix ms before the XADD.
fn marker_key(dlq: &str) -> String {
    format!("{dlq}:replaying")
}

/// Moves one entry back to its source stream. False when it was no longer in the DLQ.
async fn move_back(conn: &Conn, e: &DlqEntry) -> Result<bool, AdminError> {
    let Some(source) = e.source_stream() else {
        return Ok(false);
    };
    let fields = e.replay_fields();
    if conn.atomic_replay_possible(&e.dlq, &source) {
        return Ok(conn
            .replay_atomic(&e.dlq, &source, &e.id, fields)
            .await?
            .is_some());
    }
    move_two_step(conn, e, &source, fields).await
}

/// The move in four steps, for keys in different Cluster slots (see the module doc).
async fn move_two_step(
    conn: &Conn,
    e: &DlqEntry,
    source: &str,
    fields: Vec<(bytes::Bytes, bytes::Bytes)>,
) -> Result<bool, AdminError> {
    let marker = marker_key(&e.dlq);
    conn.hset(&marker, &e.id, &now_ms().to_string()).await?;
    conn.xadd_once(source, fields).await?;
    conn.xdel(&e.dlq, std::slice::from_ref(&e.id)).await?;
    conn.hdel(&marker, &e.id).await?;
    Ok(true)
}

/// Finishes the two-step moves an earlier run left half-done in the targets' DLQs.
async fn finish_interrupted(conn: &Conn, targets: &[Target]) -> Result<(), AdminError> {
    let mut seen: Vec<&str> = Vec::new();
    for target in targets {
        if seen.contains(&target.dlq.as_str()) {
            continue;
        }
        seen.push(&target.dlq);
        let finished = recover(conn, &target.dlq).await?;
        if finished.is_empty() {
            continue;
        }
        writeln!(
            std::io::stdout().lock(),
            "finished {} an earlier run of replay left half-done in {}",
            entries(finished.len() as u64),
            target.dlq
        )?;
        let audit = Audit {
            action: "replay",
            dlq: &target.dlq,
            selection: "(finishing an interrupted replay)".into(),
            count: finished.len() as u64,
            skipped: 0,
            interrupted: false,
            ids: &finished,
        };
        act::audit(conn, &audit).await?;
    }
    Ok(())
}

/// Resolves the notes in `<dlq>:replaying`; returns the DLQ ids whose move it finished.
pub(crate) async fn recover(conn: &Conn, dlq: &str) -> Result<Vec<String>, AdminError> {
    let marker = marker_key(dlq);
    let mut finished = Vec::new();
    for (id, noted_at) in conn.hgetall(&marker).await? {
        let entry = conn
            .entry(dlq, &id)
            .await?
            .and_then(|raw| DlqEntry::parse(dlq, raw));
        if let Some(e) = entry
            && let Some(source) = e.source_stream()
        {
            let since = noted_at
                .parse::<u64>()
                .unwrap_or(0)
                .saturating_sub(RECOVERY_MARGIN_MS);
            if was_added(conn, &source, since, &format!("{dlq}/{id}")).await? {
                conn.xdel(dlq, std::slice::from_ref(&id)).await?;
                finished.push(id.clone());
            }
        }
        conn.hdel(&marker, &id).await?;
    }
    Ok(finished)
}

/// Whether `source` has an entry since `since_ms` whose replayed-from field is `from`.
async fn was_added(
    conn: &Conn,
    source: &str,
    since_ms: u64,
    from: &str,
) -> Result<bool, AdminError> {
    let mut start = format!("{since_ms}-0");
    loop {
        let batch = conn.range(source, &start, "+", 500).await?;
        let full = batch.len() == 500;
        for e in &batch {
            if e.field(REPLAYED_FROM_FIELD.as_bytes())
                .is_some_and(|v| v.as_ref() == from.as_bytes())
            {
                return Ok(true);
            }
        }
        match batch.last() {
            Some(last) if full => start = format!("({}", last.id),
            _ => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;
    use crate::test_support::RedisServer;
    use bytes::Bytes;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    async fn add_dead(conn: &Conn, n: u32) -> DlqEntry {
        let fields = vec![
            (b("payload"), Bytes::from(vec![0, 255, n as u8])),
            (b("dlq_source_stream"), b("src")),
            (b("dlq_source_id"), b(&format!("1-{n}"))),
            (b("dlq_reason"), b("exit code 1")),
        ];
        let id = conn.xadd_once("src:dlq", fields).await.expect("XADD");
        let raw = conn
            .entry("src:dlq", &id)
            .await
            .expect("XRANGE")
            .expect("entry");
        DlqEntry::parse("src:dlq", raw).expect("parses")
    }

    /// The Cluster cross-slot path, driven step by step on one server: a move completes;
    /// a run that died after its XADD is finished (not added twice); one that died before
    /// its XADD is forgotten, and the entry is replayed normally afterwards.
    #[tokio::test]
    async fn two_step_moves_resume_without_doubles() {
        let server = RedisServer::start();
        let cfg = RedisConfig::for_tests(&server.url());
        let conn = Conn::connect(&cfg).await.expect("connect");
        let (e1, e2, e3) = (
            add_dead(&conn, 1).await,
            add_dead(&conn, 2).await,
            add_dead(&conn, 3).await,
        );
        let marker = marker_key("src:dlq");

        assert!(
            move_two_step(&conn, &e1, "src", e1.replay_fields())
                .await
                .expect("move")
        );
        assert_eq!(conn.xlen("src").await.expect("XLEN"), 1);
        assert!(
            conn.entry("src:dlq", &e1.id)
                .await
                .expect("XRANGE")
                .is_none()
        );
        assert!(conn.hgetall(&marker).await.expect("HGETALL").is_empty());

        // Died after the XADD of e2, and after noting e3 but before its XADD.
        let noted = now_ms().to_string();
        conn.hset(&marker, &e2.id, &noted).await.expect("HSET");
        conn.xadd_once("src", e2.replay_fields())
            .await
            .expect("XADD");
        conn.hset(&marker, &e3.id, &noted).await.expect("HSET");

        let finished = recover(&conn, "src:dlq").await.expect("recover");
        assert_eq!(finished, vec![e2.id.clone()]);
        assert_eq!(
            conn.xlen("src").await.expect("XLEN"),
            2,
            "e2 is not added again"
        );
        assert!(
            conn.entry("src:dlq", &e2.id)
                .await
                .expect("XRANGE")
                .is_none()
        );
        assert!(
            conn.entry("src:dlq", &e3.id)
                .await
                .expect("XRANGE")
                .is_some()
        );
        assert!(conn.hgetall(&marker).await.expect("HGETALL").is_empty());
        assert!(recover(&conn, "src:dlq").await.expect("recover").is_empty());

        assert!(
            move_two_step(&conn, &e3, "src", e3.replay_fields())
                .await
                .expect("move")
        );
        let back = conn.range("src", "-", "+", 10).await.expect("XRANGE");
        let payloads: Vec<Bytes> = back
            .iter()
            .filter_map(|e| e.field(b"payload").cloned())
            .collect();
        assert_eq!(payloads, [1u8, 2, 3].map(|n| Bytes::from(vec![0, 255, n])));
        assert_eq!(conn.xlen("src:dlq").await.expect("XLEN"), 0);
        conn.quit().await;
    }
}
