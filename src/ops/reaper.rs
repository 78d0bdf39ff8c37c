//! Child subreaper: reaping orphaned descendants of handlers (the daemon as PID 1 in a
//! container, or any daemon that called [`become_subreaper`]).
//!
//! A handler may double-fork (`cmd &` in a shell script, a daemonizing tool). When the
//! intermediate process exits, the grandchild is re-parented to the nearest subreaper or
//! to PID 1. In a container the daemon *is* PID 1, and after [`become_subreaper`] it is
//! the subreaper everywhere: either way those orphans become our children, and once they
//! exit they stay zombies until we `wait` for them.
//!
//! The catch is that tokio waits for the handlers it spawned by pid. A blanket
//! `waitpid(-1)` would also reap those and steal their exit statuses (tokio then gets
//! `ECHILD` and the entry's outcome is lost). So this module only reaps zombies that are
//! *not* ours: it keeps the set of pids spawned through [`OwnChildren::spawn`], scans
//! `/proc/*/stat` for zombies whose parent is this process, and `waitpid`s each pid that is
//! not in the set, one by one.
//!
//! Every child process the daemon starts must be spawned through [`own_children`]
//! (`own_children().spawn(&mut command)`); a child spawned any other way is taken for an
//! orphan once it exits and may be reaped before its owner waits for it.

use std::collections::HashSet;
use std::io;
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often orphans are looked for. Not on SIGCHLD: at full speed handlers exit
/// thousands of times a second, and a SIGCHLD handler costs every exit a signal delivery,
/// a write to tokio's signal pipe and a task wake-up (tokio itself waits for its children
/// through pidfds and needs no signal); scanning on every exit cost measurable throughput
/// (bench/), while an orphan waiting a second to be reaped costs nothing. Each look is one
/// `waitid` peek; `/proc` is read only when some child is a zombie.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Makes this process the child subreaper of its descendants (`PR_SET_CHILD_SUBREAPER`):
/// orphans re-parent to us instead of to PID 1. Pair it with [`spawn_reaper`].
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Why a scan for orphans failed.
#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("cannot list /proc: {0}")]
    Proc(#[source] io::Error),
}

/// The pids of child processes this daemon spawned and still waits for (through tokio).
///
/// The reaper never touches these. Registration happens inside [`OwnChildren::spawn`],
/// under a gate the reaper takes exclusively while it decides and reaps: without it, a
/// handler that exits within microseconds of its spawn could be seen as an unregistered
/// zombie and reaped before its pid is registered.
#[derive(Debug, Default)]
pub struct OwnChildren {
    /// Shared by spawns (in parallel with each other), exclusive for the reaper.
    gate: RwLock<()>,
    pids: Mutex<HashSet<i32>>,
}

/// The registration of one spawned child. Dropping it unregisters the pid.
///
/// Keep it until the child has been waited for (`child.wait()` returned). Dropping it
/// earlier is harmless only when the `Child` is dropped too: tokio then hands the process
/// to its orphan queue, which tolerates the reaper getting there first.
#[derive(Debug)]
#[must_use = "dropping the registration lets the reaper take the child's exit status"]
pub struct OwnChild<'a> {
    children: &'a OwnChildren,
    pid: u32,
}

impl OwnChild<'_> {
    /// The registered pid (tests check the table with it).
    #[cfg(test)]
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for OwnChild<'_> {
    fn drop(&mut self) {
        self.children.unregister(self.pid);
    }
}

impl OwnChildren {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `command` and registers the child's pid before the reaper can look at it.
    /// Spawning keeps the fast posix_spawn path (no `pre_exec` involved).
    pub fn spawn(
        &self,
        command: &mut tokio::process::Command,
    ) -> io::Result<(tokio::process::Child, OwnChild<'_>)> {
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let child = command.spawn()?;
        // `id()` is `None` only once the child has been reaped, which cannot have
        // happened yet: nobody has polled it, and the reaper waits for the gate.
        let pid = child.id().ok_or_else(|| {
            io::Error::other("spawned child has no pid (already reaped before registration)")
        })?;
        self.register(pid);
        Ok((
            child,
            OwnChild {
                children: self,
                pid,
            },
        ))
    }

    /// Marks `pid` as one of ours. Prefer [`OwnChildren::spawn`]: registering after a
    /// plain spawn leaves a short window in which a child that already exited can be
    /// reaped by the reaper.
    pub fn register(&self, pid: u32) {
        if let Ok(pid) = i32::try_from(pid) {
            self.pids().insert(pid);
        }
    }

    /// Forgets `pid`, once it has been waited for.
    pub fn unregister(&self, pid: u32) {
        if let Ok(pid) = i32::try_from(pid) {
            self.pids().remove(&pid);
        }
    }

    /// Whether `pid` is registered (tests check the table with it).
    #[cfg(test)]
    pub fn contains(&self, pid: u32) -> bool {
        i32::try_from(pid).is_ok_and(|pid| self.pids().contains(&pid))
    }

