//! `redis-streamd dlq stats`: dead-letter entries counted by reason, exit code, source
//! stream or hour, with the age of the newest entry of each group.

use std::collections::HashMap;
use std::ops::ControlFlow;

use super::entry::DlqEntry;
use super::{scan, targets};
use crate::admin::conn::Conn;
use crate::admin::filter::FilterArgs;
use crate::admin::output::{Column, Style, Table, entries, escape, json_line, width};
use crate::admin::timefmt::{age, local_hour, now_ms};
use crate::admin::{AdminError, Done};
use crate::config::Config;

/// What `--by` groups on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum By {
    /// `dlq_reason`, as written.
    Reason,
    /// The handler's exit code (`-` for other failures: signals, timeouts, ...).
    Exit,
    /// `dlq_source_stream`.
    Stream,
    /// The local hour the entry was dead-lettered in.
    Hour,
}

impl By {
    fn name(self) -> &'static str {
        match self {
            By::Reason => "reason",
            By::Exit => "exit",
            By::Stream => "stream",
            By::Hour => "hour",
        }
    }

    fn key(self, e: &DlqEntry) -> String {
        match self {
            By::Reason => e.reason(),
            By::Exit => e.exit_code().map_or("-".into(), |c| c.to_string()),
            By::Stream => e.source_stream().unwrap_or_else(|| "?".into()),
            By::Hour => local_hour(e.failed_at_ms()),
        }
    }
}

/// `dlq stats [--stream S] [--by reason|exit|stream|hour] [filters] [--json]`
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Only the dead-letter entries of this configured stream.
    #[arg(long, value_name = "S")]
    stream: Option<String>,
    /// What to count by.
    #[arg(long, value_enum, default_value = "reason")]
    by: By,
    #[command(flatten)]
    filter: FilterArgs,
    /// One JSON object per group: by, key, count, newest_ms, newest_age_ms.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default)]
struct Group {
    count: u64,
    newest_ms: u64,
}

pub(crate) async fn run(args: StatsArgs, config: &Config, conn: &Conn) -> Result<Done, AdminError> {
    let mut groups: HashMap<String, Group> = HashMap::new();
    for target in targets(config, args.stream.as_deref())? {
        scan(conn, &target, &args.filter, |e| {
            let g = groups.entry(args.by.key(&e)).or_default();
            g.count += 1;
            g.newest_ms = g.newest_ms.max(e.failed_at_ms());
            ControlFlow::Continue(())
        })
        .await?;
    }
    let mut rows: Vec<(String, Group)> = groups.into_iter().collect();
    if args.by == By::Hour {
        rows.sort_by(|a, b| a.0.cmp(&b.0));
    } else {
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    }
    let now = now_ms();
    let mut out = std::io::stdout().lock();
    if args.json {
        for (key, g) in &rows {
            let line = serde_json::json!({
                "by": args.by.name(),
                "key": key,
                "count": g.count,
                "newest_ms": g.newest_ms,
                "newest_age_ms": now.saturating_sub(g.newest_ms),
            });
            json_line(&mut out, &line)?;
        }
    } else {
        let style = Style::for_stdout();
        let mut table = Table::new(vec![
            Column::number("COUNT"),
            Column::number("NEWEST"),
            Column::flex(match args.by {
                By::Reason => "REASON",
                By::Exit => "EXIT CODE",
                By::Stream => "STREAM",
                By::Hour => "HOUR",
            }),
        ]);
        for (key, g) in &rows {
            table.push(vec![
                g.count.to_string(),
                age(now.saturating_sub(g.newest_ms)),
                escape(key.as_bytes()),
            ]);
        }
        table.render(&mut out, width(), style)?;
        let total: u64 = rows.iter().map(|(_, g)| g.count).sum();
        use std::io::Write;
        writeln!(out, "{}{} in all{}", style.dim, entries(total), style.reset)?;
    }
    Ok(if rows.is_empty() {
        Done::Nothing
    } else {
        Done::Ok
    })
}
