//! Helpers for the fault-injection tests (tests/faults.rs), on top of the shared harness in
//! tests/common/mod.rs (used read-only).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::common::*;

/// Short recovery settings shared by every stream of these tests.
pub const FAST: &str =
    "block = \"200ms\"\nclaim_interval = \"500ms\"\nclaim_idle = \"3s\"\nretry_backoff = \"100ms\"";

/// A full config: `[redis]`, `[daemon]` with the given consumer name and shutdown timeout,
/// and the given `[[streams]]` tables.
pub fn config_as(url: &str, consumer: &str, shutdown_timeout: &str, streams: &str) -> String {
    format!(
        "[redis]\nurl = {}\n\n[daemon]\nconsumer = {}\nshutdown_timeout = {}\n\n{}\n",
        toml_str(url),
        toml_str(consumer),
        toml_str(shutdown_timeout),
        streams
    )
}

/// A `[[streams]]` table with [`FAST`] settings, then `extra` lines. A key in `extra` that
/// is also in [`FAST`] must not be repeated (TOML rejects duplicate keys): use
/// [`fast_except`] for those.
pub fn fast_stream(name: &str, group: &str, script: &Path, extra: &str) -> String {
    stream_table(name, group, script, &format!("{FAST}\n{extra}"))
}

/// [`FAST`] without the keys named in `skip`.
pub fn fast_except(skip: &[&str]) -> String {
    FAST.lines()
        .filter(|l| !skip.iter().any(|k| l.starts_with(&format!("{k} "))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Non-zombie direct children of `pid`: the handler processes a daemon is running.
pub fn live_children(pid: u32) -> Vec<(i32, i32)> {
    children_of(pid)
        .into_iter()
        .filter(|(p, _)| proc_stat(*p).is_some_and(|s| s.state != 'Z'))
        .collect()
}

/// Pids of every live (non-zombie) process whose process group is one of `pgids`.
pub fn live_members_of(pgids: &HashSet<i32>) -> Vec<(i32, ProcStat)> {
    processes()
        .into_iter()
        .filter(|(_, st)| st.state != 'Z' && pgids.contains(&st.pgid))
        .collect()
}

/// Process groups to SIGKILL when dropped: handlers orphaned by a `kill -9` of their daemon
/// (the harness's `Daemon` only cleans up after a daemon it kills itself), so a test never
/// leaves sleeping handlers behind.
#[derive(Default)]
pub struct Orphans(pub Vec<i32>);

impl Orphans {
    /// `kill -9` the daemon like a crash, leaving its handlers running, and remember their
    /// process groups. Returns how many handler processes were running at that moment.
    pub fn kill9(&mut self, daemon: &mut Daemon) -> usize {
        let before = live_children(daemon.pid());
        daemon.kill9();
        // A handler spawned between the scan and the kill is not remembered; the tests'
        // handlers end by themselves within minutes at worst.
        self.0.extend(before.iter().map(|(_, pgid)| *pgid));
        before.len()
    }

    /// SIGKILL the remembered groups now (as if the machine had died with the daemon).
    pub fn kill_all(&mut self) {
        for pgid in self.0.drain(..) {
            if pgid > 1 && pgid as u32 != std::process::id() {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Orphans {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// `dlq_source_id` of every entry in the dead-letter stream.
pub async fn dlq_source_ids(c: &TestClient, dlq: &str) -> Vec<String> {
    c.xrange_all(dlq)
        .await
        .iter()
        .map(|e| e.get_str("dlq_source_id").unwrap_or_default())
        .collect()
}

/// The set of (trimmed, non-empty) lines of a file.
pub fn line_set(path: &Path) -> BTreeSet<String> {
    read_lines(path)
        .into_iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Ids in `ids` that are neither in `done` nor in `dlq`.
pub fn missing_ids<'a>(
    ids: &'a [String],
    done: &BTreeSet<String>,
    dlq: &HashSet<String>,
) -> Vec<&'a String> {
    ids.iter()
        .filter(|id| !done.contains(*id) && !dlq.contains(*id))
        .collect()
}

/// True once every id in `ids` was delivered, nothing is pending, and every id is either in
/// `done_file` (its handler succeeded at least once) or dead-lettered.
pub async fn all_settled(
    c: &TestClient,
    stream: &str,
    group: &str,
    dlq: &str,
    ids: &[String],
    done_file: &Path,
) -> bool {
    let Some(last) = ids.last() else {
        return true;
    };
    if !c.all_acked_through(stream, group, last).await {
        return false;
    }
    let dlq: HashSet<String> = dlq_source_ids(c, dlq).await.into_iter().collect();
    missing_ids(ids, &line_set(done_file), &dlq).is_empty()
}

/// Blocks the current (multi-thread runtime) worker for a synchronous harness call such as
/// a redis-server restart, so the runtime keeps driving the test client meanwhile.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Sleeps without asserting anything about time: a settle period in which nothing more
/// should happen.
pub async fn settle(secs: f64) {
    tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
}
