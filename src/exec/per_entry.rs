//! Per-entry mode (`mode = "exec"`): a fresh handler process per entry attempt, from
//! spawn to reaped exit, one task per attempt.
//!
//! # How a run goes
//!
//! - The process is spawned as `process` describes, with `REDIS_STREAMD_ID` and
//!   `REDIS_STREAMD_ATTEMPT` added to its environment.
//! - stdin is written and closed while stdout and stderr are read, all concurrently, so a
//!   handler that writes a lot before reading cannot deadlock. A broken pipe on stdin (the
//!   handler did not read it) is normal. Output is logged line by line (`output`), inside
//!   the attempt's span (`id`, `attempt`).
//! - On timeout or abort the process group is terminated (SIGTERM, SIGKILL after the
//!   grace). Once the daemon has sent SIGTERM, the outcome is `TimedOut` or `Aborted`
//!   however the handler then exits (even with status 0): it was interrupted, not
//!   finished.
//! - The output pipes are read for at most [`OUTPUT_DRAIN_GRACE`] after the handler
//!   exited and its group was killed, then closed: a descendant that left the group
//!   (`setsid`) could otherwise keep them open forever.
//! - If tokio cannot report the exit status (only possible when something else reaped the
//!   child), the run counts as a failed attempt, `Exited(-1)`, never as a success.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::exec::output::{self, Origin, Pipe, StderrTail};
use crate::exec::process::{Ended, HandlerCommand, Pipes, Process};
use crate::exec::{Outcome, Report, Ticket};
use crate::identity::Consumer;

/// How long output is still read after the handler exited and its group was killed.
pub(crate) const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);

/// The per-entry executor of one stream: a task per submitted attempt.
pub(crate) struct PerEntry {
    shared: Arc<Shared>,
    tasks: TaskTracker,
}

struct Shared {
    cmd: HandlerCommand,
    who: Consumer,
    abort: CancellationToken,
}

