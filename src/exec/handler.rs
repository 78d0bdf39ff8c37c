//! Handler processes: spawning, stdin, output capture, timeouts, process groups.
//!
//! Owns one run of a handler program for one entry attempt, from spawn to reaped exit.
//! Knows nothing about Redis: it is given argv, environment and stdin bytes and returns
//! what happened, so the consume loop can decide between ack, retry and dead-letter.
//!
//! # How a run goes
//!
//! - `argv[0]` is spawned directly (no shell) through `tokio::process::Command` with
//!   `process_group(0)`: the handler leads its own process group (pgid = its pid). There is
//!   deliberately no `pre_exec`, so std keeps using `posix_spawn` (see the project notes).
//! - The environment is the daemon's own minus the systemd variables listed in
//!   [`STRIPPED_ENV`], plus the stream's `env`, plus `REDIS_STREAMD_STREAM`, `_GROUP`,
//!   `_CONSUMER`, `_ID` and `_ATTEMPT`. The daemon's environment is never modified.
//! - stdin is written and closed while stdout and stderr are read, all concurrently, so a
//!   handler that writes a lot before reading cannot deadlock. A broken pipe on stdin (the
//!   handler did not read it) is normal. Output is read in chunks and logged line by line
//!   (lines longer than [`MAX_LINE_BYTES`] are logged in pieces); only the last
//!   [`STDERR_TAIL_BYTES`] of stderr are kept, so memory stays bounded whatever the handler
//!   writes.
//! - On timeout or abort the process group gets SIGTERM (and SIGCONT, so a stopped
//!   handler can act on it), then SIGKILL after `kill_grace`. Once the daemon has sent
//!   SIGTERM, the outcome is [`Outcome::TimedOut`] or [`Outcome::Aborted`] however the
//!   handler then exits (even with status 0): it was interrupted, not finished.
//! - If tokio cannot report the exit status (only possible when something else reaped the
//!   child), the run counts as a failed attempt, `Exited(-1)`, never as a success.
//!
//! # Decision: the process group does not outlive the handler
//!
//! As soon as the handler process itself has exited (whatever the outcome), whatever is
//! left of its process group is sent SIGKILL. Background children a handler leaves behind
//! are therefore killed; a handler that wants work to outlive it must detach it itself
//! (and then it is none of the daemon's business). The output pipes are read for at most
//! [`OUTPUT_DRAIN_GRACE`] after that and then closed: a descendant that left the group
//! (`setsid`) could otherwise keep them open forever.
//!
//! The child is always reaped through tokio (`Child::wait`); this module never calls
//! `waitpid(-1)`. If the `run` future is dropped before the handler exited, the process
//! group is sent SIGKILL and tokio reaps the handler in the background.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

/// Variables of the daemon's environment that handlers never see: they belong to the
/// daemon's relationship with systemd (notify socket, watchdog, socket activation).
pub const STRIPPED_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// At most this many bytes of stderr are kept for [`Report::stderr_tail`].
pub const STDERR_TAIL_BYTES: usize = 4096;

/// Output lines longer than this are logged in pieces of this size.
pub const MAX_LINE_BYTES: usize = 4096;

/// How long output is still read after the handler exited and its group was killed.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Size of one read from the handler's stdout or stderr.
const READ_CHUNK_BYTES: usize = 8192;

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
    /// The daemon lacked resources to start the program (file descriptors, processes,
    /// memory): the daemon's trouble, not the entry's.
    NoResources(String),
    /// Stopped by the daemon's shutdown (`abort` token); neither success nor a failed attempt.
    Aborted,
    /// A long-lived worker replied `fail <reason>`: a failed attempt.
    Failed(String),
    /// A long-lived worker replied `dlq <reason>`: straight to the DLQ.
    Rejected(String),
    /// A long-lived worker died, or broke the protocol, while handling the entry.
    WorkerLost(String),
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
        match self {
            Outcome::Success => "success".to_owned(),
            Outcome::Exited(code) => format!("exit code {code}"),
            Outcome::Signaled(sig) => format!("killed by signal {sig}"),
            Outcome::TimedOut(after) => {
                format!("timeout after {}", humantime::format_duration(*after))
            }
            Outcome::SpawnFailed(err) | Outcome::NoResources(err) => {
                format!("spawn failed: {err}")
            }
            Outcome::Aborted => "aborted".to_owned(),
            Outcome::Failed(reason) | Outcome::Rejected(reason) | Outcome::WorkerLost(reason) => {
                reason.clone()
            }
        }
    }
}

