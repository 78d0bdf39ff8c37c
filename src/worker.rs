//! Long-running handlers (`mode = "worker"`): a pool of processes per stream, each fed
//! one entry at a time over a line-and-length protocol on stdin/stdout.
//!
//! Spawning a process per entry caps throughput at what fork+exec allows; a worker pays
//! that once. The pool has `max_block_read` slots, matching the consume loop's slots, so
//! an entry task always finds an idle worker.
//!
//! # Protocol (version 1)
//!
//! For each entry the daemon writes to the worker's stdin a header line, the payload, and
//! a newline:
//!
//! ```text
//! <id> <attempt> <payload length in bytes>\n
//! <payload bytes>\n
//! ```
//!
//! and reads one reply line from its stdout:
//!
//! ```text
//! ok\n                 success: the entry is acked
//! fail <reason>\n      a failed attempt (retried, then dead-lettered)
//! dlq <reason>\n       never retry: straight to the dead-letter stream
//! ```
//!
//! stdout carries nothing but replies; stderr is logged. End of file on stdin means
//! "exit now". Anything else on stdout, a reply line over 64 KiB, the worker exiting, or
//! no reply within `handler_timeout` fails that entry's attempt and the worker is
//! replaced (its process group is killed). Restarts back off exponentially (100 ms up to
//! 30 s) while a worker keeps dying, so a worker that crashes at start never spins the CPU.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handler::{self, HandlerCommand, Invocation, LineSplitter, Outcome, Report, StderrTail};
use crate::reaper::{self, OwnChild};

/// Requests up to this size are copied into one buffer and written at once; larger
/// payloads are written as they are (the copy would cost more than the extra wake-up).
const SINGLE_WRITE_BYTES: usize = 64 * 1024;

/// Longest reply line accepted, newline included.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// First restart delay after a worker died; doubles per consecutive death.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// From this many consecutive deaths on, each restart is logged as an error.
const CRASH_LOOP_DEATHS: u32 = 3;

/// Who the pool works for; becomes worker environment and log fields.
#[derive(Debug, Clone)]
pub struct PoolIdentity {
    pub stream: String,
    pub group: String,
    pub consumer: String,
}

/// The workers of one stream.
pub struct WorkerPool {
    cmd: HandlerCommand,
    who: PoolIdentity,
    idle: Mutex<Vec<Slot>>,
}

/// One worker position: the process if running, and its restart state.
struct Slot {
    index: usize,
    worker: Option<Worker>,
    /// Consecutive deaths; reset when the worker answers.
    deaths: u32,
    not_before: Instant,
}

struct Worker {
    child: Child,
    /// Keeps the orphan reaper away from this child until it has been waited for.
    registration: OwnChild<'static>,
    pgid: Option<Pid>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    tail: Arc<Mutex<StderrTail>>,
    /// The entry being handled, for stderr log lines.
    current: Arc<Mutex<Option<String>>>,
    stderr_task: JoinHandle<()>,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Fail(String),
    Dlq(String),
}

/// Why an exchange with a worker did not produce a reply.
#[derive(Debug)]
enum Broken {
    /// The worker closed its pipes (it exited or is exiting).
    Gone,
    Protocol(String),
}

impl WorkerPool {
    pub fn new(cmd: HandlerCommand, who: PoolIdentity, size: usize) -> Self {
        let now = Instant::now();
        let slots = (0..size)
            .map(|index| Slot {
                index,
                worker: None,
                deaths: 0,
                not_before: now,
            })
            .collect();
        WorkerPool {
            cmd,
            who,
            idle: Mutex::new(slots),
        }
    }

    /// Hands one entry to an idle worker (starting one if needed) and waits for its reply.
    pub async fn run(
        &self,
        inv: &Invocation<'_>,
        payload: Bytes,
        abort: &CancellationToken,
    ) -> Report {
        let mut slot = self.checkout();
        let report = slot.handle(self, inv, payload, abort).await;
        self.checkin(slot);
        report
    }

    /// Stops every worker: end of file on stdin, then SIGTERM/SIGKILL to its process
    /// group if it has not exited within `kill_grace`. Call once no entry is running.
    pub async fn shutdown(&self) {
        let slots = std::mem::take(&mut *lock(&self.idle));
        let stops = slots
            .into_iter()
            .filter_map(|slot| slot.worker.map(|w| (slot.index, w)))
            .map(|(index, worker)| async move {
                tracing::debug!(stream = %self.who.stream, worker = index, "stopping worker");
                worker.stop(self.cmd.kill_grace, true).await;
            });
        futures::future::join_all(stops).await;
    }

    fn checkout(&self) -> Slot {
        // The consume loop never runs more entries than there are slots; should that ever
        // change, an extra slot is made rather than failing the entry.
        lock(&self.idle).pop().unwrap_or_else(|| Slot {
            index: usize::MAX,
            worker: None,
            deaths: 0,
            not_before: Instant::now(),
        })
    }

    fn checkin(&self, slot: Slot) {
        lock(&self.idle).push(slot);
    }