impl PerEntry {
    pub(crate) fn new(cmd: HandlerCommand, who: Consumer, abort: CancellationToken) -> Self {
        PerEntry {
            shared: Arc::new(Shared { cmd, who, abort }),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs the attempt on a task of its own; its `Done` is sent when the handler has
    /// been reaped.
    pub(crate) fn submit(&self, ticket: Ticket, payload: Bytes) {
        let shared = self.shared.clone();
        let attempt = async move {
            let Shared { cmd, who, abort } = &*shared;
            let report = run(cmd, who, ticket.id(), ticket.attempt(), payload, abort).await;
            ticket.finish(report);
        };
        // The attempt's span is a child of the submitter's (the stream's) span.
        self.tasks.spawn(attempt.in_current_span());
    }

    /// Waits until every submitted attempt has ended (the abort token ends them early).
    pub(crate) async fn shutdown(&self) {
        self.tasks.close();
        self.tasks.wait().await;
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
#[tracing::instrument(name = "attempt", skip_all, fields(id = %id, attempt = attempt))]
pub(crate) async fn run(
    cmd: &HandlerCommand,
    who: &Consumer,
    id: &str,
    attempt: u64,
    stdin: Bytes,
    abort: &CancellationToken,
) -> Report {
    if abort.is_cancelled() {
        return Report::without_run(Outcome::Aborted);
    }
    let stream = who.stream.as_str();
    let spawned = cmd.command(who).and_then(|mut command| {
        command
            .env("REDIS_STREAMD_ID", id)
            .env("REDIS_STREAMD_ATTEMPT", attempt.to_string());
        Process::spawn(&mut command)
    });
    let started = Instant::now();
    let (process, pipes) = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            tracing::debug!(
                stream,
                program = cmd.program(),
                "handler spawn failed: {err}"
            );
            return Report::without_run(Outcome::of_spawn_error(&err));
        }
    };
    tracing::debug!(stream, pid = process.pid(), "handler started");

    let mut tail = StderrTail::default();
    let (ended, elapsed) = {
        let io = pump_io(pipes, stdin, &mut tail, stream);
        tokio::pin!(io);
        let on_kill = || {
            tracing::warn!(
                stream,
                "handler did not exit within {} of SIGTERM, sending SIGKILL to its process group",
                humantime::format_duration(cmd.kill_grace)
            );
        };
        let ending = process.end(stop_reason(cmd, abort, stream), cmd.kill_grace, on_kill);
        tokio::pin!(ending);
        let mut io_done = false;
        let ended = loop {
            tokio::select! {
                biased;
                ended = &mut ending => break ended,
                () = &mut io, if !io_done => io_done = true,
            }
        };
        let elapsed = started.elapsed();
        if !io_done
            && tokio::time::timeout(OUTPUT_DRAIN_GRACE, &mut io)
                .await
                .is_err()
        {
            tracing::debug!(
                stream,
                "handler output pipes still open after it exited (a descendant left its process group?); closing them"
            );
        }
        (ended, elapsed)
    };
    Report::new(outcome(ended, cmd, stream), tail.into_vec(), elapsed)
}

/// Completes when the handler must be stopped: at its timeout, or at the abort.
async fn stop_reason(cmd: &HandlerCommand, abort: &CancellationToken, stream: &str) -> Stop {
    tokio::select! {
        () = tokio::time::sleep(cmd.timeout) => {
            tracing::warn!(
                stream,
                "handler still running after {}, sending SIGTERM to its process group",
                humantime::format_duration(cmd.timeout)
            );
            Stop::Timeout
        }
        () = abort.cancelled() => {
            tracing::debug!(stream, "shutdown: sending SIGTERM to the handler's process group");
            Stop::Abort
        }
    }
}

/// The outcome of a run that ended: once stopped by the daemon, interrupted whatever the
/// exit status.
fn outcome(ended: Ended<Stop>, cmd: &HandlerCommand, stream: &str) -> Outcome {
    match (ended.stopped, ended.status) {
        (Some(Stop::Timeout), _) => Outcome::TimedOut(cmd.timeout),
        (Some(Stop::Abort), _) => Outcome::Aborted,
        (None, Ok(status)) => Outcome::of_exit(status),
        (None, Err(err)) => {
            // Only possible if someone else reaped our child (a stray `waitpid(-1)`). The
            // exit status is lost: report a failed attempt rather than a success.
            tracing::warn!(
                stream,
                "waiting for the handler failed: {err}; counting the attempt as failed"
            );
            Outcome::Exited(-1)
        }
    }
}

/// Writes stdin and reads stdout and stderr, all at once.
async fn pump_io(pipes: Pipes, payload: Bytes, tail: &mut StderrTail, stream: &str) {
    let stdout = async {
        if let Some(out) = pipes.stdout {
            let origin = Origin::Attempt {
                stream,
                pipe: Pipe::Stdout,
            };
            let result = output::read_output(out, origin, |_| {}).await;
            log_read_error(result, stream, Pipe::Stdout);
        }
    };
    let stderr = async {
        if let Some(err) = pipes.stderr {
            let origin = Origin::Attempt {
                stream,
                pipe: Pipe::Stderr,
            };
            let result = output::read_output(err, origin, |chunk| tail.push(chunk)).await;
            log_read_error(result, stream, Pipe::Stderr);
        }
    };
    tokio::join!(write_stdin(pipes.stdin, payload, stream), stdout, stderr);
}

fn log_read_error(result: io::Result<()>, stream: &str, which: Pipe) {
    if let Err(err) = result {
        tracing::debug!(stream, "reading the handler's {which:?} failed: {err}");
    }
}

async fn write_stdin(pipe: Option<ChildStdin>, payload: Bytes, stream: &str) {
    let Some(mut pipe) = pipe else { return };
    if !payload.is_empty() {
        match pipe.write_all(&payload).await {
            Ok(()) => {}
            // The handler exited or closed stdin without reading all of it: its business.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
            Err(err) => {
                tracing::debug!(stream, "writing the handler's stdin failed: {err}");
            }
        }
    }
    // Dropping the pipe closes it: the handler sees end of file.
    drop(pipe);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exec::output::STDERR_TAIL_BYTES;
    use crate::exec::output::tests::pseudo_random;
    use crate::exec::process::STRIPPED_ENV;
    use crate::test_support;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;
    use std::path::Path;
    use std::sync::Mutex;

    const ID: &str = "1700000000000-0";

    fn who() -> Consumer {
        Consumer::new("orders", "workers", "host-1")
    }

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

    async fn run_with(cmd: &HandlerCommand, attempt: u64, stdin: Bytes) -> Report {
        let abort = CancellationToken::new();
        tokio::time::timeout(RUN_DEADLINE, run(cmd, &who(), ID, attempt, stdin, &abort))
            .await
            .expect("run did not return in time")
    }

    async fn run_sh(script: &str, args: &[&str], stdin: Bytes) -> Report {
        run_with(&sh(script, args), 1, stdin).await
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
        let r = run_with(&cmd, 1, Bytes::from_static(b"payload")).await;
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
        let r = run_with(&empty, 1, Bytes::new()).await;
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
        let r = run_with(&cmd, 3, Bytes::new()).await;
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
    pub(crate) async fn run_test_in_child(name: &str, envs: &[(&str, &str)]) {
        let mut child = test_support::child_test(name, "1", &[]);
        child.envs(envs.iter().copied());
        let out = tokio::time::timeout(RUN_DEADLINE, tokio::process::Command::from(child).output())
            .await
            .expect("child test timed out")
            .unwrap();
        test_support::assert_child_passed(name, &out);
    }

    pub(crate) fn in_child() -> bool {
        test_support::child_marker().is_some()
    }

    /// Runs `env_child_strips_daemon_vars` with the systemd variables and the daemon's own
    /// settings set in its process (setting them in this process would race the other
    /// tests).
    #[tokio::test]
    async fn environment_strips_systemd_and_daemon_vars() {
        run_test_in_child(
            "exec::per_entry::tests::env_child_strips_daemon_vars",
            &[
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("WATCHDOG_USEC", "30000000"),
                ("WATCHDOG_PID", "1"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_PID", "1"),
                ("LISTEN_FDNAMES", "a:b"),
                (
                    "REDIS_STREAMD_REDIS_URL",
                    "redis://:s3cret@127.0.0.1:6379/0",
                ),
                ("REDIS_STREAMD_CONFIG", "/etc/redis-streamd/config.toml"),
                ("REDIS_STREAMD_CONSUMER", "from-the-daemon-env"),
                ("REDIS_STREAMD_LOG_LEVEL", "debug"),
                ("REDIS_STREAMD_FUTURE_SETTING", "x"),
                ("REDIS_STREAMD_ID", "inherited"),
            ],
        )
        .await;
    }

    /// Does its work only inside `environment_strips_systemd_and_daemon_vars`'s child
    /// process.
    #[tokio::test]
    async fn env_child_strips_daemon_vars() {
        if !in_child() {
            return;
        }
        assert!(std::env::var_os("NOTIFY_SOCKET").is_some());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let r = run_sh(r#"env > "$1""#, &[path_str(&out)], Bytes::new()).await;
        assert_eq!(r.outcome, Outcome::Success);
        let env = std::fs::read_to_string(&out).unwrap();
        let gone = STRIPPED_ENV.iter().chain(&[
            "REDIS_STREAMD_REDIS_URL",
            "REDIS_STREAMD_CONFIG",
            "REDIS_STREAMD_LOG_LEVEL",
            "REDIS_STREAMD_FUTURE_SETTING",
            test_support::CHILD_MARKER,
        ]);
        for name in gone {
            assert!(
                !env.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{name} leaked into the handler:\n{env}"
            );
        }
        assert!(!env.contains("s3cret"), "{env}");
        // What the daemon sets wins over what it inherited.
        let lines: Vec<&str> = env.lines().collect();
        for want in [
            "REDIS_STREAMD_CONSUMER=host-1",
            "REDIS_STREAMD_ID=1700000000000-0",
            "REDIS_STREAMD_STREAM=orders",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{env}");
        }
        assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{env}");
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
        let r = run_with(&cmd, 1, Bytes::new()).await;
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
        let r = run_with(&cmd, 1, Bytes::new()).await;
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
        let who = who();
        let (r, pid) = tokio::time::timeout(RUN_DEADLINE, async {
            tokio::join!(run(&cmd, &who, ID, 1, Bytes::new(), &abort), async {
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
        let r = run(&cmd, &who(), ID, 1, Bytes::new(), &abort).await;
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
        run_test_in_child("exec::per_entry::tests::logs_child_output_lines", &[]).await;
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
        // id and attempt come from the attempt's span.
        assert!(
            hello.contains("attempt{id=1700000000000-0 attempt=1}"),
            "{hello}"
        );
        assert!(!hello.contains("output="), "{hello}");
        // The line end (CR LF) is not part of the message.
        assert!(find(": crlf").ends_with("crlf stream=orders"), "{logs}");
        let oops = find(": oops");
        assert!(oops.contains(r#"output="stderr""#), "{oops}");
        find(": tail");
    }
}