    fn pids(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The registry of the daemon's own children, shared by the handler runner and the reaper.
pub fn own_children() -> &'static OwnChildren {
    static OWN: OnceLock<OwnChildren> = OnceLock::new();
    OWN.get_or_init(OwnChildren::new)
}

/// An orphan this process reaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    pub status: WaitStatus,
}

/// Starts the reaper task: on SIGCHLD and every few seconds it reaps exited orphans (see
/// the module docs). Ends when `stop` is cancelled; cancel it only after the last handler
/// has exited, so late orphans are still collected while handlers drain.
pub fn spawn_reaper(stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SCAN_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut proc_error_logged = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            match tokio::task::spawn_blocking(|| reap_orphans(own_children())).await {
                Ok(Ok(reaped)) => {
                    proc_error_logged = false;
                    for r in reaped {
                        tracing::debug!(pid = r.pid, status = ?r.status, "reaped an orphaned process");
                    }
                }
                Ok(Err(error)) => {
                    // Without /proc we cannot tell orphans from our own children, and
                    // guessing would steal exit statuses: leave the zombies.
                    if !proc_error_logged {
                        tracing::warn!(%error, "cannot look for orphaned processes; zombies may accumulate");
                        proc_error_logged = true;
                    }
                }
                Err(error) => tracing::error!(%error, "orphan reaper scan failed"),
            }
        }
    })
}

/// Reaps every exited child of this process whose pid is not in `own`. Blocking (reads
/// `/proc`): call it from `spawn_blocking`.
pub fn reap_orphans(own: &OwnChildren) -> Result<Vec<Reaped>, ReapError> {
    // One syscall says whether any child at all is a zombie; only then is /proc read.
    if !any_zombie_child() {
        return Ok(Vec::new());
    }
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let zombies = zombie_children(me)?;
    if zombies.is_empty() {
        return Ok(Vec::new());
    }
    // Exclusive: no spawn is between `spawn()` and `register()` now, so every live child
    // of ours that tokio still has to wait for is in the set.
    let _gate = own.gate.write().unwrap_or_else(|p| p.into_inner());
    let mut reaped = Vec::new();
    for pid in zombies {
        if own.pids().contains(&pid) {
            continue;
        }
        // WNOHANG: the pid was a zombie a moment ago, but never risk blocking the thread.
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => reaped.push(Reaped { pid, status }),
            // Reaped meanwhile by someone else (tokio's orphan queue for a dropped Child).
            Err(Errno::ECHILD) => {}
            Err(error) => tracing::debug!(pid, %error, "waitpid on an orphan failed"),
        }
    }
    Ok(reaped)
}

/// Whether some child of ours has exited and not been reaped: `waitid(P_ALL, WEXITED |
/// WNOHANG | WNOWAIT)` looks without reaping, so no exit status is taken from anyone.
fn any_zombie_child() -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::All, flags) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // ECHILD: no children at all. Anything else: scan to be safe.
        Err(Errno::ECHILD) => false,
        Err(_) => true,
    }
}