/// Why the daemon signalled the handler's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Abort,
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
    if abort.is_cancelled() {
        return Report {
            outcome: Outcome::Aborted,
            stderr_tail: Vec::new(),
            elapsed: Duration::ZERO,
        };
    }
    let Some((program, args)) = cmd.argv.split_first() else {
        return spawn_failed(&"empty handler argv");
    };

    let mut command = base_command(program, args, cmd, inv.stream, inv.group, inv.consumer);
    command
        .env("REDIS_STREAMD_ID", inv.id)
        .env("REDIS_STREAMD_ATTEMPT", inv.attempt.to_string());

    let started = Instant::now();
    // Registered so the orphan reaper (PID 1 / subreaper) never takes this child's status.
    let (mut child, registration) = match crate::ops::reaper::own_children().spawn(&mut command) {
        Ok(spawned) => spawned,
        Err(err) => {
            tracing::debug!(
                stream = inv.stream,
                id = inv.id,
                attempt = inv.attempt,
                program = program.as_str(),
                "handler spawn failed: {err}"
            );
            if is_want_of_resources(&err) {
                return Report {
                    outcome: Outcome::NoResources(err.to_string()),
                    stderr_tail: Vec::new(),
                    elapsed: Duration::ZERO,
                };
            }
            return spawn_failed(&err);
        }
    };
    // `id()` is `Some` until the child has been reaped, which only `wait` below does.
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    tracing::debug!(
        stream = inv.stream,
        id = inv.id,
        attempt = inv.attempt,
        pid = pgid.map(Pid::as_raw),
        "handler started"
    );
    // Declared after `child`, so dropped before it: if this future is dropped mid-run the
    // group is killed while the (unreaped) handler still pins the pgid.
    let mut guard = GroupGuard { pgid, armed: true };

    let mut tail = StderrTail::default();
    let (waited, stop, elapsed) = {
        let io = pump_io(
            child.stdin.take(),
            stdin,
            child.stdout.take(),
            child.stderr.take(),
            &mut tail,
            inv,
        );
        tokio::pin!(io);
        let mut io_done = false;

        let timeout = tokio::time::sleep(cmd.timeout);
        tokio::pin!(timeout);
        let mut grace: Option<Pin<Box<Sleep>>> = None;
        let mut stop: Option<Stop> = None;
        let mut killed = false;

        let waited = loop {
            tokio::select! {
                biased;
                status = child.wait() => break status,
                () = &mut io, if !io_done => io_done = true,
                () = &mut timeout, if stop.is_none() => {
                    tracing::warn!(
                        stream = inv.stream,
                        id = inv.id,
                        attempt = inv.attempt,
                        "handler still running after {}, sending SIGTERM to its process group",
                        humantime::format_duration(cmd.timeout)
                    );
                    stop = Some(Stop::Timeout);
                    terminate(pgid);
                    grace = Some(Box::pin(tokio::time::sleep(cmd.kill_grace)));
                }
                () = abort.cancelled(), if stop.is_none() => {
                    tracing::debug!(
                        stream = inv.stream,
                        id = inv.id,
                        attempt = inv.attempt,
                        "shutdown: sending SIGTERM to the handler's process group"
                    );
                    stop = Some(Stop::Abort);
                    terminate(pgid);
                    grace = Some(Box::pin(tokio::time::sleep(cmd.kill_grace)));
                }
                () = sleep_opt(&mut grace), if !killed => {
                    tracing::warn!(
                        stream = inv.stream,
                        id = inv.id,
                        attempt = inv.attempt,
                        "handler did not exit within {} of SIGTERM, sending SIGKILL to its process group",
                        humantime::format_duration(cmd.kill_grace)
                    );
                    killed = true;
                    signal_group(pgid, Signal::SIGKILL);
                }
            }
        };
        let elapsed = started.elapsed();
        // Waited for (or the wait failed): the pid is no longer ours to protect.
        drop(registration);

        // The handler is gone (reaped): its group does not outlive it.
        signal_group(pgid, Signal::SIGKILL);
        guard.armed = false;

        if !io_done
            && tokio::time::timeout(OUTPUT_DRAIN_GRACE, &mut io)
                .await
                .is_err()
        {
            tracing::debug!(
                stream = inv.stream,
                id = inv.id,
                attempt = inv.attempt,
                "handler output pipes still open after it exited (a descendant left its process group?); closing them"
            );
        }
        (waited, stop, elapsed)
    };

    let outcome = match (stop, waited) {
        (Some(Stop::Timeout), _) => Outcome::TimedOut(cmd.timeout),
        (Some(Stop::Abort), _) => Outcome::Aborted,
        (None, Ok(status)) => outcome_of(status),
        (None, Err(err)) => {
            // Only possible if someone else reaped our child (a stray `waitpid(-1)`). The
            // exit status is lost: report a failed attempt rather than a success.
            tracing::warn!(
                stream = inv.stream,
                id = inv.id,
                attempt = inv.attempt,
                "waiting for the handler failed: {err}; counting the attempt as failed"
            );
            Outcome::Exited(-1)
        }
    };
    Report {
        outcome,
        stderr_tail: tail.into_vec(),
        elapsed,
    }
}

