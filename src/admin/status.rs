//! `redis-streamd status`: what Redis says about each configured stream and group, read
//! straight from Redis (no daemon needed): length, the group's lag and pending count, the
//! oldest pending entry's age, every consumer with its pending count and idle time (dead
//! when idle longer than the stream's `claim_idle` with entries pending), and the DLQ's
//! length and newest entry's age. `--watch` repeats it, redrawn in place on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::json;

use crate::admin::conn::Conn;
use crate::admin::dlq::entry::DlqEntry;
use crate::admin::output::{Column, Style, Table, escape, json_line, width};
use crate::admin::progress::stop_on_signal;
use crate::admin::timefmt::{age, id_ms, idle, local_full, now_ms, parse_interval};
use crate::admin::{AdminError, Done, selected_streams};
use crate::config::{Config, StreamConfig};

/// `status [--stream S] [--json] [--watch 2s]`
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this configured stream.
    #[arg(long, value_name = "S")]
    stream: Option<String>,
    /// One JSON object per stream and group.
    #[arg(long)]
    json: bool,
    /// Repeat every INTERVAL (e.g. 2s) until Ctrl-C, redrawn in place on a terminal.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_interval)]
    watch: Option<Duration>,
}

#[derive(Debug)]
struct ConsumerStatus {
    name: String,
    pending: u64,
    idle_ms: u64,
    dead: bool,
}

#[derive(Debug)]
struct StreamStatus {
    stream: String,
    group: String,
    group_exists: bool,
    length: u64,
    lag: Option<u64>,
    pending: u64,
    oldest_pending: Option<String>,
    consumers: Vec<ConsumerStatus>,
    dlq: String,
    dlq_length: u64,
    dlq_newest: Option<(String, u64)>,
}

pub(crate) async fn run(args: StatusArgs, config: &Config) -> Result<Done, AdminError> {
    let streams = selected_streams(config, args.stream.as_deref())?;
    let conn = Conn::connect(&config.redis).await?;
    let result = match args.watch {
        None => once(&conn, &streams, args.json).await,
        Some(every) => watch(&conn, &streams, args.json, every).await,
    };
    conn.quit().await;
    result.map(|()| Done::Ok)
}

async fn once(conn: &Conn, streams: &[&StreamConfig], json: bool) -> Result<(), AdminError> {
    let statuses = collect(conn, streams).await?;
    let mut out = std::io::stdout().lock();
    render(&mut out, &statuses, json, now_ms())?;
    Ok(())
}

