//! `redis-streamd dlq ls`: one line per dead-letter entry, or one JSON object per line.

use std::io::Write;
use std::ops::ControlFlow;

use super::entry::DlqEntry;
use super::{Target, scan, targets};
use crate::admin::conn::Conn;
use crate::admin::filter::FilterArgs;
use crate::admin::output::{Column, Style, Table, escape, first_line, json_line, width};
use crate::admin::timefmt::{age, local_short, now_ms};
use crate::admin::{AdminError, Done};
use crate::config::Config;

/// Rows rendered per table chunk (column widths are fixed by the first chunk).
const CHUNK: usize = 1000;

/// `dlq ls [--stream S] [filters] [--limit N] [--json]`
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Only the dead-letter entries of this configured stream.
    #[arg(long, value_name = "S")]
    stream: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// List at most N entries (default: all that match).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// One JSON object per line with every field.
    #[arg(long)]
    json: bool,
}

/// The listing's columns.
pub(crate) fn columns(style: Style) -> Vec<Column> {
    vec![
        Column::fixed("ID"),
        Column::flex("SOURCE"),
        Column::fixed("FAILED"),
        Column::number("AGE"),
        Column::number("ATT"),
        Column::flex("REASON").coloured(style.red),
        Column::flex("STDERR"),
        Column::flex("PAYLOAD"),
    ]
}

/// One listing row: escaped text only.
pub(crate) fn row(e: &DlqEntry, now: u64) -> Vec<String> {
    let source = match (e.source_stream(), e.source_id()) {
        (Some(s), Some(id)) => format!("{} {id}", escape(s.as_bytes())),
        (Some(s), None) => escape(s.as_bytes()),
        _ => "?".to_owned(),
    };
    let at = e.failed_at_ms();
    vec![
        e.id.clone(),
        source,
        local_short(at),
        age(now.saturating_sub(at)),
        e.attempts().map_or("?".into(), |a| a.to_string()),
        escape(e.reason().as_bytes()),
        first_line(e.stderr()),
        e.payload_preview(),
    ]
}

/// Renders entries as a table, `CHUNK` rows at a time.
pub(crate) struct Lister<W: Write> {
    out: W,
    table: Table,
    widths: Option<Vec<usize>>,
    style: Style,
    width: usize,
    now: u64,
}

impl<W: Write> Lister<W> {
    pub(crate) fn new(out: W, style: Style) -> Self {
        Lister {
            out,
            table: Table::new(columns(style)),
            widths: None,
            style,
            width: width(),
            now: now_ms(),
        }
    }

    pub(crate) fn push(&mut self, e: &DlqEntry) -> std::io::Result<()> {
        self.table.push(row(e, self.now));
        if self.table.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        if self.table.is_empty() {
            return Ok(());
        }
        let header = self.widths.is_none();
        let widths = self
            .widths
            .get_or_insert_with(|| self.table.widths(self.width))
            .clone();
        self.table
            .render_with(&mut self.out, &widths, header, self.style)?;
        self.table.clear();
        Ok(())
    }
}

pub(crate) async fn run(args: LsArgs, config: &Config, conn: &Conn) -> Result<Done, AdminError> {
    let targets = targets(config, args.stream.as_deref())?;
    let stdout = std::io::stdout();
    let style = Style::for_stdout();
    let mut lister = Lister::new(stdout.lock(), style);
    let mut shown = 0usize;
    let limit = args.limit.unwrap_or(usize::MAX);
    let now = now_ms();
    for target in &targets {
        if shown >= limit {
            break;
        }
        shown += list_one(conn, target, &args, &mut lister, limit - shown, now).await?;
    }
    lister.flush()?;
    if !args.json {
        let mut out = stdout.lock();
        let noun = if shown == 1 { "entry" } else { "entries" };
        let more = if shown == limit {
            " (--limit reached)"
        } else {
            ""
        };
        writeln!(out, "{}{shown} {noun}{more}{}", style.dim, style.reset)?;
    }
    Ok(if shown == 0 { Done::Nothing } else { Done::Ok })
}

async fn list_one<W: Write>(
    conn: &Conn,
    target: &Target,
    args: &LsArgs,
    lister: &mut Lister<W>,
    limit: usize,
    now: u64,
) -> Result<usize, AdminError> {
    let mut shown = 0usize;
    let mut failed: Option<std::io::Error> = None;
    scan(conn, target, &args.filter, |entry| {
        let written = if args.json {
            json_line(&mut lister.out, &entry.to_json(now))
        } else {
            lister.push(&entry)
        };
        if let Err(e) = written {
            failed = Some(e);
            return ControlFlow::Break(());
        }
        shown += 1;
        if shown >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(shown),
    }
}
