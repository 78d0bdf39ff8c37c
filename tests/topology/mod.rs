//! Support for the topology tests (tests/cluster.rs, tests/sentinel.rs, tests/tls_unix.rs):
//! redis-server and sentinel processes on free loopback ports in temp dirs with no
//! persistence ([`Node`]), a 3-primary / 3-replica Cluster ([`cluster::Cluster`]), a
//! Sentinel set ([`sentinel::SentinelSet`]), test certificates ([`tls::Certs`]), configs and
//! a recording handler here, and (in `checks`, re-exported) the checks every such test
//! makes: every entry handled or dead-lettered, nothing pending, nothing lost.
//!
//! Every process is SIGKILLed and waited for on drop, frozen (`kill -STOP`) ones included,
//! so a failing test leaves nothing behind. Built on the shared harness in
//! tests/common/mod.rs (`TestClient`, `Daemon`, `wait_until`, scripts), used read-only.
#![allow(dead_code)]

mod checks;
pub mod cluster;
pub mod resp;
pub mod sentinel;
pub mod tls;

pub use checks::*;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

/// Deadline for a topology to form or heal (cluster create, promotion, sentinel discovery).
pub const FORM: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// One redis-server or sentinel process
// ---------------------------------------------------------------------------------------

/// A redis-server (or `--sentinel`) process on 127.0.0.1, with its own directory and log.
/// Killed with SIGKILL and waited for on drop (also when frozen with SIGSTOP).
pub struct Node {
    pub name: String,
    port: u16,
    spare_port: u16,
    dir: PathBuf,
    log_path: PathBuf,
    pid: u32,
    child: Option<Child>,
    frozen: bool,
}