async fn watch(
    conn: &Conn,
    streams: &[&StreamConfig],
    json: bool,
    every: Duration,
) -> Result<(), AdminError> {
    let stop = stop_on_signal()?;
    let redraw = std::io::stdout().is_terminal() && !json;
    let mut first = true;
    loop {
        let now = now_ms();
        let statuses = collect(conn, streams).await;
        let mut out = std::io::stdout().lock();
        if redraw {
            write!(out, "\u{1b}[H\u{1b}[2J")?;
            writeln!(
                out,
                "every {} · {}",
                humantime::format_duration(every),
                local_full(now)
            )?;
        } else if !first && !json {
            writeln!(out)?;
        }
        match statuses {
            Ok(statuses) => render(&mut out, &statuses, json, now)?,
            // Keep watching through an outage: that is when one watches.
            Err(e) => writeln!(out, "redis-streamd: {e}")?,
        }
        out.flush()?;
        drop(out);
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

async fn collect(conn: &Conn, streams: &[&StreamConfig]) -> Result<Vec<StreamStatus>, AdminError> {
    let mut out = Vec::with_capacity(streams.len());
    for s in streams {
        out.push(collect_one(conn, s).await?);
    }
    Ok(out)
}

async fn collect_one(conn: &Conn, s: &StreamConfig) -> Result<StreamStatus, AdminError> {
    let length = conn.xlen(&s.name).await?;
    let group = conn
        .groups(&s.name)
        .await?
        .into_iter()
        .find(|g| g.name == s.group);
    let mut status = StreamStatus {
        stream: s.name.clone(),
        group: s.group.clone(),
        group_exists: group.is_some(),
        length,
        lag: None,
        pending: 0,
        oldest_pending: None,
        consumers: Vec::new(),
        dlq: s.dlq.clone(),
        dlq_length: conn.xlen(&s.dlq).await?,
        dlq_newest: None,
    };
    if let Some(g) = group {
        status.lag = g.lag;
        status.pending = g.pending;
        status.oldest_pending = conn.pending_summary(&s.name, &s.group).await?.oldest;
        let claim_idle = s.claim_idle.as_millis() as u64;
        status.consumers = conn
            .consumers(&s.name, &s.group)
            .await?
            .into_iter()
            .map(|c| ConsumerStatus {
                dead: c.pending > 0 && c.idle_ms > claim_idle,
                name: c.name,
                pending: c.pending,
                idle_ms: c.idle_ms,
            })
            .collect();
    }
    if status.dlq_length > 0
        && let Some(newest) = conn.newest(&s.dlq).await?
    {
        let id = newest.id.clone();
        let at = DlqEntry::parse(&s.dlq, newest)
            .map_or_else(|| id_ms(&id).unwrap_or(0), |e| e.failed_at_ms());
        status.dlq_newest = Some((id, at));
    }
    Ok(status)
}

fn render(
    out: &mut impl Write,
    statuses: &[StreamStatus],
    json: bool,
    now: u64,
) -> std::io::Result<()> {
    if json {
        for s in statuses {
            json_line(out, &to_json(s, now))?;
        }
        return Ok(());
    }
    let style = Style::for_stdout();
    let width = width();
    streams_table(statuses, now).render(out, width, style)?;
    let consumers = consumers_table(statuses, style);
    if !consumers.is_empty() {
        writeln!(out)?;
        consumers.render(out, width, style)?;
    }
    Ok(())
}

fn streams_table(statuses: &[StreamStatus], now: u64) -> Table {
    let mut t = Table::new(vec![
        Column::flex("STREAM"),
        Column::flex("GROUP"),
        Column::number("LENGTH"),
        Column::number("LAG"),
        Column::number("PENDING"),
        Column::number("OLDEST"),
        Column::flex("DLQ"),
        Column::number("DLQ LEN"),
        Column::number("NEWEST"),
    ]);
    for s in statuses {
        let (group, lag, pending, oldest) = if s.group_exists {
            (
                escape(s.group.as_bytes()),
                s.lag.map_or("?".into(), |l| l.to_string()),
                s.pending.to_string(),
                s.oldest_pending
                    .as_deref()
                    .and_then(id_ms)
                    .map_or("-".into(), |ms| age(now.saturating_sub(ms))),
            )
        } else {
            (
                format!("{} (none)", escape(s.group.as_bytes())),
                "-".into(),
                "-".into(),
                "-".into(),
            )
        };
        t.push(vec![
            escape(s.stream.as_bytes()),
            group,
            s.length.to_string(),
            lag,
            pending,
            oldest,
            escape(s.dlq.as_bytes()),
            s.dlq_length.to_string(),
            s.dlq_newest
                .as_ref()
                .map_or("-".into(), |(_, at)| age(now.saturating_sub(*at))),
        ]);
    }
    t
}

fn consumers_table(statuses: &[StreamStatus], style: Style) -> Table {
    let mut t = Table::new(vec![
        Column::flex("STREAM"),
        Column::flex("GROUP"),
        Column::flex("CONSUMER"),
        Column::number("PENDING"),
        Column::number("IDLE"),
        Column::fixed("STATE").coloured(style.red),
    ]);
    for s in statuses {
        for c in &s.consumers {
            t.push(vec![
                escape(s.stream.as_bytes()),
                escape(s.group.as_bytes()),
                escape(c.name.as_bytes()),
                c.pending.to_string(),
                idle(c.idle_ms),
                if c.dead { "dead".into() } else { String::new() },
            ]);
        }
    }
    t
}

fn to_json(s: &StreamStatus, now: u64) -> serde_json::Value {
    let consumers: Vec<serde_json::Value> = s
        .consumers
        .iter()
        .map(
            |c| json!({"name": c.name, "pending": c.pending, "idle_ms": c.idle_ms, "dead": c.dead}),
        )
        .collect();
    let oldest_age = s
        .oldest_pending
        .as_deref()
        .and_then(id_ms)
        .map(|ms| now.saturating_sub(ms));
    json!({
        "stream": s.stream,
        "group": s.group,
        "group_exists": s.group_exists,
        "length": s.length,
        "lag": s.lag,
        "pending": s.pending,
        "oldest_pending_id": s.oldest_pending,
        "oldest_pending_age_ms": oldest_age,
        "consumers": consumers,
        "dlq": s.dlq,
        "dlq_length": s.dlq_length,
        "dlq_newest_id": s.dlq_newest.as_ref().map(|(id, _)| id),
        "dlq_newest_age_ms": s.dlq_newest.as_ref().map(|(_, at)| now.saturating_sub(*at)),
    })
}