/// The command every handler process starts from, per-entry or long-lived: its own
/// process group, three pipes, the daemon's environment minus [`STRIPPED_ENV`], the
/// stream's `env`, and the `REDIS_STREAMD_*` variables that do not depend on the entry.
pub(crate) fn base_command(
    program: &str,
    args: &[String],
    cmd: &HandlerCommand,
    stream: &str,
    group: &str,
    consumer: &str,
) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in STRIPPED_ENV {
        command.env_remove(name);
    }
    command
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .env("REDIS_STREAMD_STREAM", stream)
        .env("REDIS_STREAMD_GROUP", group)
        .env("REDIS_STREAMD_CONSUMER", consumer);
    command
}

fn spawn_failed(err: &dyn std::fmt::Display) -> Report {
    Report {
        outcome: Outcome::SpawnFailed(err.to_string()),
        stderr_tail: Vec::new(),
        elapsed: Duration::ZERO,
    }
}

/// Whether a spawn failed for want of the daemon's resources (descriptors, processes,
/// memory) rather than because of the program.
pub(crate) fn is_want_of_resources(err: &io::Error) -> bool {
    use nix::errno::Errno;
    err.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::EAGAIN, Errno::ENOMEM]
            .iter()
            .any(|e| *e as i32 == code)
    })
}

pub(crate) fn outcome_of(status: ExitStatus) -> Outcome {
    match (status.code(), status.signal()) {
        (Some(0), _) => Outcome::Success,
        (Some(code), _) => Outcome::Exited(code),
        (None, Some(sig)) => Outcome::Signaled(sig),
        // Neither an exit code nor a signal cannot happen for a reaped child on Linux.
        (None, None) => Outcome::Exited(-1),
    }
}

/// SIGTERM to the group, plus SIGCONT so that a stopped handler gets to act on it.
pub(crate) fn terminate(pgid: Option<Pid>) {
    signal_group(pgid, Signal::SIGTERM);
    signal_group(pgid, Signal::SIGCONT);
}

pub(crate) fn signal_group(pgid: Option<Pid>, signal: Signal) {
    let Some(pgid) = pgid else { return };
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => {
            tracing::debug!(pgid = pgid.as_raw(), "killpg({signal}) failed: {err}");
        }
    }
}