impl Node {
    /// Starts `redis-server ARGS` in `parent/name`, where `args(port, spare_port, dir)` gives
    /// the arguments for two free ports (the main port, which must answer PING once ready,
    /// and a spare one for a cluster bus or a TLS port). Retries with new ports when one
    /// was taken meanwhile.
    pub fn start(parent: &Path, name: &str, args: &dyn Fn(u16, u16, &Path) -> Vec<String>) -> Node {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).expect("node dir");
        let log_path = dir.join("redis.log");
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port();
            let spare_port = loop {
                let p = free_port();
                if p != port {
                    break p;
                }
            };
            let argv = args(port, spare_port, &dir);
            match spawn_ready(&argv, &log_path, port) {
                Ok(child) => {
                    return Node {
                        name: name.to_owned(),
                        port,
                        spare_port,
                        dir,
                        log_path,
                        pid: child.id(),
                        child: Some(child),
                        frozen: false,
                    };
                }
                Err((true, msg)) => last = msg,
                Err((false, msg)) => panic!("{name}: redis-server did not start: {msg}"),
            }
        }
        panic!("{name}: redis-server did not start on 10 pairs of ports: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The second port given to the argument builder (cluster bus, TLS port).
    pub fn spare_port(&self) -> u16 {
        self.spare_port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// False once killed (by the test, or when it exited on its own).
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL and wait: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -STOP`: the process stays, its sockets stay open, nothing answers.
    pub fn freeze(&mut self) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGSTOP);
            self.frozen = true;
        }
    }

    /// `kill -CONT` after [`Node::freeze`].
    pub fn thaw(&mut self) {
        if self.child.is_some() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGCONT);
            self.frozen = false;
        }
    }

    /// Frozen with [`Node::freeze`] and not thawed yet.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// `ROLE`'s first element (`master`, `slave`, `sentinel`), None when it does not answer.
    pub fn role(&self) -> Option<String> {
        resp::call(self.port, &["ROLE"])
            .ok()?
            .items()
            .first()
            .and_then(|r| r.text())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The arguments every data node gets: loopback only, no persistence, its own directory.
pub fn server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        dir.to_str().expect("utf-8 dir"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Spawns redis-server and waits until it answers PING on `port`. `Err((retry, why))`:
/// `retry` when a port was taken.
fn spawn_ready(argv: &[String], log_path: &Path, port: u16) -> Result<Child, (bool, String)> {
    let log = File::create(log_path).expect("node log");
    let mut child = Command::new("redis-server")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .map_err(|e| (false, format!("spawn redis-server: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&fs::read(log_path).unwrap_or_default()).into_owned();
        if let Ok(Some(status)) = child.try_wait() {
            let in_use = text.contains("Address already in use");
            return Err((in_use, format!("exited with {status}; log:\n{text}")));
        }
        let started =
            text.contains("Ready to accept connections") || text.contains("Running mode=sentinel");
        if started && pong(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err((false, format!("no PONG on {port} within 20s; log:\n{text}")));
        }
        std::thread::sleep(POLL);
    }
}

fn pong(port: u16) -> bool {
    matches!(resp::call_timeout(port, &["PING"], Duration::from_secs(1)), Ok(resp::Reply::Status(s)) if s == "PONG")
}

/// Polls the synchronous `cond` until true; panics with `what` (and `detail()`) after
/// `deadline`.
pub fn wait_sync(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let end = Instant::now() + deadline;
    while !cond() {
        if Instant::now() > end {
            panic!(
                "timed out after {deadline:?} waiting for: {what}\n{}",
                detail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a synchronous topology call (start, failover, migration) from an async test
/// without stalling the runtime's other tasks (the test client's connection).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------
// Configs and handlers
// ---------------------------------------------------------------------------------------

/// Short recovery settings for the streams of these tests; `dlq_exit_codes = [3]`.
pub const TOPO_FAST: &str = "block = \"500ms\"\nclaim_interval = \"1s\"\nclaim_idle = \"3s\"\nretry_backoff = \"100ms\"\nretry_backoff_max = \"1s\"\ndlq_exit_codes = [3]";

/// `[redis]` (url plus `redis_extra` lines), `[daemon]` (consumer plus `daemon_extra`
/// lines), then `streams`.
pub fn daemon_config(
    url: &str,
    redis_extra: &str,
    consumer: &str,
    daemon_extra: &str,
    streams: &str,
) -> String {
    format!(
        "[redis]\nurl = {}\n{}\n\n[daemon]\nconsumer = {}\nshutdown_timeout = \"10s\"\n{}\n\n{}\n",
        toml_str(url),
        redis_extra,
        toml_str(consumer),
        daemon_extra,
        streams
    )
}

/// A `[[streams]]` table with [`TOPO_FAST`] and `extra` lines.
pub fn topo_stream(name: &str, group: &str, script: &Path, extra: &str) -> String {
    stream_table(name, group, script, &format!("{TOPO_FAST}\n{extra}"))
}

/// A handler that exits 3 (dead-letter at once) for payloads starting with `poison` and
/// otherwise appends `<stream> <id> <consumer>` to `$D/done` after running `work` (shell, may be
/// empty). Reads its payload with the `read` builtin: no extra process per entry.
pub fn recording_handler(dir: &Path, work: &str) -> (PathBuf, PathBuf) {
    let script = write_script(
        dir,
        "record.sh",
        &format!(
            "IFS= read -r p || :\n\
             case \"$p\" in poison*) exit 3;; esac\n\
             {work}\n\
             echo \"$REDIS_STREAMD_STREAM $REDIS_STREAMD_ID $REDIS_STREAMD_CONSUMER\" >> \"$D/done\""
        ),
    );
    (dir.join("done"), script)
}

/// `(stream, id)` of each record of a done file, in order.
pub fn done_records(path: &Path) -> Vec<(String, String)> {
    read_lines(path)
        .into_iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect()
}

/// How many records of a done file `consumer` wrote.
pub fn done_by(path: &Path, consumer: &str) -> usize {
    read_lines(path)
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some(consumer))
        .count()
}

/// The payload of entry number `i`: every `poison_every`-th one is a poison entry.
pub fn payload(i: usize, poison_every: usize) -> String {
    if poison_every > 0 && i % poison_every == poison_every - 1 {
        format!("poison {i}")
    } else {
        format!("job {i}")
    }
}
