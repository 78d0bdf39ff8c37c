//! The consume loop's decisions, as pure functions: whether an entry can run at all
//! ([`admit`]), and what a finished run means for it ([`after_run`]: ack, retry at a
//! time, dead-letter with a reason, or leave it pending).

use std::time::Duration;

use bytes::Bytes;

use crate::backoff::Backoff;
use crate::config::StreamConfig;
use crate::exec::{Outcome, Report};
use crate::redis::Entry;
use crate::stream::dlq::Failure;
use crate::stream::payload;

/// Whether an entry that reached the loop can run.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Run the handler with this stdin.
    Run(Bytes),
    /// The entry is gone from the stream (its fields are nil): ack it away.
    Deleted,
    /// Never runs: straight to the DLQ.
    DeadLetter(Failure),
}

/// Checks that attempt `attempt` (1 = the first) at `entry` can run.
pub(crate) fn admit(cfg: &StreamConfig, entry: &Entry, attempt: u64) -> Admit {
    if entry.fields.is_none() {
        return Admit::Deleted;
    }
    if attempt > cfg.max_attempts {
        return Admit::DeadLetter(Failure {
            reason: format!(
                "delivered {attempt} times, more than max_attempts ({})",
                cfg.max_attempts
            ),
            attempts: attempt - 1,
            stderr: Vec::new(),
            elapsed: None,
        });
    }
    match payload::stdin_for(cfg.payload, &cfg.payload_field, &cfg.name, entry) {
        Ok(stdin) => Admit::Run(stdin),
        Err(reason) => Admit::DeadLetter(Failure {
            reason,
            attempts: 0,
            stderr: Vec::new(),
            elapsed: None,
        }),
    }
}

/// What to do with an entry after a run.
#[derive(Debug, PartialEq)]
pub(crate) enum Settle {
    /// It succeeded: XACK.
    Ack,
    /// Shutdown stopped the handler: neither a success nor a failed attempt; the entry
    /// stays pending for the next start or another consumer.
    KeepPending,
    /// A failed attempt with attempts left: run again after `delay`.
    Retry { delay: Duration, reason: String },
    /// The daemon could not start the handler for want of resources (file descriptors,
    /// processes, memory): not the entry's fault, so it runs again after `delay`
    /// without using up an attempt.
    Wait { delay: Duration, reason: String },
    /// Failed for good: write it to the DLQ.
    DeadLetter(Failure),
}

/// How long an entry waits when the daemon lacked resources to start its handler.
pub(crate) const RESOURCE_WAIT: Duration = Duration::from_secs(1);

/// Settles attempt `attempt` of an entry from its run's report.
pub(crate) fn after_run(cfg: &StreamConfig, attempt: u64, report: Report) -> Settle {
    let for_good = match &report.outcome {
        Outcome::Success => return Settle::Ack,
        Outcome::Aborted => return Settle::KeepPending,
        Outcome::NoResources(_) => {
            return Settle::Wait {
                delay: RESOURCE_WAIT,
                reason: report.outcome.reason(),
            };
        }
        Outcome::Exited(code) if cfg.dlq_exit_codes.contains(code) => true,
        Outcome::Rejected(_) => true,
        _ => attempt >= cfg.max_attempts,
    };
    let reason = report.outcome.reason();
    if for_good {
        return Settle::DeadLetter(Failure {
            reason,
            attempts: attempt,
            stderr: report.stderr_tail,
            elapsed: Some(report.elapsed),
        });
    }
    Settle::Retry {
        delay: retry_delay(cfg, attempt),
        reason,
    }
}