/// Waits for the sleep if there is one, forever otherwise.
async fn sleep_opt(sleep: &mut Option<Pin<Box<Sleep>>>) {
    match sleep {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// SIGKILLs the handler's group if `run` is dropped before the handler was reaped.
struct GroupGuard {
    pgid: Option<Pid>,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Writes stdin and reads stdout and stderr, all at once.
async fn pump_io(
    stdin_pipe: Option<ChildStdin>,
    payload: Bytes,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    tail: &mut StderrTail,
    inv: &Invocation<'_>,
) {
    tokio::join!(
        write_stdin(stdin_pipe, payload, inv),
        read_output(stdout, Output::Stdout, None, inv),
        read_output(stderr, Output::Stderr, Some(tail), inv),
    );
}

async fn write_stdin(pipe: Option<ChildStdin>, payload: Bytes, inv: &Invocation<'_>) {
    let Some(mut pipe) = pipe else { return };
    if !payload.is_empty() {
        match pipe.write_all(&payload).await {
            Ok(()) => {}
            // The handler exited or closed stdin without reading all of it: its business.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
            Err(err) => {
                tracing::debug!(
                    stream = inv.stream,
                    id = inv.id,
                    attempt = inv.attempt,
                    "writing the handler's stdin failed: {err}"
                );
            }
        }
    }
    // Dropping the pipe closes it: the handler sees end of file.
    drop(pipe);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Stdout,
    Stderr,
}

async fn read_output<R>(
    pipe: Option<R>,
    which: Output,
    mut tail: Option<&mut StderrTail>,
    inv: &Invocation<'_>,
) where
    R: AsyncRead + Unpin,
{
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut lines = LineSplitter::default();
    let mut emit = |line: &[u8]| log_line(which, line, inv);
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(
                    stream = inv.stream,
                    id = inv.id,
                    attempt = inv.attempt,
                    "reading the handler's {which:?} failed: {err}"
                );
                break;
            }
        };
        let chunk = buf.get(..n).unwrap_or_default();
        if let Some(tail) = tail.as_deref_mut() {
            tail.push(chunk);
        }
        lines.push(chunk, &mut emit);
    }
    lines.finish(&mut emit);
}

