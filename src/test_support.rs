//! Unit-test helpers shared by modules whose tests need a process of their own.
//!
//! Some tests change process-wide state (environment variables, the subreaper flag, the
//! tracing callsite cache) that tests running in parallel threads would disturb. They run
//! alone in a child copy of the test binary instead: the parent test starts it with
//! [`child_test`], the child test body runs only when [`child_marker`] is set.

use std::process::{Command, Output};

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
