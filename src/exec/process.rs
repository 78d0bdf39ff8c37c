//! The lifecycle of one handler process, the same for a per-entry run and a worker:
//! the command (argv, environment), spawning it in a process group of its own, and
//! ending it (wait; on request SIGTERM, then SIGKILL after a grace; reap; kill what is
//! left of its group).
//!
//! # Decisions
//!
//! - `argv[0]` is spawned directly (no shell) with `process_group(0)`: the handler leads
//!   its own process group (pgid = its pid). There is deliberately no `pre_exec`, and the
//!   environment is changed with `env`/`env_remove` only, so std keeps using
//!   `posix_spawn` (see the project notes).
//! - The environment is the daemon's own minus the systemd variables of
//!   [`STRIPPED_ENV`] and minus the daemon's own settings (every inherited
//!   `REDIS_STREAMD_*` variable: `REDIS_STREAMD_REDIS_URL` may hold the Redis password,
//!   and handlers are often other teams' code), plus the stream's `env`, plus
//!   `REDIS_STREAMD_STREAM`, `_GROUP` and `_CONSUMER`; each mode adds its own variables.
//!   The daemon's environment is never modified.
//! - Ending a process sends SIGTERM (and SIGCONT, so a stopped handler can act on it) to
//!   its group, then SIGKILL after the grace. Once the process itself has been reaped,
//!   whatever is left of its group is sent SIGKILL: the group does not outlive the
//!   handler. A process dropped before it was reaped has its group killed too, and tokio
//!   reaps it in the background.
//! - Children are reaped through tokio only (`Child::wait`), never `waitpid(-1)`; each is
//!   registered with the orphan reaper (`ops::reaper`) from spawn until it was waited
//!   for, so the reaper never takes its exit status.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::config::StreamConfig;
use crate::identity::Consumer;
use crate::ops::reaper::{self, OwnChild};

/// Variables of the daemon's environment that handlers never see: they belong to the
/// daemon's relationship with systemd (notify socket, watchdog, socket activation).
pub(crate) const STRIPPED_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Prefix of the daemon's own settings in its environment (`REDIS_STREAMD_REDIS_URL`,
/// `_CONFIG`, `_CONSUMER`, `_LOG_FORMAT`, `_LOG_LEVEL`) and of the variables it sets for
/// handlers. Inherited ones never reach a handler.
const OWN_ENV_PREFIX: &str = "REDIS_STREAMD_";

/// The names of the `REDIS_STREAMD_*` variables in the daemon's environment, read once
/// (the daemon never changes its environment), so a spawn only removes those present.
fn inherited_own_env() -> &'static [OsString] {
    static NAMES: OnceLock<Vec<OsString>> = OnceLock::new();
    NAMES.get_or_init(|| {
        std::env::vars_os()
            .map(|(name, _)| name)
            .filter(|name| {
                name.as_encoded_bytes()
                    .starts_with(OWN_ENV_PREFIX.as_bytes())
            })
            .collect()
    })
}

/// What to run, shared by every process of one stream.
#[derive(Debug, Clone)]
pub(crate) struct HandlerCommand {
    /// argv; `argv[0]` is executed directly (PATH lookup when it has no slash).
    pub(crate) argv: Vec<String>,
    /// Extra environment (the stream's `env`), added to the daemon's own.
    pub(crate) env: Vec<(String, String)>,
    /// `handler_timeout`.
    pub(crate) timeout: Duration,
    /// Time between SIGTERM and SIGKILL to the process group (`KILL_GRACE` in production).
    pub(crate) kill_grace: Duration,
}

impl HandlerCommand {
    pub(crate) fn new(cfg: &StreamConfig, kill_grace: Duration) -> Self {
        HandlerCommand {
            argv: cfg.handler.clone(),
            env: cfg
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: cfg.handler_timeout,
            kill_grace,
        }
    }

    /// The command every handler process starts from, per-entry or worker: its own
    /// process group, three pipes, the daemon's environment minus [`STRIPPED_ENV`] and
    /// minus its own `REDIS_STREAMD_*` settings, the stream's `env`, and the
    /// `REDIS_STREAMD_*` variables naming the consumer.
    pub(crate) fn command(&self, who: &Consumer) -> io::Result<Command> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err(io::Error::other("empty handler argv"));
        };
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
        // Before the variables set below, which win over a removal of the same name.
        for name in inherited_own_env() {
            command.env_remove(name);
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("REDIS_STREAMD_STREAM", &who.stream)
            .env("REDIS_STREAMD_GROUP", &who.group)
            .env("REDIS_STREAMD_CONSUMER", &who.name);
        Ok(command)
    }

    /// The program, for log lines.
    pub(crate) fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
}