    fn spawn(&self, index: usize) -> std::io::Result<Worker> {
        let Some((program, args)) = self.cmd.argv.split_first() else {
            return Err(std::io::Error::other("empty handler argv"));
        };
        let mut command = handler::base_command(
            program,
            args,
            &self.cmd,
            &self.who.stream,
            &self.who.group,
            &self.who.consumer,
        );
        command
            .env("REDIS_STREAMD_WORKER", index.to_string())
            .env("REDIS_STREAMD_PROTOCOL", "1");
        let (mut child, registration) = reaper::own_children().spawn(&mut command)?;
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            handler::signal_group(pgid, Signal::SIGKILL);
            return Err(std::io::Error::other("worker pipes missing"));
        };
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let current = Arc::new(Mutex::new(None));
        let stderr_task = tokio::spawn(log_stderr(
            stderr,
            self.who.stream.clone(),
            index,
            tail.clone(),
            current.clone(),
        ));
        tracing::info!(stream = %self.who.stream, worker = index, pid = pgid.map(Pid::as_raw), "worker started");
        Ok(Worker {
            child,
            registration,
            pgid,
            stdin,
            stdout: BufReader::new(stdout),
            tail,
            current,
            stderr_task,
        })
    }
}

impl Slot {
    async fn handle(
        &mut self,
        pool: &WorkerPool,
        inv: &Invocation<'_>,
        payload: Bytes,
        abort: &CancellationToken,
    ) -> Report {
        let started = Instant::now();
        self.reap_if_exited(pool).await;
        if self.worker.is_none() {
            let wait = self.not_before.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = abort.cancelled() => return report(Outcome::Aborted, Vec::new(), started),
                }
            }
            match pool.spawn(self.index) {
                Ok(worker) => self.worker = Some(worker),
                Err(error) => {
                    self.died(pool, "could not be started");
                    return report(Outcome::SpawnFailed(error.to_string()), Vec::new(), started);
                }
            }
        }
        let Some(worker) = self.worker.as_mut() else {
            return report(
                Outcome::SpawnFailed("worker missing".into()),
                Vec::new(),
                started,
            );
        };

        *lock(&worker.current) = Some(inv.id.to_owned());
        // dlq_stderr should be what the worker wrote while handling this entry.
        *lock(&worker.tail) = StderrTail::default();
        let result = tokio::select! {
            r = worker.exchange(inv, &payload) => Ok(r),
            _ = tokio::time::sleep(pool.cmd.timeout) => Err(Outcome::TimedOut(pool.cmd.timeout)),
            _ = abort.cancelled() => Err(Outcome::Aborted),
        };
        *lock(&worker.current) = None;

        let outcome = match result {
            Ok(Ok(reply)) => {
                self.deaths = 0;
                let outcome = match reply {
                    Reply::Ok => return report(Outcome::Success, Vec::new(), started),
                    Reply::Fail(reason) => Outcome::Failed(reason),
                    Reply::Dlq(reason) => Outcome::Rejected(reason),
                };
                let stderr = std::mem::take(&mut *lock(&worker.tail)).into_vec();
                return report(outcome, stderr, started);
            }
            Ok(Err(Broken::Protocol(message))) => {
                Outcome::WorkerLost(format!("worker protocol error: {message}"))
            }
            Ok(Err(Broken::Gone)) => Outcome::WorkerLost("worker exited".to_owned()),
            Err(outcome) => outcome,
        };
        // The worker failed the entry: it is replaced, whatever state it is in.
        let Some(worker) = self.worker.take() else {
            return report(outcome, Vec::new(), started);
        };
        let tail = worker.tail.clone();
        let status = worker.stop(pool.cmd.kill_grace, false).await;
        let outcome = match (outcome, status) {
            (Outcome::WorkerLost(what), Some(status)) => {
                Outcome::WorkerLost(format!("{what} ({})", handler::outcome_of(status).reason()))
            }
            (outcome, _) => outcome,
        };
        if outcome != Outcome::Aborted {
            self.died(pool, &outcome.reason());
        }
        let stderr = std::mem::take(&mut *lock(&tail)).into_vec();
        report(outcome, stderr, started)
    }

    /// A worker that exited while idle is replaced before it is given an entry, so the
    /// entry does not pay for it.
    async fn reap_if_exited(&mut self, pool: &WorkerPool) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        if let Ok(Some(status)) = worker.child.try_wait() {
            let reason = handler::outcome_of(status).reason();
            if let Some(worker) = self.worker.take() {
                worker.stop(pool.cmd.kill_grace, false).await;
            }
            self.died(pool, &format!("exited while idle ({reason})"));
        }
    }

    fn died(&mut self, pool: &WorkerPool, why: &str) {
        self.deaths = self.deaths.saturating_add(1);
        let doublings = self.deaths.saturating_sub(1).min(16);
        let delay = RESTART_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(RESTART_BACKOFF_MAX);
        self.not_before = Instant::now() + delay;
        let stream = &pool.who.stream;
        if self.deaths >= CRASH_LOOP_DEATHS {
            tracing::error!(%stream, worker = self.index, deaths = self.deaths, %why, restart_in = ?delay, "worker keeps dying; restarting with backoff");
        } else {
            tracing::warn!(%stream, worker = self.index, %why, restart_in = ?delay, "worker lost; it will be restarted");
        }
    }
}

