//! `redis-streamd dlq show ID`: every original field, every `dlq_*` field and the whole
//! stderr tail of one entry, escaped for the terminal (or one JSON object).

use std::io::Write;

use bytes::Bytes;

use super::entry::DlqEntry;
use super::{find, targets};
use crate::admin::conn::Conn;
use crate::admin::output::note;
use crate::admin::output::{Style, escape, json_line};
use crate::admin::timefmt::{age, local_full, now_ms};
use crate::admin::{AdminError, Done};
use crate::config::Config;

/// `dlq show ID [--stream S] [--json]`
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The entry's id in the dead-letter stream.
    id: String,
    /// Look only in the dead-letter stream of this configured stream.
    #[arg(long, value_name = "S")]
    stream: Option<String>,
    /// One JSON object with every field.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: ShowArgs, config: &Config, conn: &Conn) -> Result<Done, AdminError> {
    let targets = targets(config, args.stream.as_deref())?;
    let Some(entry) = find(conn, &targets, &args.id).await? else {
        let where_: Vec<&str> = targets.iter().map(|t| t.dlq.as_str()).collect();
        note!(
            "redis-streamd: no entry {} in {}",
            args.id,
            where_.join(", ")
        );
        return Ok(Done::Nothing);
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        json_line(&mut out, &entry.to_json(now_ms()))?;
    } else {
        render(&mut out, &entry, Style::for_stdout())?;
    }
    Ok(Done::Ok)
}

fn render(out: &mut impl Write, e: &DlqEntry, style: Style) -> std::io::Result<()> {
    let (b, r) = (style.bold, style.reset);
    let at = e.failed_at_ms();
    writeln!(
        out,
        "{b}DLQ entry {} in {}{r}",
        e.id,
        escape(e.dlq.as_bytes())
    )?;
    let source = match (e.source_stream(), e.source_id()) {
        (Some(s), Some(id)) => format!("{} {id}", escape(s.as_bytes())),
        _ => "? (no dlq_source_stream: not written by redis-streamd)".to_owned(),
    };
    let lines = [
        ("source", source),
        (
            "failed at",
            format!(
                "{} ({} ago)",
                local_full(at),
                age(now_ms().saturating_sub(at))
            ),
        ),
        (
            "attempts",
            e.attempts().map_or("?".into(), |a| a.to_string()),
        ),
        (
            "reason",
            format!("{}{}{}", style.red, escape(e.reason().as_bytes()), r),
        ),
        ("replays", e.replays().to_string()),
    ];
    for (label, value) in lines {
        writeln!(out, "  {label:<10} {value}")?;
    }
    writeln!(out, "{b}Fields ({}){r}", e.original.len())?;
    pairs(out, &e.original)?;
    let meta: Vec<(Bytes, Bytes)> = e
        .meta
        .iter()
        .filter(|(k, _)| k.as_ref() != b"dlq_stderr")
        .cloned()
        .collect();
    writeln!(out, "{b}DLQ fields ({}, dlq_stderr below){r}", meta.len())?;
    pairs(out, &meta)?;
    let stderr = e.stderr();
    writeln!(out, "{b}stderr ({} bytes){r}", stderr.len())?;
    let text = stderr.strip_suffix(b"\n").unwrap_or(stderr);
    if !text.is_empty() {
        for line in text.split(|c| *c == b'\n') {
            writeln!(out, "  {}", escape(line))?;
        }
    }
    Ok(())
}

/// `  name  value` lines, names padded to the longest, everything escaped.
fn pairs(out: &mut impl Write, pairs: &[(Bytes, Bytes)]) -> std::io::Result<()> {
    let names: Vec<String> = pairs.iter().map(|(k, _)| escape(k)).collect();
    let pad = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    for (name, (_, value)) in names.iter().zip(pairs) {
        let fill = " ".repeat(pad - name.chars().count());
        writeln!(out, "  {name}{fill}  {}", escape(value))?;
    }
    Ok(())
}