/// The pipes of a spawned process, taken out of it so they can be used on their own.
#[derive(Debug)]
pub(crate) struct Pipes {
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) stdout: Option<ChildStdout>,
    pub(crate) stderr: Option<ChildStderr>,
}

/// A running handler process, leader of its own process group.
#[derive(Debug)]
pub(crate) struct Process {
    child: Child,
    /// Keeps the orphan reaper away from this child until it has been waited for.
    registration: Option<OwnChild<'static>>,
    /// = its pid; `None` only if the pid did not fit (never on Linux).
    pgid: Option<Pid>,
    /// Set until the process has been reaped and its group killed; then dropping it has
    /// nothing left to do.
    armed: bool,
}

/// How [`Process::end`] went.
#[derive(Debug)]
pub(crate) struct Ended<T> {
    /// The exit status; an error only if something else reaped the child.
    pub(crate) status: io::Result<ExitStatus>,
    /// What the stop future returned, when the process had to be terminated.
    pub(crate) stopped: Option<T>,
}

impl Process {
    /// Spawns `command` (from [`HandlerCommand::command`]) and registers it with the
    /// orphan reaper.
    pub(crate) fn spawn(command: &mut Command) -> io::Result<(Process, Pipes)> {
        let (mut child, registration) = reaper::own_children().spawn(command)?;
        // `id()` is `Some` until the child has been reaped, which only `end` does.
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        let pipes = Pipes {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
        };
        let process = Process {
            child,
            registration: Some(registration),
            pgid,
            armed: true,
        };
        Ok((process, pipes))
    }

    pub(crate) fn pid(&self) -> Option<i32> {
        self.pgid.map(Pid::as_raw)
    }

    /// The exit status if the process has exited (without waiting).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to the group, plus SIGCONT so that a stopped handler gets to act on it.
    pub(crate) fn terminate(&self) {
        signal_group(self.pgid, Signal::SIGTERM);
        signal_group(self.pgid, Signal::SIGCONT);
    }

    pub(crate) fn kill(&self) {
        signal_group(self.pgid, Signal::SIGKILL);
    }

    /// Waits for the process to exit and reaps it. If `stop` completes first, the group
    /// gets SIGTERM, and SIGKILL `grace` later (`on_kill` is called just before). Once
    /// reaped, what is left of its group is killed.
    pub(crate) async fn end<T>(
        mut self,
        stop: impl Future<Output = T>,
        grace: Duration,
        on_kill: impl FnOnce(),
    ) -> Ended<T> {
        tokio::pin!(stop);
        let kill_timer = tokio::time::sleep(grace);
        tokio::pin!(kill_timer);
        let mut stopped = None;
        let mut on_kill = Some(on_kill);
        let status = loop {
            tokio::select! {
                biased;
                status = self.child.wait() => break status,
                why = &mut stop, if stopped.is_none() => {
                    self.terminate();
                    kill_timer.as_mut().reset(tokio::time::Instant::now() + grace);
                    stopped = Some(why);
                }
                () = &mut kill_timer, if stopped.is_some() && on_kill.is_some() => {
                    if let Some(on_kill) = on_kill.take() {
                        on_kill();
                    }
                    self.kill();
                }
            }
        };
        // Waited for (or the wait failed): the pid is no longer ours to protect.
        self.registration = None;
        // The process is gone: its group does not outlive it.
        self.kill();
        self.armed = false;
        Ended { status, stopped }
    }
}

impl Drop for Process {
    /// Dropped before it was reaped (e.g. the run was cancelled): kill the group while
    /// the unreaped leader still pins its pgid; tokio reaps the leader in the background.
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Whether a spawn failed for lack of resources (descriptors, processes, memory) rather
/// than because of the program: `EMFILE`, `ENFILE`, `EAGAIN`, `ENOMEM`.
pub(crate) fn is_resource_shortage(err: &io::Error) -> bool {
    err.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::EAGAIN, Errno::ENOMEM]
            .contains(&Errno::from_raw(code))
    })
}

