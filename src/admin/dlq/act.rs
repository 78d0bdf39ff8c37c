//! What `replay` and `purge` share: which entries a request names (IDs, or everything
//! the filters match, scanned in batches), the dry run, the confirmation, and the audit
//! entry appended to `<dlq>:audit` (and logged) for every DLQ they touched.

use std::io::Write;
use std::ops::ControlFlow;

use super::entry::DlqEntry;
use super::ls::Lister;
use super::{Target, find, scan};
use crate::admin::AdminError;
use crate::admin::conn::Conn;
use crate::admin::filter::FilterArgs;
use crate::admin::output::note;
use crate::admin::output::{Style, escape};
use crate::admin::timefmt::{now_ms, rfc3339};

/// Entries a dry run shows.
const PREVIEW: usize = 10;

/// What the operator asked to touch.
#[derive(Debug, clap::Args)]
pub(crate) struct Request {
    /// Entry ids in the dead-letter stream (or select entries with filters or --all).
    #[arg(value_name = "ID")]
    pub(crate) ids: Vec<String>,
    /// Only the dead-letter entries of this configured stream.
    #[arg(long, value_name = "S")]
    pub(crate) stream: Option<String>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Every entry of the dead-letter streams (of --stream).
    #[arg(long)]
    pub(crate) all: bool,
}

impl Request {
    /// IDs, or filters / `--all`: exactly one of the two.
    pub(crate) fn check(&self, verb: &str) -> Result<(), AdminError> {
        let by_filter = self.all || !self.filter.is_empty();
        match (self.ids.is_empty(), by_filter) {
            (false, true) => Err(AdminError::Usage(format!(
                "{verb}: give entry IDs or filters (--all), not both"
            ))),
            (true, false) => Err(AdminError::Usage(format!(
                "{verb}: name entries by ID, or select them with filters (--reason, --exit-code, \
                 --since, --before, --source-id, --field) or --all"
            ))),
            _ => Ok(()),
        }
    }

    /// The request as a command-line fragment, for the audit entry.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.stream {
            parts.push(format!("--stream {s:?}"));
        }
        if self.all {
            parts.push("--all".to_owned());
        }
        let filter = self.filter.describe();
        if !filter.is_empty() {
            parts.push(filter);
        }
        parts.extend(self.ids.iter().cloned());
        parts.join(" ")
    }
}

/// The ids selected in one DLQ, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) dlq: String,
    pub(crate) ids: Vec<String>,
}

/// Why a matching entry is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Its `redis_streamd_replays` reached `--max-replays`.
    MaxReplays,
    /// It has no `dlq_source_stream`: nowhere to replay it to.
    NoSource,
}

/// What a request selected.
#[derive(Debug, Default)]
pub(crate) struct Selection {
    pub(crate) batches: Vec<Batch>,
    pub(crate) preview: Vec<DlqEntry>,
    pub(crate) max_replays: u64,
    pub(crate) no_source: u64,
    /// Skipped entries per DLQ (for the audit entries).
    skipped_in: std::collections::BTreeMap<String, u64>,
    /// IDs given that are in none of the DLQs.
    pub(crate) missing: Vec<String>,
}

impl Selection {
    pub(crate) fn total(&self) -> u64 {
        self.batches.iter().map(|b| b.ids.len() as u64).sum()
    }

    /// Entries of `dlq` that matched but are left alone.
    pub(crate) fn skipped_in(&self, dlq: &str) -> u64 {
        self.skipped_in.get(dlq).copied().unwrap_or(0)
    }

    fn take(&mut self, entry: DlqEntry, skip: &impl Fn(&DlqEntry) -> Option<Skip>) {
        let skipped = skip(&entry);
        if skipped.is_some() {
            *self.skipped_in.entry(entry.dlq.clone()).or_default() += 1;
        }
        match skipped {
            Some(Skip::MaxReplays) => self.max_replays += 1,
            Some(Skip::NoSource) => self.no_source += 1,
            None => {
                match self.batches.last_mut() {
                    Some(b) if b.dlq == entry.dlq => b.ids.push(entry.id.clone()),
                    _ => self.batches.push(Batch {
                        dlq: entry.dlq.clone(),
                        ids: vec![entry.id.clone()],
                    }),
                }
                if self.preview.len() < PREVIEW {
                    self.preview.push(entry);
                }
            }
        }
    }
}

