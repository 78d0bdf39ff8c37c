//! Unit-test helpers shared by modules whose tests need a process of their own, or a
//! redis-server. Compiled for tests only (`#[cfg(test)]` in lib.rs): an `expect` here
//! fails a test, never the daemon.
//!
//! Some tests change process-wide state (environment variables, the subreaper flag, the
//! tracing callsite cache) that tests running in parallel threads would disturb. They run
//! alone in a child copy of the test binary instead: the parent test starts it with
//! [`child_test`], the child test body runs only when [`child_marker`] is set.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Set in the environment of a child test process; its value says how it was started.
pub const CHILD_MARKER: &str = "REDIS_STREAMD_TEST_CHILD";

/// The marker's value in this process, if it is a child test process.
pub fn child_marker() -> Option<String> {
    std::env::var(CHILD_MARKER).ok()
}

/// A command running test `name` alone in a child copy of this test binary, with the
/// marker set to `marker`, optionally under `wrapper` (e.g. `["unshare", "--pid", ...]`).
pub fn child_test(name: &str, marker: &str, wrapper: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(exe);
            cmd
        }
        None => Command::new(exe),
    };
    cmd.args([name, "--exact", "--test-threads=1"])
        .env(CHILD_MARKER, marker);
    cmd
}

/// Asserts the child test run passed and did run its test.
pub fn assert_child_passed(name: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child test {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "child test {name} did not run:\n{stdout}"
    );
}

/// A throwaway redis-server on a free loopback port, no persistence, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// A plain server on a free port, ready once it answers PING.
    pub fn start() -> RedisServer {
        for _ in 0..10 {
            let server = RedisServer::start_with(|port| vec!["--port".into(), port.to_string()]);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if pong(server.port) {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("redis-server did not start");
    }

    /// A server whose listening arguments `listen(port)` gives (e.g. TLS only: `--port 0
    /// --tls-port <port> ...`, or cluster mode); ready once something accepts on `port`.
    pub fn start_with(listen: impl Fn(u16) -> Vec<String>) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(listen(port))
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (Debian package redis-server)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}