impl Worker {
    /// Writes one request and reads one reply line.
    async fn exchange(&mut self, inv: &Invocation<'_>, payload: &[u8]) -> Result<Reply, Broken> {
        let header = format!("{} {} {}\n", inv.id, inv.attempt, payload.len());
        let written = async {
            if payload.len() <= SINGLE_WRITE_BYTES {
                // One write, so the worker wakes once with the whole request.
                let mut frame = Vec::with_capacity(header.len() + payload.len() + 1);
                frame.extend_from_slice(header.as_bytes());
                frame.extend_from_slice(payload);
                frame.push(b'\n');
                self.stdin.write_all(&frame).await?;
            } else {
                self.stdin.write_all(header.as_bytes()).await?;
                self.stdin.write_all(payload).await?;
                self.stdin.write_all(b"\n").await?;
            }
            self.stdin.flush().await
        };
        if written.await.is_err() {
            return Err(Broken::Gone);
        }
        let mut line = Vec::new();
        let limit = (MAX_REPLY_BYTES + 1) as u64;
        let read = (&mut self.stdout)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Err(_) | Ok(0) => Err(Broken::Gone),
            Ok(_) if line.last() != Some(&b'\n') => {
                if line.len() > MAX_REPLY_BYTES {
                    Err(Broken::Protocol(format!(
                        "reply line longer than {MAX_REPLY_BYTES} bytes"
                    )))
                } else {
                    // A partial line, then end of file.
                    Err(Broken::Gone)
                }
            }
            Ok(_) => parse_reply(&line).map_err(Broken::Protocol),
        }
    }

    /// Ends the worker and reaps it. `polite`: close stdin first and give it `grace` to
    /// exit on its own (shutdown); otherwise SIGTERM at once (it failed an entry).
    /// Returns its exit status when known.
    async fn stop(mut self, grace: Duration, polite: bool) -> Option<std::process::ExitStatus> {
        drop(self.stdin);
        if !polite {
            handler::terminate(self.pgid);
        }
        let mut status = tokio::time::timeout(grace, self.child.wait()).await;
        if polite && status.is_err() {
            handler::terminate(self.pgid);
            status = tokio::time::timeout(grace, self.child.wait()).await;
        }
        let status = match status {
            Ok(Ok(status)) => Some(status),
            _ => {
                handler::signal_group(self.pgid, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        drop(self.registration);
        // Whatever it left in its group goes with it.
        handler::signal_group(self.pgid, Signal::SIGKILL);
        if tokio::time::timeout(Duration::from_millis(200), &mut self.stderr_task)
            .await
            .is_err()
        {
            self.stderr_task.abort();
        }
        status
    }
}

/// Parses a reply line (with its newline).
pub fn parse_reply(line: &[u8]) -> Result<Reply, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| "reply is not UTF-8".to_owned())?;
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    let reason = |default: &str| {
        let rest = rest.trim();
        if rest.is_empty() {
            default.to_owned()
        } else {
            rest.to_owned()
        }
    };
    match verb {
        "ok" => Ok(Reply::Ok),
        "fail" => Ok(Reply::Fail(reason("worker reported failure"))),
        "dlq" => Ok(Reply::Dlq(reason("worker rejected the entry"))),
        _ => {
            let mut shown: String = text.chars().take(80).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            Err(format!("unexpected reply {shown:?}"))
        }
    }
}

async fn log_stderr(
    mut pipe: tokio::process::ChildStderr,
    stream: String,
    index: usize,
    tail: Arc<Mutex<StderrTail>>,
    current: Arc<Mutex<Option<String>>>,
) {
    let mut buf = vec![0u8; 8192];
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| {
        let id = lock(&current).clone().unwrap_or_default();
        let text = String::from_utf8_lossy(line);
        tracing::info!(%stream, worker = index, %id, output = "stderr", "{}", text.trim_end());
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default();
                lock(&tail).push(chunk);
                lines.push(chunk, &mut emit);
            }
        }
    }
    lines.finish(&mut emit);
}

fn report(outcome: Outcome, stderr_tail: Vec<u8>, started: Instant) -> Report {
    Report {
        outcome,
        stderr_tail,
        elapsed: started.elapsed(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"ok\n"), Ok(Reply::Ok));
        assert_eq!(parse_reply(b"ok\r\n"), Ok(Reply::Ok));
        assert_eq!(
            parse_reply(b"fail disk full\n"),
            Ok(Reply::Fail("disk full".into()))
        );
        assert_eq!(
            parse_reply(b"fail\n"),
            Ok(Reply::Fail("worker reported failure".into()))
        );
        assert_eq!(
            parse_reply(b"dlq bad json\n"),
            Ok(Reply::Dlq("bad json".into()))
        );
        assert!(parse_reply(b"OK\n").is_err());
        assert!(parse_reply(b"\n").is_err());
        assert!(parse_reply(&[0xff, b'\n']).is_err());
    }
}
