//! Handler processes: spawning, stdin, output capture, timeouts, process groups.
//!
//! Owns one run of a handler program for one entry attempt, from spawn to reaped exit.
//! Knows nothing about Redis: it is given argv, environment and stdin bytes and returns
//! what happened, so the consume loop can decide between ack, retry and dead-letter.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// What to run, shared by every attempt of one stream.
#[derive(Debug, Clone)]
pub struct HandlerCommand {
    /// argv; `argv[0]` is executed directly (PATH lookup when it has no slash).
    pub argv: Vec<String>,
    /// Extra environment (the stream's `env`), added to the daemon's own.
    pub env: Vec<(String, String)>,
    /// `handler_timeout`.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL to the process group (5s in production).
    pub kill_grace: Duration,
}

/// Who this run is for; becomes `REDIS_STREAMD_*` environment and log fields.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub id: &'a str,
    /// 1 for the first attempt.
    pub attempt: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Success,
    /// Exit status other than 0.
    Exited(i32),
    /// Died from a signal it did not get from us.
    Signaled(i32),
    /// Ran past the timeout; its process group was killed.
    TimedOut(Duration),
    /// The program could not be started.
    SpawnFailed(String),
    /// Stopped by the daemon's shutdown (`abort` token); neither success nor a failed attempt.
    Aborted,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    /// The last 4 KiB (at most) of what the handler wrote to stderr.
    pub stderr_tail: Vec<u8>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The DLQ reason text: `exit code 3`, `killed by signal 9`, `timeout after 30s`,
    /// `spawn failed: ...`.
    pub fn reason(&self) -> String {
        todo!()
    }
}

/// Runs the handler once for one entry and waits until it (and its output pipes) are done.
///
/// `abort` is cancelled by shutdown when the daemon stops waiting: the process group gets
/// SIGTERM, then SIGKILL after `kill_grace`, and the outcome is [`Outcome::Aborted`].
pub async fn run(
    cmd: &HandlerCommand,
    inv: &Invocation<'_>,
    stdin: Bytes,
    abort: &CancellationToken,
) -> Report {
    let _ = (cmd, inv, stdin, abort);
    todo!()
}