/// Pids of zombies (state `Z`) whose parent is `parent`.
fn zombie_children(parent: i32) -> Result<Vec<i32>, ReapError> {
    let mut zombies = Vec::new();
    for dirent in std::fs::read_dir("/proc").map_err(ReapError::Proc)? {
        let Ok(dirent) = dirent else { continue };
        let name = dirent.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // The process may be gone by now: any error just means "not a zombie of ours".
        let Ok(stat) = std::fs::read(dirent.path().join("stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat)
            && state == b'Z'
            && ppid == parent
        {
            zombies.push(pid);
        }
    }
    Ok(zombies)
}

/// State and parent pid from a `/proc/<pid>/stat` line: `pid (comm) S ppid ...`. The
/// command name may contain spaces and parentheses, so fields are counted from the last
/// `)`.
fn parse_stat(stat: &[u8]) -> Option<(u8, i32)> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn parses_stat_lines() {
        assert_eq!(
            parse_stat(b"1234 (sleep) Z 42 1234 1 0 -1 4194564 ..."),
            Some((b'Z', 42))
        );
        // A command name with spaces and parentheses.
        assert_eq!(parse_stat(b"77 (a) S 9 (b)) R 5 77 77 0"), Some((b'R', 5)));
        assert_eq!(parse_stat(b"garbage"), None);
        assert_eq!(parse_stat(b"1 (x)"), None);
    }

    #[test]
    fn registration_is_dropped_with_the_guard() {
        let own = OwnChildren::new();
        own.register(10);
        assert!(own.contains(10));
        own.unregister(10);
        assert!(!own.contains(10));
        let guard = OwnChild {
            children: &own,
            pid: 11,
        };
        own.register(11);
        assert!(own.contains(guard.pid()));
        drop(guard);
        assert!(!own.contains(11));
    }

    const SUBREAPER_CHILD: &str = "ops::reaper::tests::subreaper_child";

    /// Becoming a subreaper changes the whole process (and orphans would pile up in the
    /// test runner), so the real test runs alone in a child process: this test binary.
    #[test]
    fn orphaned_grandchildren_are_reaped() {
        let out = test_support::child_test(SUBREAPER_CHILD, "1", &[])
            .arg("--nocapture")
            .output()
            .unwrap();
        test_support::assert_child_passed(SUBREAPER_CHILD, &out);
    }

    /// The same test with the daemon as PID 1 of a new PID namespace, as in a container
    /// (`unshare --pid`, a stand-in for Docker's). Needs root or user namespaces; skipped
    /// with a note where `unshare` is missing or not permitted.
    #[test]
    fn orphaned_grandchildren_are_reaped_as_pid_1() {
        let unshare = ["unshare", "--pid", "--fork", "--mount-proc"];
        let usable = std::process::Command::new(unshare[0])
            .args(&unshare[1..])
            .arg("true")
            .output()
            .is_ok_and(|out| out.status.success());
        if !usable {
            eprintln!("note: cannot create a PID namespace with unshare here; skipping");
            return;
        }
        let out = test_support::child_test(SUBREAPER_CHILD, "pid1", &unshare)
            .output()
            .unwrap();
        test_support::assert_child_passed(SUBREAPER_CHILD, &out);
    }

    fn stat_of(pid: i32) -> Option<(u8, i32)> {
        parse_stat(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
    }

    async fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
        let until = Instant::now() + deadline;
        while !done() {
            assert!(Instant::now() < until, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Does its work only inside [`orphaned_grandchildren_are_reaped`]'s child process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subreaper_child() {
        let Some(marker) = test_support::child_marker() else {
            return;
        };
        let me = i32::try_from(std::process::id()).unwrap();
        if marker == "pid1" {
            assert_eq!(me, 1, "not PID 1 of a new PID namespace");
        }
        become_subreaper().unwrap();
        assert!(nix::sys::prctl::get_child_subreaper().unwrap());
        let stop = CancellationToken::new();
        let reaper = spawn_reaper(stop.clone());

        // One of ours that exits at once and is deliberately not waited for yet: it stays a
        // zombie through every scan below, and the reaper must leave it alone.
        let mut ours = tokio::process::Command::new("sh");
        ours.args(["-c", "exit 7"]);
        let (mut ours, registration) = own_children().spawn(&mut ours).unwrap();
        let ours_pid = i32::try_from(registration.pid()).unwrap();

        // A double fork: sh starts a grandchild in the background and exits, so the
        // grandchild is orphaned and re-parented to us.
        let mut parent = tokio::process::Command::new("sh");
        parent
            .args(["-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"])
            .stdout(std::process::Stdio::piped());
        let (parent, parent_registration) = own_children().spawn(&mut parent).unwrap();
        let out = parent.wait_with_output().await.unwrap();
        drop(parent_registration);
        assert!(out.status.success());
        let grandchild: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let (state, ppid) = stat_of(grandchild).expect("grandchild still sleeping");
        assert_eq!(
            ppid, me,
            "grandchild (state {}) not re-parented to us",
            state as char
        );

        // A direct child nobody waits for (std does not reap a dropped Child): also an
        // unregistered zombie, and the reaper takes it too.
        let stray = std::process::Command::new("true").spawn().unwrap();
        let stray_pid = i32::try_from(stray.id()).unwrap();
        drop(stray);

        wait_until(
            "the orphaned grandchild is reaped",
            Duration::from_secs(20),
            || stat_of(grandchild).is_none_or(|(_, ppid)| ppid != me),
        )
        .await;
        wait_until("the stray child is reaped", Duration::from_secs(20), || {
            stat_of(stray_pid).is_none_or(|(_, ppid)| ppid != me)
        })
        .await;

        // Ours is still a zombie waiting for tokio, and tokio gets its real exit status.
        assert_eq!(stat_of(ours_pid), Some((b'Z', me)));
        let status = ours.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        drop(registration);

        // Many short-lived children of ours while scans run back to back on another
        // thread: tokio must get every exit status (none stolen, including children that
        // exit before their spawn call has even returned).
        let scanning = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let scanner = {
            let scanning = scanning.clone();
            std::thread::spawn(move || {
                let mut scans = 0u32;
                while scanning.load(std::sync::atomic::Ordering::Relaxed) {
                    reap_orphans(own_children()).unwrap();
                    scans += 1;
                }
                scans
            })
        };
        let mut runs = tokio::task::JoinSet::new();
        for i in 0..200u8 {
            runs.spawn(async move {
                let code = i32::from(i % 50) + 1;
                let mut cmd = tokio::process::Command::new("sh");
                cmd.args(["-c", &format!("exit {code}")]);
                let (mut child, registration) = own_children().spawn(&mut cmd).unwrap();
                let status = child.wait().await;
                drop(registration);
                (code, status.map(|s| s.code()))
            });
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        while let Some(run) = runs.join_next().await {
            let (code, status) = run.unwrap();
            assert_eq!(status.unwrap(), Some(code));
        }
        scanning.store(false, std::sync::atomic::Ordering::Relaxed);
        let scans = scanner.join().unwrap();
        assert!(scans > 10, "only {scans} scans ran alongside the spawns");

        let zombies = zombie_children(me).unwrap();
        assert!(zombies.is_empty(), "zombies left: {zombies:?}");
        stop.cancel();
        reaper.await.unwrap();
    }
}
