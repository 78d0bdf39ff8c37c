//! Pacing and progress of long destructive commands: `--rate 50/s` spaces the writes
//! evenly (no bursts after a slow moment), a one-line progress display on a terminal
//! (done / total, rate, ETA), and the stop signal (SIGINT/SIGTERM) that ends a command
//! cleanly between two entries.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::admin::timefmt::age;

/// `--rate`: entries per second, or `None` for no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate(pub(crate) Option<f64>);

/// Parses `50/s`, `50` (per second), `600/m`, `3600/h`, or `0` / `unlimited` (no limit).
pub(crate) fn parse_rate(text: &str) -> Result<Rate, String> {
    let text = text.trim();
    if text == "unlimited" || text == "0" {
        return Ok(Rate(None));
    }
    let (count, per) = text.split_once('/').unwrap_or((text, "s"));
    let seconds = match per {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?}: the unit must be /s, /m or /h")),
    };
    match count.parse::<f64>() {
        Ok(n) if n.is_finite() && n / seconds >= 1.0 / 3600.0 => Ok(Rate(Some(n / seconds))),
        Ok(n) if n > 0.0 => Err(format!("{text:?} is slower than 1/h")),
        Ok(0.0) => Ok(Rate(None)),
        _ => Err(format!("{text:?} is not a rate such as 50/s")),
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{r}/s"),
            None => f.write_str("unlimited"),
        }
    }
}

/// Spaces operations `1 / rate` apart: the n-th waits until `start + n / rate`. Falling
/// more than a second behind (slow Redis) moves the start, so there is no catch-up burst.
pub(crate) struct Pacer {
    rate: Option<f64>,
    start: tokio::time::Instant,
    n: u64,
}

impl Pacer {
    pub(crate) fn new(rate: Rate) -> Pacer {
        Pacer {
            rate: rate.0,
            start: tokio::time::Instant::now(),
            n: 0,
        }
    }

    /// Waits for the next slot; returns false if `stop` was cancelled meanwhile.
    pub(crate) async fn next(&mut self, stop: &CancellationToken) -> bool {
        if let Some(rate) = self.rate {
            let offset = Duration::try_from_secs_f64(self.n as f64 / rate).unwrap_or(Duration::MAX);
            let due = self.start.checked_add(offset).unwrap_or(self.start);
            let now = tokio::time::Instant::now();
            if due > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => return false,
                }
            } else if now.duration_since(due) > Duration::from_secs(1) {
                self.start = now.checked_sub(offset).unwrap_or(now);
            }
        }
        self.n += 1;
        !stop.is_cancelled()
    }
}

/// A token cancelled on the first SIGINT or SIGTERM; a second one exits at once (130).
/// Installed only once work starts, so Ctrl-C at a confirmation prompt still ends the
/// program at once.
pub(crate) fn stop_on_signal() -> Result<CancellationToken, std::io::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        cancel.cancel();
        // A second signal while the current entry is still being written (a slow or
        // unreachable Redis): leave at once. Safe: a replay step is atomic or resumable.
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        crate::admin::output::note!("redis-streamd: second signal, exiting now");
        std::process::exit(130);
    });
    Ok(token)
}

/// `replaying orders:dlq  1234/10000  49.8/s  ETA 2m` on stderr, redrawn in place at most
/// four times a second, only when stderr is a terminal.
pub(crate) struct Progress {
    verb: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
    enabled: bool,
}

impl Progress {
    pub(crate) fn new(verb: &'static str, total: u64) -> Progress {
        Progress {
            verb,
            total,
            done: 0,
            started: Instant::now(),
            drawn: None,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    /// Counts `n` more entries handled (done, skipped or gone) while working on `dlq`.
    pub(crate) fn advance(&mut self, n: u64, dlq: &str) {
        self.done += n;
        if !self.enabled
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            age(((self.total.saturating_sub(self.done)) as f64 / rate * 1000.0) as u64)
        } else {
            "?".into()
        };
        let dlq = crate::admin::output::fit(&crate::admin::output::escape(dlq.as_bytes()), 30);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\u{1b}[K{} {dlq}  {}/{}  {rate:.1}/s  ETA {eta}",
            self.verb, self.done, self.total
        );
        let _ = err.flush();
    }

    /// Clears the progress line.
    pub(crate) fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\u{1b}[K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50/s"), Ok(Rate(Some(50.0))));
        assert_eq!(parse_rate("50"), Ok(Rate(Some(50.0))));
        assert_eq!(parse_rate("120/m"), Ok(Rate(Some(2.0))));
        assert_eq!(parse_rate("0"), Ok(Rate(None)));
        assert_eq!(parse_rate("unlimited"), Ok(Rate(None)));
        assert!(parse_rate("-3/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5/d").is_err());
        assert!(parse_rate("1e-300/h").is_err());
        assert!(parse_rate("1e300/s").is_ok());
    }

    #[tokio::test]
    async fn pacer_spaces_operations() {
        let stop = CancellationToken::new();
        let mut p = Pacer::new(Rate(Some(100.0)));
        let start = Instant::now();
        for _ in 0..11 {
            assert!(p.next(&stop).await);
        }
        // A lower bound only: a busy machine may take longer, never shorter.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        stop.cancel();
        assert!(!p.next(&stop).await);
    }
}
