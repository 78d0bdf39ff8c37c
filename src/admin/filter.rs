//! The selection flags shared by `dlq ls|stats|replay|purge`. All given filters must
//! match (AND). Time bounds are resolved to absolute times when the command starts, so a
//! long replay selects the same entries from start to end.

use crate::admin::dlq::entry::DlqEntry;
use crate::admin::timefmt::{parse_bound, rfc3339};

/// `--field name=value`: the first original field `name` equals `value` exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldMatch {
    name: String,
    value: String,
}

fn parse_field(text: &str) -> Result<FieldMatch, String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok(FieldMatch {
            name: name.to_owned(),
            value: value.to_owned(),
        }),
        _ => Err(format!("{text:?} is not name=value")),
    }
}

/// Filters over DLQ entries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only entries whose dlq_reason contains TEXT (case-sensitive).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Only entries whose handler exited with code N.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    exit_code: Option<i32>,
    /// Only entries dead-lettered at or after WHEN: an RFC 3339 time or an age (2h, 30m).
    #[arg(long, value_name = "WHEN", value_parser = parse_bound)]
    since: Option<u64>,
    /// Only entries dead-lettered before WHEN: an RFC 3339 time or an age (2h, 30m).
    #[arg(long, value_name = "WHEN", value_parser = parse_bound)]
    before: Option<u64>,
    /// Only the entry that had id ID in its source stream.
    #[arg(long, value_name = "ID")]
    source_id: Option<String>,
    /// Only entries whose original field NAME equals VALUE (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_field)]
    field: Vec<FieldMatch>,
}

impl FilterArgs {
    /// No filter given.
    pub(crate) fn is_empty(&self) -> bool {
        self.reason.is_none()
            && self.exit_code.is_none()
            && self.since.is_none()
            && self.before.is_none()
            && self.source_id.is_none()
            && self.field.is_empty()
    }

    /// Whether `entry` passes every filter.
    pub(crate) fn matches(&self, entry: &DlqEntry) -> bool {
        if let Some(text) = &self.reason
            && !entry.reason().contains(text.as_str())
        {
            return false;
        }
        if let Some(code) = self.exit_code
            && entry.exit_code() != Some(code)
        {
            return false;
        }
        let at = entry.failed_at_ms();
        if self.since.is_some_and(|since| at < since)
            || self.before.is_some_and(|before| at >= before)
        {
            return false;
        }
        if let Some(id) = &self.source_id
            && entry.source_id().as_deref() != Some(id.as_str())
        {
            return false;
        }
        self.field.iter().all(|f| {
            entry
                .field(f.name.as_bytes())
                .is_some_and(|v| v.as_ref() == f.value.as_bytes())
        })
    }

    /// The filters as a command-line fragment, for the audit entry and messages.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.reason {
            parts.push(format!("--reason {r:?}"));
        }
        if let Some(c) = self.exit_code {
            parts.push(format!("--exit-code {c}"));
        }
        if let Some(s) = self.since {
            parts.push(format!("--since {}", rfc3339(s)));
        }
        if let Some(b) = self.before {
            parts.push(format!("--before {}", rfc3339(b)));
        }
        if let Some(id) = &self.source_id {
            parts.push(format!("--source-id {id}"));
        }
        for f in &self.field {
            parts.push(format!("--field {:?}", format!("{}={}", f.name, f.value)));
        }
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::Entry;
    use bytes::Bytes;

    fn entry(reason: &str, failed_at: u64, fields: &[(&str, &str)]) -> DlqEntry {
        let mut all: Vec<(Bytes, Bytes)> = fields
            .iter()
            .map(|(k, v)| {
                (
                    Bytes::copy_from_slice(k.as_bytes()),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect();
        for (k, v) in [
            ("dlq_source_stream", "s".to_string()),
            ("dlq_source_id", "7-0".to_string()),
            ("dlq_reason", reason.to_string()),
            ("dlq_failed_at", failed_at.to_string()),
        ] {
            all.push((Bytes::copy_from_slice(k.as_bytes()), Bytes::from(v)));
        }
        DlqEntry::parse(
            "s:dlq",
            Entry {
                id: "9-0".into(),
                fields: Some(all),
            },
        )
        .expect("entry")
    }

    #[test]
    fn every_filter_must_match() {
        let e = entry("exit code 3", 1000, &[("payload", "p"), ("tenant", "acme")]);
        let mut f = FilterArgs::default();
        assert!(f.is_empty() && f.matches(&e));
        f.reason = Some("code 3".into());
        f.exit_code = Some(3);
        f.since = Some(1000);
        f.before = Some(1001);
        f.source_id = Some("7-0".into());
        f.field = vec![parse_field("tenant=acme").expect("field")];
        assert!(f.matches(&e));
        assert!(!f.is_empty());
        for change in 0..6 {
            let mut g = f.clone();
            match change {
                0 => g.reason = Some("signal".into()),
                1 => g.exit_code = Some(4),
                2 => g.since = Some(1001),
                3 => g.before = Some(1000),
                4 => g.source_id = Some("8-0".into()),
                _ => g.field.push(parse_field("tenant=other").expect("field")),
            }
            assert!(!g.matches(&e), "change {change} should exclude");
        }
        assert!(f.describe().contains("--exit-code 3"));
    }

    #[test]
    fn field_syntax() {
        assert!(parse_field("a=").is_ok());
        assert!(parse_field("a=b=c").is_ok_and(|f| f.value == "b=c"));
        assert!(parse_field("=b").is_err());
        assert!(parse_field("ab").is_err());
    }
}
