//! Times as the operator commands show and read them: wall-clock milliseconds, the time
//! in a stream id, local time for humans, RFC 3339 (UTC) for JSON, short ages (`5m`,
//! `2h3m`), and the `--since` / `--before` bounds (an RFC 3339 time or an age).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The millisecond part of a stream id (`1700000000000-3` → 1700000000000).
pub(crate) fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-24T13:02:11.123Z`.
pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A short age: `0s`, `42s`, `5m`, `2h3m`, `3d4h`.
pub(crate) fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h{m}m", s / 3600),
        },
        _ => match (s % 86400) / 3600 {
            0 => format!("{}d", s / 86400),
            h => format!("{}d{h}h", s / 86400),
        },
    }
}

/// A duration for humans: `850ms`, `12.5s`, else as [`age`].
pub(crate) fn idle(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => age(ms),
    }
}

/// Broken-down local time.
struct Local {
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// Seconds east of UTC.
    offset: i64,
}

fn local(ms: u64) -> Option<Local> {
    use nix::libc;
    let secs = libc::time_t::try_from(ms / 1000).ok()?;
    // SAFETY: `tm` is plain data (integers and a pointer that may be null); zeroed is
    // a valid value for it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `secs` and writes only into `tm`, both valid for the
    // call. It reads TZ, which this process never changes.
    let filled = unsafe { libc::localtime_r(&secs, &mut tm) };
    if filled.is_null() {
        return None;
    }
    Some(Local {
        year: tm.tm_year + 1900,
        month: u32::try_from(tm.tm_mon + 1).ok()?,
        day: u32::try_from(tm.tm_mday).ok()?,
        hour: u32::try_from(tm.tm_hour).ok()?,
        minute: u32::try_from(tm.tm_min).ok()?,
        second: u32::try_from(tm.tm_sec).ok()?,
        offset: tm.tm_gmtoff,
    })
}

/// Local time, short: `11-24 13:02` (UTC RFC 3339 if the local time is unknown).
pub(crate) fn local_short(ms: u64) -> String {
    match local(ms) {
        Some(t) => format!("{:02}-{:02} {:02}:{:02}", t.month, t.day, t.hour, t.minute),
        None => rfc3339(ms),
    }
}

/// Local time, full: `2026-11-24 13:02:11 +01:00`.
pub(crate) fn local_full(ms: u64) -> String {
    match local(ms) {
        Some(t) => {
            let sign = if t.offset < 0 { '-' } else { '+' };
            let off = t.offset.unsigned_abs();
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
                t.year,
                t.month,
                t.day,
                t.hour,
                t.minute,
                t.second,
                off / 3600,
                (off % 3600) / 60
            )
        }
        None => rfc3339(ms),
    }
}

/// The local hour an instant falls in, `2026-11-24 13:00` (for `stats --by hour`).
pub(crate) fn local_hour(ms: u64) -> String {
    match local(ms) {
        Some(t) => format!("{:04}-{:02}-{:02} {:02}:00", t.year, t.month, t.day, t.hour),
        None => rfc3339(ms - ms % 3_600_000),
    }
}

/// Parses `--since` / `--before`: an RFC 3339 time (`2026-12-01T10:00:00Z`) or an age
/// (`2h`, `30m`, `1day`) counted back from now. Returns unix milliseconds.
pub(crate) fn parse_bound(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| format!("{text:?} is before 1970"));
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(now_ms().saturating_sub(ago.as_millis() as u64)),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor an age (2h, 30m)"
        )),
    }
}

/// Parses a `--watch` interval such as `2s` or `500ms` (at least 100 ms).
pub(crate) fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration such as 2s: {e}"))?;
    if d < Duration::from_millis(100) {
        return Err(format!("{text:?} is shorter than 100ms"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(5 * 60_000), "5m");
        assert_eq!(age(2 * 3_600_000), "2h");
        assert_eq!(age(2 * 3_600_000 + 3 * 60_000), "2h3m");
        assert_eq!(age(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
        assert_eq!(idle(850), "850ms");
        assert_eq!(idle(12_500), "12.5s");
    }

    #[test]
    fn ids_and_rfc3339() {
        assert_eq!(id_ms("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(id_ms("garbage"), None);
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn bounds_are_times_or_ages() {
        assert_eq!(parse_bound("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        let two_hours_ago = parse_bound("2h").expect("age");
        let expected = now_ms() - 2 * 3_600_000;
        assert!(two_hours_ago.abs_diff(expected) < 5_000);
        assert!(parse_bound("yesterday-ish").is_err());
        assert!(parse_interval("2s").is_ok());
        assert!(parse_interval("1ms").is_err());
    }

    #[test]
    fn local_time_renders() {
        assert_eq!(local_short(1_700_000_000_000).len(), 11);
        assert!(local_full(1_700_000_000_000).starts_with("2023-11-1"));
        assert!(local_hour(1_700_000_000_000).ends_with(":00"));
    }
}
