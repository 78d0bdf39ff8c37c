//! `redis-streamd dlq purge`: deletes dead-letter entries (XDEL, 100 ids per command),
//! after a confirmation, and records what it deleted in `<dlq>:audit`.

use std::io::Write;

use super::act::{self, Audit, Request, Selection};
use super::targets;
use crate::admin::confirm::confirm;
use crate::admin::conn::Conn;
use crate::admin::output::entries;
use crate::admin::output::note;
use crate::admin::progress::{Progress, stop_on_signal};
use crate::admin::{AdminError, Done};
use crate::config::Config;

/// Ids per XDEL.
const XDEL_BATCH: usize = 100;

/// `dlq purge (ID... | filters | --all) [--stream S] [--dry-run] [--yes]`
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    req: Request,
    /// Print how many entries would be deleted and the first of them; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long)]
    yes: bool,
}

pub(crate) async fn run(args: PurgeArgs, config: &Config, conn: &Conn) -> Result<Done, AdminError> {
    let req = &args.req;
    req.check("purge")?;
    let targets = targets(config, req.stream.as_deref())?;
    let sel = act::select(conn, &targets, req, |_| None).await?;
    act::report_missing(&sel, &targets);
    let total = sel.total();
    let mut out = std::io::stdout().lock();
    if total == 0 {
        writeln!(out, "nothing to purge")?;
        return Ok(Done::Nothing);
    }
    let dlqs: Vec<&str> = sel.batches.iter().map(|b| b.dlq.as_str()).collect();
    if args.dry_run {
        writeln!(
            out,
            "would purge {} from {}",
            entries(total),
            dlqs.join(", ")
        )?;
        drop(out);
        act::print_preview(&sel)?;
        return Ok(Done::Ok);
    }
    drop(out);
    let question = format!(
        "Delete {} from {} for good",
        entries(total),
        dlqs.join(", ")
    );
    if !confirm(args.yes, &question)? {
        note!("nothing done");
        return Ok(Done::Nothing);
    }
    execute(conn, &sel, req).await
}

async fn execute(conn: &Conn, sel: &Selection, req: &Request) -> Result<Done, AdminError> {
    let stop = stop_on_signal()?;
    let mut progress = Progress::new("purging", sel.total());
    let mut lines = Vec::new();
    let mut purged_all = 0u64;
    let mut stopped = false;
    for batch in &sel.batches {
        let (mut purged, mut ids) = (0u64, Vec::new());
        let mut result = Ok(());
        for chunk in batch.ids.chunks(XDEL_BATCH) {
            if stop.is_cancelled() {
                break;
            }
            match conn.xdel(&batch.dlq, chunk).await {
                Ok(n) => purged += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            ids.extend_from_slice(chunk);
            progress.advance(chunk.len() as u64, &batch.dlq);
        }
        let interrupted = ids.len() < batch.ids.len();
        let audit = Audit {
            action: "purge",
            dlq: &batch.dlq,
            selection: req.describe(),
            count: purged,
            skipped: 0,
            interrupted,
            ids: &ids,
        };
        progress.finish();
        let audited = act::audit(conn, &audit).await;
        purged_all += purged;
        lines.push(format!("purged {} from {}", entries(purged), batch.dlq));
        result?;
        audited?;
        if interrupted {
            stopped = true;
            break;
        }
    }
    progress.finish();
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    if stopped {
        writeln!(
            out,
            "interrupted: purged {purged_all} of {}",
            entries(sel.total())
        )?;
        return Ok(Done::Interrupted);
    }
    Ok(Done::Ok)
}