/// Raises the soft limit of open files (`RLIMIT_NOFILE`) to the hard limit, as most
/// servers do: every handler process costs the daemon three pipes while it runs, and the
/// common soft limit of 1,024 (systemd's default for services) is soon reached with many
/// streams. Returns (old soft limit, new soft limit).
/// An unlimited hard limit is capped at the kernel's `fs.nr_open` (setting more fails).
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let target = match nr_open {
        Some(cap) => hard.min(cap),
        None => hard,
    };
    if soft >= target {
        return Ok((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok((soft, target))
}

fn signal_group(pgid: Option<Pid>, signal: Signal) {
    let Some(pgid) = pgid else { return };
    match killpg(pgid, signal) {
        // ESRCH: the group is already gone.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => {
            tracing::warn!(pgid = pgid.as_raw(), %signal, "cannot signal handler process group: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::per_entry::tests::{in_child, run_test_in_child};
    use std::time::Instant;

    fn sh(script: &str) -> HandlerCommand {
        HandlerCommand {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(5),
        }
    }

    fn who() -> Consumer {
        Consumer::new("s", "g", "c")
    }

    fn spawn(script: &str) -> (Process, Pipes) {
        let mut command = sh(script).command(&who()).expect("a command");
        Process::spawn(&mut command).expect("spawned")
    }

    const DEADLINE: Duration = Duration::from_secs(120);

    #[tokio::test]
    async fn exit_without_stop_is_not_stopped() {
        let (process, _pipes) = spawn("exit 7");
        let ended = tokio::time::timeout(
            DEADLINE,
            process.end(std::future::pending::<()>(), Duration::from_secs(60), || {}),
        )
        .await
        .expect("ended in time");
        assert_eq!(ended.status.expect("status").code(), Some(7));
        assert!(ended.stopped.is_none());
    }

    #[tokio::test]
    async fn stop_sends_sigterm_and_no_sigkill_when_it_is_enough() {
        let (process, _pipes) = spawn("sleep 1000");
        let killed = std::cell::Cell::new(false);
        let ended = tokio::time::timeout(
            DEADLINE,
            process.end(async { "stop" }, Duration::from_secs(60), || {
                killed.set(true)
            }),
        )
        .await
        .expect("ended in time");
        let status = ended.status.expect("status");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert_eq!(ended.stopped, Some("stop"));
        assert!(!killed.get(), "SIGKILL sent although SIGTERM was enough");
    }

    #[tokio::test]
    async fn sigterm_ignored_gets_sigkill_after_grace() {
        let (process, _pipes) = spawn("trap '' TERM; while :; do sleep 0.05; done");
        // Let the shell install its trap before the stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = std::cell::Cell::new(false);
        let grace = Duration::from_millis(300);
        let started = Instant::now();
        let ended =
            tokio::time::timeout(DEADLINE, process.end(async {}, grace, || killed.set(true)))
                .await
                .expect("ended in time");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(ended.status.expect("status").signal(), Some(9));
        assert!(killed.get());
        assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn dropping_an_unreaped_process_kills_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 1000 & echo $! > '{}'; wait", pidfile.display());
        let (process, _pipes) = spawn(&script);
        let deadline = Instant::now() + DEADLINE;
        let pid: i32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .filter(|t| t.ends_with('\n'))
                .and_then(|t| t.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pid file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        drop(process);
        let deadline = Instant::now() + DEADLINE;
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.contains("(sleep)") && !stat.contains(") Z"))
        {
            assert!(Instant::now() < deadline, "grandchild {pid} still alive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `child_raises_nofile_limit` alone: the limit is process-wide.
    #[tokio::test]
    async fn raises_the_soft_nofile_limit_to_the_hard_one() {
        run_test_in_child("exec::process::tests::child_raises_nofile_limit", &[]).await;
    }

    /// Does its work only inside `raises_the_soft_nofile_limit_to_the_hard_one`'s child.
    #[test]
    fn child_raises_nofile_limit() {
        if !in_child() {
            return;
        }
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let low = 64.min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).expect("lower the soft limit");
        assert_eq!(raise_nofile_limit().expect("raised"), (low, hard));
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
        // Already at the hard limit: nothing changes.
        assert_eq!(raise_nofile_limit().expect("unchanged"), (hard, hard));
    }

    #[test]
    fn empty_argv_is_an_error() {
        let cmd = HandlerCommand {
            argv: Vec::new(),
            ..sh("")
        };
        let err = cmd.command(&who()).expect_err("no program");
        assert_eq!(err.to_string(), "empty handler argv");
    }
}