/// Delay before attempt `failed + 1`: `retry_backoff * 2^(failed - 1)`, capped at
/// `retry_backoff_max`.
pub(crate) fn retry_delay(cfg: &StreamConfig, failed: u64) -> Duration {
    Backoff::delay_after(cfg.retry_backoff, cfg.retry_backoff_max, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StreamConfig {
        StreamConfig {
            max_block_read: 4,
            retry_backoff_max: Duration::from_secs(3),
            dlq_exit_codes: vec![42],
            ..StreamConfig::for_tests(&["/bin/true"])
        }
    }

    fn entry(fields: Option<&[(&str, &str)]>) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: fields.map(|f| {
                f.iter()
                    .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
                    .collect()
            }),
        }
    }

    fn report(outcome: Outcome) -> Report {
        Report {
            outcome,
            stderr_tail: b"boom".to_vec(),
            elapsed: Duration::from_millis(7),
        }
    }

    #[test]
    fn admit_runs_payload_and_settles_what_cannot_run() {
        let cfg = cfg();
        let ok = entry(Some(&[("payload", "hi")]));
        assert!(matches!(admit(&cfg, &ok, 1), Admit::Run(b) if b == "hi"));
        assert!(matches!(admit(&cfg, &ok, 3), Admit::Run(_)));
        assert!(matches!(admit(&cfg, &entry(None), 1), Admit::Deleted));
        match admit(&cfg, &ok, 4) {
            Admit::DeadLetter(f) => {
                assert_eq!(f.attempts, 3);
                assert!(
                    f.reason.contains("more than max_attempts (3)"),
                    "{}",
                    f.reason
                );
            }
            other => panic!("{other:?}"),
        }
        match admit(&cfg, &entry(Some(&[("other", "x")])), 1) {
            Admit::DeadLetter(f) => {
                assert_eq!(f.attempts, 0);
                assert_eq!(f.reason, "missing field \"payload\"");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn success_acks_and_abort_keeps_pending() {
        let cfg = cfg();
        assert_eq!(after_run(&cfg, 1, report(Outcome::Success)), Settle::Ack);
        assert_eq!(
            after_run(&cfg, 3, report(Outcome::Aborted)),
            Settle::KeepPending
        );
    }

    #[test]
    fn failures_retry_with_backoff_until_the_last_attempt() {
        let cfg = cfg();
        assert_eq!(
            after_run(&cfg, 1, report(Outcome::Exited(1))),
            Settle::Retry {
                delay: Duration::from_secs(1),
                reason: "exit code 1".into()
            }
        );
        assert_eq!(
            after_run(&cfg, 2, report(Outcome::Signaled(9))),
            Settle::Retry {
                delay: Duration::from_secs(2),
                reason: "killed by signal 9".into()
            }
        );
        match after_run(&cfg, 3, report(Outcome::Exited(1))) {
            Settle::DeadLetter(f) => {
                assert_eq!(f.attempts, 3);
                assert_eq!(f.stderr, b"boom");
                assert_eq!(f.elapsed, Some(Duration::from_millis(7)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn want_of_resources_waits_without_using_an_attempt() {
        let cfg = cfg();
        // Even at the last attempt: the entry never ran.
        assert_eq!(
            after_run(
                &cfg,
                3,
                report(Outcome::NoResources("Too many open files".into()))
            ),
            Settle::Wait {
                delay: RESOURCE_WAIT,
                reason: "spawn failed: Too many open files".into()
            }
        );
    }

    #[test]
    fn dlq_exit_codes_and_rejections_skip_the_retries() {
        let cfg = cfg();
        assert!(matches!(
            after_run(&cfg, 1, report(Outcome::Exited(42))),
            Settle::DeadLetter(f) if f.reason == "exit code 42" && f.attempts == 1
        ));
        assert!(matches!(
            after_run(&cfg, 1, report(Outcome::Rejected("bad input".into()))),
            Settle::DeadLetter(f) if f.reason == "bad input"
        ));
    }

    #[test]
    fn retry_delay_doubles_to_the_cap() {
        let cfg = cfg();
        let delays: Vec<u64> = (1..=4).map(|n| retry_delay(&cfg, n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 3, 3]);
    }
}