/// Resolves a request: each ID looked up in the targets' DLQs, or every entry of every
/// target that the filters match. `skip` says which matches to leave alone.
pub(crate) async fn select(
    conn: &Conn,
    targets: &[Target],
    req: &Request,
    skip: impl Fn(&DlqEntry) -> Option<Skip>,
) -> Result<Selection, AdminError> {
    let mut sel = Selection::default();
    if !req.ids.is_empty() {
        let mut entries = Vec::new();
        for id in &req.ids {
            match find(conn, targets, id).await? {
                Some(e)
                    if !entries
                        .iter()
                        .any(|x: &DlqEntry| x.dlq == e.dlq && x.id == e.id) =>
                {
                    entries.push(e)
                }
                Some(_) => {}
                None => sel.missing.push(id.clone()),
            }
        }
        // Per DLQ, oldest first, as a filter would select them.
        entries
            .sort_by(|a, b| (a.dlq.as_str(), id_key(&a.id)).cmp(&(b.dlq.as_str(), id_key(&b.id))));
        for e in entries {
            sel.take(e, &skip);
        }
        return Ok(sel);
    }
    for target in targets {
        scan(conn, target, &req.filter, |e| {
            sel.take(e, &skip);
            ControlFlow::Continue(())
        })
        .await?;
    }
    Ok(sel)
}

fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Prints the first selected entries (dry run).
pub(crate) fn print_preview(sel: &Selection) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut lister = Lister::new(stdout.lock(), Style::for_stdout());
    for e in &sel.preview {
        lister.push(e)?;
    }
    lister.flush()?;
    let more = sel.total().saturating_sub(sel.preview.len() as u64);
    if more > 0 {
        writeln!(stdout.lock(), "... and {more} more")?;
    }
    Ok(())
}

/// Tells about IDs that were not found.
pub(crate) fn report_missing(sel: &Selection, targets: &[Target]) {
    if sel.missing.is_empty() {
        return;
    }
    let dlqs: Vec<String> = targets.iter().map(|t| escape(t.dlq.as_bytes())).collect();
    note!(
        "redis-streamd: not found in {}: {}",
        dlqs.join(", "),
        sel.missing.join(" ")
    );
}

/// One audit record.
pub(crate) struct Audit<'a> {
    pub(crate) action: &'static str,
    pub(crate) dlq: &'a str,
    pub(crate) selection: String,
    /// Entries replayed or purged (ids below).
    pub(crate) count: u64,
    pub(crate) skipped: u64,
    pub(crate) interrupted: bool,
    pub(crate) ids: &'a [String],
}

/// The user running the command: `$USER` (`$LOGNAME`), else the uid; with `sudo`, the
/// invoking user too.
fn user() -> String {
    use std::os::unix::fs::MetadataExt;
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            std::fs::metadata("/proc/self")
                .ok()
                .map(|m| format!("uid {}", m.uid()))
        })
        .unwrap_or_else(|| "unknown".into());
    match std::env::var("SUDO_USER") {
        Ok(by) if !by.is_empty() && by != name => format!("{name} (sudo by {by})"),
        _ => name,
    }
}

fn host() -> String {
    nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Logs the audit line and appends it to `<dlq>:audit`.
pub(crate) async fn audit(conn: &Conn, a: &Audit<'_>) -> Result<(), AdminError> {
    let fields: Vec<(&str, String)> = vec![
        ("action", a.action.to_owned()),
        ("user", user()),
        ("host", host()),
        ("at", rfc3339(now_ms())),
        ("dlq", a.dlq.to_owned()),
        ("selection", a.selection.clone()),
        ("count", a.count.to_string()),
        ("skipped", a.skipped.to_string()),
        ("interrupted", a.interrupted.to_string()),
        ("ids", a.ids.join(" ")),
    ];
    let line: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
        .collect();
    tracing::info!(target: "redis_streamd::audit", "audit {}", line.join(" "));
    conn.xadd_text(&format!("{}:audit", a.dlq), &fields).await?;
    Ok(())
}