fn log_line(which: Output, line: &[u8], inv: &Invocation<'_>) {
    let mut end = line.len();
    while end > 0 && matches!(line.get(end - 1), Some(b'\n' | b'\r')) {
        end -= 1;
    }
    let line = line.get(..end).unwrap_or_default();
    match which {
        Output::Stdout => tracing::info!(
            stream = %inv.stream,
            id = %inv.id,
            attempt = inv.attempt,
            "{}",
            String::from_utf8_lossy(line)
        ),
        Output::Stderr => tracing::info!(
            stream = %inv.stream,
            id = %inv.id,
            attempt = inv.attempt,
            output = "stderr",
            "{}",
            String::from_utf8_lossy(line)
        ),
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`] (without the `\n`).
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn push(&mut self, mut rest: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !rest.is_empty() {
            if self.line.len() >= MAX_LINE_BYTES {
                // A full piece: a newline right after it belongs to it (no empty line).
                if let Some((b'\n', after)) = rest.split_first() {
                    rest = after;
                }
                emit(&self.line);
                self.line.clear();
                continue;
            }
            let room = MAX_LINE_BYTES - self.line.len();
            let (window, _) = rest.split_at(room.min(rest.len()));
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let (text, after) = rest.split_at(nl);
                    self.line.extend_from_slice(text);
                    emit(&self.line);
                    self.line.clear();
                    rest = after.get(1..).unwrap_or_default();
                }
                None => {
                    self.line.extend_from_slice(window);
                    rest = rest.get(window.len()..).unwrap_or_default();
                }
            }
        }
    }

    /// Emits an unterminated last line, if any.
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            emit(&self.line);
            self.line.clear();
        }
    }
}

/// The last [`STDERR_TAIL_BYTES`] bytes written to stderr.
#[derive(Debug, Default)]
pub(crate) struct StderrTail {
    buf: VecDeque<u8>,
}

impl StderrTail {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let keep = chunk.len().min(STDERR_TAIL_BYTES);
        let chunk = chunk.get(chunk.len() - keep..).unwrap_or_default();
        let overflow = (self.buf.len() + chunk.len()).saturating_sub(STDERR_TAIL_BYTES);
        self.buf.drain(..overflow);
        self.buf.extend(chunk);
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    const INV: Invocation<'static> = Invocation {
        stream: "orders",
        group: "workers",
        consumer: "host-1",
        id: "1700000000000-0",
        attempt: 1,
    };

    /// Upper bound for any single run in these tests: generous, the machine may be busy.
    const RUN_DEADLINE: Duration = Duration::from_secs(300);

    fn sh(script: &str, args: &[&str]) -> HandlerCommand {
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            "sh".to_owned(),
        ];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        HandlerCommand {
            argv,
            env: Vec::new(),
            timeout: Duration::from_secs(120),
            kill_grace: Duration::from_secs(5),
        }
    }

    async fn run_with(cmd: &HandlerCommand, inv: &Invocation<'_>, stdin: Bytes) -> Report {
        let abort = CancellationToken::new();
        tokio::time::timeout(RUN_DEADLINE, run(cmd, inv, stdin, &abort))
            .await
            .expect("run did not return in time")
    }

    async fn run_sh(script: &str, args: &[&str], stdin: Bytes) -> Report {
        run_with(&sh(script, args), &INV, stdin).await
    }

    fn path_str(path: &Path) -> &str {
        path.to_str().expect("temp path is UTF-8")
    }

    /// Polls until `path` exists and is not empty.
    async fn wait_for_file(path: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && text.ends_with('\n')
            {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True when `pid` is no longer a live `sleep` (gone, zombie, or reused by another program).
    fn sleep_gone(pid: i32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            return true;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let state = rest.trim_start().chars().next().unwrap_or('X');
        comm != "sleep" || matches!(state, 'Z' | 'X' | 'x')
    }

    async fn assert_sleep_dies(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sleep_gone(pid) {
            assert!(Instant::now() < deadline, "grandchild {pid} still alive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn read_pid(text: &str) -> i32 {
        text.trim().parse().expect("pid file holds a pid")
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn reasons() {
        assert_eq!(Outcome::Exited(3).reason(), "exit code 3");
        assert_eq!(Outcome::Signaled(9).reason(), "killed by signal 9");
        assert_eq!(
            Outcome::TimedOut(Duration::from_secs(30)).reason(),
            "timeout after 30s"
        );
        assert_eq!(
            Outcome::TimedOut(Duration::from_millis(1500)).reason(),
            "timeout after 1s 500ms"
        );
        assert_eq!(
            Outcome::SpawnFailed("No such file or directory (os error 2)".into()).reason(),
            "spawn failed: No such file or directory (os error 2)"
        );
        assert_eq!(Outcome::Aborted.reason(), "aborted");
        assert_eq!(Outcome::Success.reason(), "success");
    }

    #[test]
    fn line_splitter_caps_and_joins() {
        fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut emit = |l: &[u8]| out.push(l.to_vec());
            let mut s = LineSplitter::default();
            for c in chunks {
                s.push(c, &mut emit);
                assert!(s.line.len() <= MAX_LINE_BYTES);
            }
            s.finish(&mut emit);
            out
        }
        assert_eq!(
            split(&[b"a\nbc", b"d\n\ne"]),
            vec![b"a".to_vec(), b"bcd".to_vec(), Vec::new(), b"e".to_vec()]
        );
        // Exactly the cap, then a newline: one line, no empty line after it.
        let exact = [vec![b'x'; MAX_LINE_BYTES], b"\nnext\n".to_vec()].concat();
        assert_eq!(
            split(&[&exact]),
            vec![vec![b'x'; MAX_LINE_BYTES], b"next".to_vec()]
        );
        // Same, with the newline arriving in the next chunk.
        let full = vec![b'x'; MAX_LINE_BYTES];
        assert_eq!(split(&[&full, b"\n"]), vec![full.clone()]);
        // Longer than the cap: pieces.
        let long = vec![b'y'; 2 * MAX_LINE_BYTES + 10];
        let pieces = split(&[&long[..5000], &long[5000..], b"\n"]);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0].len(), MAX_LINE_BYTES);
        assert_eq!(pieces[1].len(), MAX_LINE_BYTES);
        assert_eq!(pieces[2].len(), 10);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn stderr_tail_keeps_last_bytes() {
        let data = pseudo_random(3 * STDERR_TAIL_BYTES + 123);
        for chunk_size in [1, 100, 4095, 4096, 5000, data.len()] {
            let mut tail = StderrTail::default();
            for c in data.chunks(chunk_size) {
                tail.push(c);
                assert!(tail.buf.len() <= STDERR_TAIL_BYTES);
            }
            assert_eq!(tail.into_vec(), &data[data.len() - STDERR_TAIL_BYTES..]);
        }
        let mut tail = StderrTail::default();
        tail.push(b"short");
        assert_eq!(tail.into_vec(), b"short");
    }

    #[tokio::test]
    async fn exit_zero_is_success() {
        let r = run_sh("exit 0", &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
        assert!(r.stderr_tail.is_empty());
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let r = run_sh("echo failing >&2; exit 3", &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Exited(3));
        assert_eq!(r.outcome.reason(), "exit code 3");
        assert_eq!(r.stderr_tail, b"failing\n");
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let r = run_sh("kill -9 $$", &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Signaled(9));
        assert_eq!(r.outcome.reason(), "killed by signal 9");
    }

    #[tokio::test]
    async fn missing_program_is_spawn_failure() {
        let cmd = HandlerCommand {
            argv: vec!["/nonexistent/redis-streamd-no-such-handler".into()],
            env: Vec::new(),
            timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(1),
        };
        let r = run_with(&cmd, &INV, Bytes::from_static(b"payload")).await;
        let Outcome::SpawnFailed(msg) = &r.outcome else {
            panic!("expected SpawnFailed, got {:?}", r.outcome);
        };
        assert!(msg.contains("No such file or directory"), "{msg}");
        assert!(
            r.outcome
                .reason()
                .starts_with("spawn failed: No such file or directory"),
            "{}",
            r.outcome.reason()
        );

        let empty = HandlerCommand {
            argv: Vec::new(),
            ..cmd
        };
        let r = run_with(&empty, &INV, Bytes::new()).await;
        assert!(
            matches!(r.outcome, Outcome::SpawnFailed(_)),
            "{:?}",
            r.outcome
        );
    }

    #[tokio::test]
    async fn stdin_all_byte_values_exact() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdin");
        let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let r = run_sh(
            r#"cat > "$1""#,
            &[path_str(&out)],
            Bytes::from(payload.clone()),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!(std::fs::read(&out).unwrap(), payload);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_16_mib_exact() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdin");
        let payload = pseudo_random(16 * 1024 * 1024);
        let r = run_sh(
            r#"cat > "$1""#,
            &[path_str(&out)],
            Bytes::from(payload.clone()),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Success);
        assert!(
            std::fs::read(&out).unwrap() == payload,
            "stdin not delivered intact"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handler_ignoring_stdin_is_fine() {
        let payload = Bytes::from(pseudo_random(16 * 1024 * 1024));
        let r = run_sh("exit 0", &[], payload.clone()).await;
        assert_eq!(r.outcome, Outcome::Success);
        let r = run_sh("head -c 10 > /dev/null; exit 0", &[], payload).await;
        assert_eq!(r.outcome, Outcome::Success);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handler_writing_before_reading_does_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdin");
        let payload = pseudo_random(4 * 1024 * 1024);
        let r = run_sh(
            r#"head -c 4000000 /dev/zero; head -c 4000000 /dev/zero >&2; cat > "$1""#,
            &[path_str(&out)],
            Bytes::from(payload.clone()),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!(r.stderr_tail, vec![0u8; STDERR_TAIL_BYTES]);
        assert!(std::fs::read(&out).unwrap() == payload);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_without_newlines_completes() {
        let r = run_sh("head -c 100000000 /dev/zero", &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_of_lines_completes() {
        let r = run_sh("yes | head -c 100000000", &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
    }

    #[tokio::test]
    async fn stderr_tail_is_last_4_kib() {
        let script = r#"i=0; while [ $i -lt 2000 ]; do echo "line $i" >&2; i=$((i+1)); done"#;
        let r = run_sh(script, &[], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
        let all: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(r.stderr_tail.len(), STDERR_TAIL_BYTES);
        assert_eq!(
            r.stderr_tail,
            &all.as_bytes()[all.len() - STDERR_TAIL_BYTES..]
        );
    }

    #[tokio::test]
    async fn environment_has_invocation_and_stream_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let mut cmd = sh(r#"env > "$1""#, &[path_str(&out)]);
        cmd.env = vec![
            ("HANDLER_SETTING".into(), "a b=c".into()),
            ("PATH_EXTRA".into(), String::new()),
        ];
        let inv = Invocation { attempt: 3, ..INV };
        let r = run_with(&cmd, &inv, Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
        let env = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = env.lines().collect();
        for want in [
            "REDIS_STREAMD_STREAM=orders",
            "REDIS_STREAMD_GROUP=workers",
            "REDIS_STREAMD_CONSUMER=host-1",
            "REDIS_STREAMD_ID=1700000000000-0",
            "REDIS_STREAMD_ATTEMPT=3",
            "HANDLER_SETTING=a b=c",
            "PATH_EXTRA=",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{env}");
        }
        // The daemon's own environment is inherited.
        assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{env}");
    }

    /// Runs the test `name` alone in a child test process (this test binary) with `envs` added
    /// to its environment: for tests that need process-wide state (environment variables,
    /// tracing callsite interest) that other tests running in parallel would disturb.
    async fn run_test_in_child(name: &str, envs: &[(&str, &str)]) {
        let mut child = test_support::child_test(name, "1", &[]);
        child.envs(envs.iter().copied());
        let out = tokio::time::timeout(RUN_DEADLINE, tokio::process::Command::from(child).output())
            .await
            .expect("child test timed out")
            .unwrap();
        test_support::assert_child_passed(name, &out);
    }

    fn in_child() -> bool {
        test_support::child_marker().is_some()
    }

    /// Runs `env_child_strips_systemd_vars` with the systemd variables set in its process
    /// (setting them in this process would race the other tests).
    #[tokio::test]
    async fn environment_strips_systemd_vars() {
        run_test_in_child(
            "exec::handler::tests::env_child_strips_systemd_vars",
            &[
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("WATCHDOG_USEC", "30000000"),
                ("WATCHDOG_PID", "1"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_PID", "1"),
                ("LISTEN_FDNAMES", "a:b"),
            ],
        )
        .await;
    }

    /// Does its work only inside `environment_strips_systemd_vars`'s child process.
    #[tokio::test]
    async fn env_child_strips_systemd_vars() {
        if !in_child() {
            return;
        }
        assert!(std::env::var_os("NOTIFY_SOCKET").is_some());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let r = run_sh(r#"env > "$1""#, &[path_str(&out)], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
        let env = std::fs::read_to_string(&out).unwrap();
        for name in STRIPPED_ENV {
            assert!(
                !env.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{name} leaked into the handler:\n{env}"
            );
        }
        assert!(
            env.lines()
                .any(|l| l == format!("{}=1", test_support::CHILD_MARKER)),
            "{env}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = sh(
            r#"sleep 1000 & echo $! > "$1"; wait"#,
            &[path_str(&pidfile)],
        );
        cmd.timeout = Duration::from_secs(1);
        cmd.kill_grace = Duration::from_secs(60);
        let r = run_with(&cmd, &INV, Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::TimedOut(Duration::from_secs(1)));
        assert_eq!(r.outcome.reason(), "timeout after 1s");
        assert!(r.elapsed >= Duration::from_secs(1));
        // SIGTERM was enough: no waiting for the (long) grace.
        assert!(r.elapsed < Duration::from_secs(50), "{:?}", r.elapsed);
        let pid = read_pid(&wait_for_file(&pidfile).await);
        assert_sleep_dies(pid).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_ignored_gets_sigkill_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = sh(
            r#"trap '' TERM; sleep 1000 & echo $! > "$1"; wait"#,
            &[path_str(&pidfile)],
        );
        cmd.timeout = Duration::from_secs(1);
        cmd.kill_grace = Duration::from_millis(500);
        let r = run_with(&cmd, &INV, Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::TimedOut(Duration::from_secs(1)));
        assert!(r.elapsed >= Duration::from_millis(1500), "{:?}", r.elapsed);
        let pid = read_pid(&wait_for_file(&pidfile).await);
        assert_sleep_dies(pid).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_does_not_outlive_a_successful_handler() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let r = run_sh(
            r#"sleep 1000 & echo $! > "$1"; exit 0"#,
            &[path_str(&pidfile)],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Success);
        assert!(r.elapsed < Duration::from_secs(60), "{:?}", r.elapsed);
        let pid = read_pid(&wait_for_file(&pidfile).await);
        assert_sleep_dies(pid).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn escaped_descendant_does_not_hold_run_open() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The escaped sleep keeps stdout and stderr open.
        let r = run_sh(
            r#"setsid sleep 1000 & echo $! > "$1"; echo bye; exit 0"#,
            &[path_str(&pidfile)],
            Bytes::new(),
        )
        .await;
        let pid = read_pid(&wait_for_file(&pidfile).await);
        // Clean up the escapee before asserting anything.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert_eq!(r.outcome, Outcome::Success);
        assert!(r.elapsed < Duration::from_secs(60), "{:?}", r.elapsed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_stops_a_running_handler() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = sh(
            r#"sleep 1000 & echo $! > "$1"; wait"#,
            &[path_str(&pidfile)],
        );
        let abort = CancellationToken::new();
        let (r, pid) = tokio::time::timeout(RUN_DEADLINE, async {
            tokio::join!(run(&cmd, &INV, Bytes::new(), &abort), async {
                let pid = read_pid(&wait_for_file(&pidfile).await);
                abort.cancel();
                pid
            })
        })
        .await
        .expect("run did not return in time");
        assert_eq!(r.outcome, Outcome::Aborted);
        assert_eq!(r.outcome.reason(), "aborted");
        assert_sleep_dies(pid).await;
    }

    #[tokio::test]
    async fn abort_before_spawn_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let cmd = sh(r#"echo ran > "$1""#, &[path_str(&marker)]);
        let abort = CancellationToken::new();
        abort.cancel();
        let r = run(&cmd, &INV, Bytes::new(), &abort).await;
        assert_eq!(r.outcome, Outcome::Aborted);
        assert_eq!(r.elapsed, Duration::ZERO);
        assert!(!marker.exists());
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `logs_child_output_lines` alone: a scoped tracing subscriber does not reliably
    /// see events of callsites that other test threads registered concurrently.
    #[tokio::test]
    async fn output_lines_are_logged_with_fields() {
        run_test_in_child("exec::handler::tests::logs_child_output_lines", &[]).await;
    }

    /// Does its work only inside `output_lines_are_logged_with_fields`'s child process.
    #[tokio::test]
    async fn logs_child_output_lines() {
        if !in_child() {
            return;
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let r = run_sh(
            r#"echo hello; printf 'crlf\r\n'; echo oops >&2; printf 'tail'"#,
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Success);
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let find = |needle: &str| {
            logs.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no log line with {needle:?} in:\n{logs}"))
                .to_owned()
        };
        let hello = find(": hello");
        assert!(hello.contains("stream=orders"), "{hello}");
        assert!(hello.contains("id=1700000000000-0"), "{hello}");
        assert!(hello.contains("attempt=1"), "{hello}");
        assert!(!hello.contains("output="), "{hello}");
        assert!(find(": crlf").ends_with("attempt=1"), "{logs}");
        let oops = find(": oops");
        assert!(oops.contains(r#"output="stderr""#), "{oops}");
        find(": tail");
    }
}
