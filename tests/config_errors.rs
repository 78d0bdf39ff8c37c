//! Bad configs exit 78 before touching Redis, with file, line and key in the message;
//! `--check`; the Redis URL from the environment; the password never printed.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use tempfile::TempDir;

const PASSWORD: &str = "s3cr3tPassw0rdXYZ";

struct Fixture {
    dir: TempDir,
    handler: PathBuf,
    /// A URL where nothing listens: a daemon that tried to connect would hang retrying.
    dead_url: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = workdir();
        let handler = write_script(dir.path(), "ok.sh", "cat > /dev/null");
        let dead_url = format!("redis://127.0.0.1:{}/0", free_port());
        Fixture {
            dir,
            handler,
            dead_url,
        }
    }

    /// A valid config with two streams.
    fn valid(&self) -> String {
        format!(
            "[redis]\n\
             url = {url}\n\
             \n\
             [daemon]\n\
             consumer = \"tester\"\n\
             shutdown_timeout = \"5s\"\n\
             \n\
             [[streams]]\n\
             name = \"orders\"\n\
             group = \"order-workers\"\n\
             handler = {h}\n\
             max_block_read = 2\n\
             block = \"1s\"\n\
             max_attempts = 3\n\
             retry_backoff = \"100ms\"\n\
             \n\
             [[streams]]\n\
             name = \"payments\"\n\
             group = \"payment-workers\"\n\
             handler = [\"cat\"]\n",
            url = toml_str(&self.dead_url),
            h = handler_of(&self.handler),
        )
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::write(&p, text).unwrap();
        p
    }
}

/// Runs the daemon (no --check) on `text` and asserts exit 78 with path, one of `lines` and
/// one of `keys` in stderr.
fn assert_config_error(fx: &Fixture, name: &str, text: &str, lines: &[usize], keys: &[&str]) {
    let path = fx.write(name, text);
    let out = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    check_config_error(&out, &path, lines, keys, text);
}

fn check_config_error(out: &CliOutput, path: &Path, lines: &[usize], keys: &[&str], text: &str) {
    let ctx = format!("config:\n{text}\n{out}");
    assert_eq!(out.code(), Some(EX_CONFIG), "expected exit 78\n{ctx}");
    let p = path.display().to_string();
    assert!(out.stderr.contains(&p), "stderr does not name {p}\n{ctx}");
    assert!(
        lines
            .iter()
            .any(|l| out.stderr.contains(&format!("{p}:{l}"))
                || out.stderr.contains(&format!("line {l}"))),
        "stderr does not name line {lines:?}\n{ctx}"
    );
    assert!(
        keys.iter().any(|k| out.stderr.contains(k)),
        "stderr does not name key {keys:?}\n{ctx}"
    );
}

#[test]
fn unknown_key_is_an_error() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("max_block_read = 2", "max_block_reed = 2");
    let line = line_of(&text, "max_block_reed");
    assert_config_error(&fx, "typo.toml", &text, &[line], &["max_block_reed"]);
}

#[test]
fn unknown_key_in_daemon_table_is_an_error() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("shutdown_timeout = \"5s\"", "shutdown_timout = \"5s\"");
    let line = line_of(&text, "shutdown_timout");
    assert_config_error(&fx, "typo2.toml", &text, &[line], &["shutdown_timout"]);
}

#[test]
fn max_block_read_zero_is_an_error() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("max_block_read = 2", "max_block_read = 0");
    let line = line_of(&text, "max_block_read = 0");
    assert_config_error(&fx, "mbr0.toml", &text, &[line], &["max_block_read"]);
}

#[test]
fn empty_handler_is_an_error() {
    let fx = Fixture::new();
    let text = fx.valid().replace("handler = [\"cat\"]", "handler = []");
    let line = line_of(&text, "handler = []");
    assert_config_error(&fx, "empty-handler.toml", &text, &[line], &["handler"]);
}

#[test]
fn nonexistent_handler_program_is_an_error() {
    let fx = Fixture::new();
    let text = fx.valid().replace(
        &handler_of(&fx.handler),
        "[\"/nonexistent/dir/handle-order\", \"--verbose\"]",
    );
    let line = line_of(&text, "/nonexistent/dir/handle-order");
    assert_config_error(&fx, "nohandler.toml", &text, &[line], &["handler"]);
}

#[test]
fn handler_not_in_path_is_an_error() {
    let fx = Fixture::new();
    let text = fx.valid().replace(
        "handler = [\"cat\"]",
        "handler = [\"no-such-program-redis-streamd-test\"]",
    );
    let line = line_of(&text, "no-such-program-redis-streamd-test");
    assert_config_error(&fx, "notinpath.toml", &text, &[line], &["handler"]);
}

#[test]
fn non_executable_handler_is_an_error() {
    let fx = Fixture::new();
    let plain = fx.dir.path().join("not-executable.sh");
    fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
    let text = fx
        .valid()
        .replace(&handler_of(&fx.handler), &handler_of(&plain));
    let line = line_of(&text, "not-executable.sh");
    assert_config_error(&fx, "noexec.toml", &text, &[line], &["handler"]);
}

#[test]
fn max_attempts_zero_is_an_error() {
    let fx = Fixture::new();
    let text = fx.valid().replace("max_attempts = 3", "max_attempts = 0");
    let line = line_of(&text, "max_attempts = 0");
    assert_config_error(&fx, "attempts0.toml", &text, &[line], &["max_attempts"]);
}

#[test]
fn duplicate_name_and_group_is_an_error() {
    let fx = Fixture::new();
    let text = format!(
        "{}\n[[streams]]\nname = \"orders\"\ngroup = \"order-workers\"\nhandler = [\"cat\"]\n",
        fx.valid()
    );
    // The second table with the same pair: its header, name or group line.
    let header = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("[[streams]]"))
        .map(|(i, _)| i + 1)
        .nth(2)
        .unwrap();
    let lines = [header, header + 1, header + 2];
    assert_config_error(
        &fx,
        "dup.toml",
        &text,
        &lines,
        &["streams[2]", "name", "group"],
    );
}

#[test]
fn same_stream_with_another_group_is_fine() {
    let fx = Fixture::new();
    let text = format!(
        "{}\n[[streams]]\nname = \"orders\"\ngroup = \"audit\"\nhandler = [\"cat\"]\n",
        fx.valid()
    );
    let path = fx.write("two-groups.toml", &text);
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn bad_duration_is_an_error() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("retry_backoff = \"100ms\"", "retry_backoff = \"soon\"");
    let line = line_of(&text, "retry_backoff = \"soon\"");
    assert_config_error(&fx, "duration.toml", &text, &[line], &["retry_backoff"]);

    let text = fx
        .valid()
        .replace("block = \"1s\"", "block = \"5 parsecs\"");
    let line = line_of(&text, "5 parsecs");
    assert_config_error(&fx, "duration2.toml", &text, &[line], &["block"]);
}

#[test]
fn wrong_type_is_an_error() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("max_block_read = 2", "max_block_read = \"two\"");
    let line = line_of(&text, "max_block_read = \"two\"");
    assert_config_error(&fx, "type.toml", &text, &[line], &["max_block_read"]);
}

#[test]
fn toml_syntax_error_is_an_error() {
    let fx = Fixture::new();
    let text = fx.valid().replace("max_attempts = 3", "max_attempts = = 3");
    let line = line_of(&text, "max_attempts = = 3");
    let path = fx.write("syntax.toml", &text);
    let out = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    assert_eq!(out.code(), Some(EX_CONFIG), "{out}");
    let p = path.display().to_string();
    assert!(out.stderr.contains(&p), "{out}");
    assert!(
        out.stderr.contains(&format!("{p}:{line}")) || out.stderr.contains(&format!("line {line}")),
        "line {line} not named\n{out}"
    );
}

#[test]
fn missing_url_is_an_error_without_env() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace(&format!("url = {}\n", toml_str(&fx.dead_url)), "");
    assert!(!text.contains("url ="));
    let path = fx.write("nourl.toml", &text);
    let out = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    assert_eq!(out.code(), Some(EX_CONFIG), "{out}");
    assert!(out.stderr.contains(&path.display().to_string()), "{out}");
    assert!(out.stderr.contains("url"), "{out}");
}

#[test]
fn missing_config_file_fails() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("does-not-exist.toml");
    let out = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains(&path.display().to_string()), "{out}");
}

#[test]
fn check_accepts_valid_config_and_prints_streams() {
    let fx = Fixture::new();
    let path = fx.write("valid.toml", &fx.valid());
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let all = out.all();
    assert!(all.contains("orders"), "summary lacks stream orders\n{out}");
    assert!(
        all.contains("payments"),
        "summary lacks stream payments\n{out}"
    );

    // -c and REDIS_STREAMD_CONFIG work too.
    let out = run_cli(&[Path::new("-c"), &path, Path::new("--check")], &[], MEDIUM);
    assert_eq!(out.code(), Some(0), "-c\n{out}");
    let out = run_cli(
        &["--check"],
        &[("REDIS_STREAMD_CONFIG", path.to_str().unwrap())],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "REDIS_STREAMD_CONFIG\n{out}");
}

#[test]
fn check_rejects_bad_config() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("max_block_read = 2", "max_block_read = 0");
    let path = fx.write("bad.toml", &text);
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    let line = line_of(&text, "max_block_read = 0");
    check_config_error(&out, &path, &[line], &["max_block_read"], &text);
}

#[test]
fn env_url_replaces_missing_url() {
    let fx = Fixture::new();
    // No [redis] table at all: the URL comes from the environment.
    let text = fx
        .valid()
        .replace(&format!("[redis]\nurl = {}\n", toml_str(&fx.dead_url)), "");
    assert!(!text.contains("[redis]"));
    let path = fx.write("envurl.toml", &text);
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[("REDIS_STREAMD_REDIS_URL", &fx.dead_url)],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");

    // A [redis] table without url works the same.
    let text2 = fx
        .valid()
        .replace(&format!("url = {}\n", toml_str(&fx.dead_url)), "");
    let path2 = fx.write("envurl2.toml", &text2);
    let out = run_cli(
        &[Path::new("--config"), &path2, Path::new("--check")],
        &[("REDIS_STREAMD_REDIS_URL", &fx.dead_url)],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
}

#[test]
fn version_flag() {
    let out = run_cli(&["--version"], &[], MEDIUM);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

/// The password of the Redis URL never appears in `--check` output, config errors, or the
/// log of a daemon that keeps failing to connect.
#[test]
fn password_is_never_printed_offline() {
    let fx = Fixture::new();
    let port = free_port();
    let secret_url = format!("redis://someuser:{PASSWORD}@127.0.0.1:{port}/0");
    let text = fx.valid().replace(&fx.dead_url, &secret_url);
    assert!(text.contains(PASSWORD));
    let path = fx.write("secret.toml", &text);

    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        !out.all().contains(PASSWORD),
        "--check printed the password\n{out}"
    );

    // From the environment.
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[("REDIS_STREAMD_REDIS_URL", &secret_url)],
        MEDIUM,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        !out.all().contains(PASSWORD),
        "--check printed the env password\n{out}"
    );

    // In a config error.
    let bad = text.replace("max_attempts = 3", "max_attempts = 0");
    let bad_path = fx.write("secret-bad.toml", &bad);
    let out = run_cli(&[Path::new("--config"), &bad_path], &[], MEDIUM);
    assert_eq!(out.code(), Some(EX_CONFIG), "{out}");
    assert!(
        !out.all().contains(PASSWORD),
        "config error printed the password\n{out}"
    );

    // A running daemon that cannot connect, debug logging: give it a few seconds of retries.
    let mut d = Daemon::start_with(&text, &["--log-level", "debug"], &[]);
    let end = std::time::Instant::now() + MEDIUM;
    while d.log().is_empty() && std::time::Instant::now() < end && d.is_running() {
        std::thread::sleep(POLL);
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    d.terminate(MEDIUM);
    let log = d.log();
    assert!(
        !log.contains(PASSWORD),
        "daemon log contains the password:\n{log}"
    );
}

/// Against a redis-server with requirepass: the right password works (an entry is handled)
/// and appears nowhere in the log, neither does a wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_is_never_printed_online() {
    let redis = RedisServer::start_with_args(&["--requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port());
    let work = workdir();
    let script = write_script(
        work.path(),
        "touch.sh",
        "cat > /dev/null\ntouch \"$D/ran-$REDIS_STREAMD_ID\"",
    );
    let cfg = config(
        &url,
        &stream_table("auth", "g", &script, "block = \"200ms\"\nstart_id = \"0\""),
    );
    let c = TestClient::connect(&url).await;
    let id = c.xadd("auth", &[("payload", b"x")]).await;
    let mut d = Daemon::start(&cfg);
    let (cr, idr) = (&c, id.as_str());
    d.wait_until(LONG, "entry acked with password auth", || async move {
        cr.all_acked_through("auth", "g", idr).await
    })
    .await;
    d.terminate(MEDIUM);
    assert!(
        !d.log().contains(PASSWORD),
        "daemon log contains the password\n{}",
        d.log_tail()
    );

    // Wrong password: auth errors get logged, the password must not be.
    let wrong = "Wr0ngPassw0rdABC";
    let bad_url = format!("redis://:{wrong}@127.0.0.1:{}/0", redis.port());
    let cfg = config(
        &bad_url,
        &stream_table("auth", "g", &script, "block = \"200ms\"\nstart_id = \"0\""),
    );
    let mut d = Daemon::start(&cfg);
    let end = std::time::Instant::now() + MEDIUM;
    while d.log().is_empty() && std::time::Instant::now() < end && d.is_running() {
        std::thread::sleep(POLL);
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    d.terminate(MEDIUM);
    let log = d.log();
    assert!(
        !log.contains(wrong),
        "daemon log contains the wrong password:\n{log}"
    );
    assert!(!log.contains(PASSWORD));
}

#[test]
fn exits_before_connecting() {
    // A bad config with a URL pointing at a listening socket that never answers: the
    // daemon must exit 78 without waiting on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "redis://127.0.0.1:{}/0",
        listener.local_addr().unwrap().port()
    );
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace(&fx.dead_url, &url)
        .replace("max_block_read = 2", "max_block_read = 0");
    let path = fx.write("blackhole.toml", &text);
    let out = run_cli(&[Path::new("--config"), &path], &[], MEDIUM);
    assert_eq!(out.code(), Some(EX_CONFIG), "{out}");
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "the daemon connected to Redis before validating its config"
    );
}

/// Issue #14, item 3: counts that size processes and memory are bounded. `--check` used to
/// accept 100000000 (over 1.5 GB before the first entry) and 2^63-1 (a panic inside the
/// semaphore); in worker mode each is a process started at once.
#[test]
fn check_rejects_counts_beyond_their_limit() {
    let fx = Fixture::new();
    for (n, name) in [
        ("100000000", "huge.toml"),
        ("9223372036854775807", "max.toml"),
    ] {
        let text = fx
            .valid()
            .replace("max_block_read = 2", &format!("max_block_read = {n}"));
        let path = fx.write(name, &text);
        let out = run_cli(
            &[Path::new("--config"), &path, Path::new("--check")],
            &[],
            MEDIUM,
        );
        let line = line_of(&text, "max_block_read = ");
        check_config_error(&out, &path, &[line], &["streams[0].max_block_read"], &text);
        assert!(out.stderr.contains("at most 10000"), "{out}");
    }
    let text = fx.valid().replace(
        "max_block_read = 2",
        "mode = \"worker\"\nmax_block_read = 5000",
    );
    let path = fx.write("workers.toml", &text);
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    let line = line_of(&text, "max_block_read = 5000");
    check_config_error(&out, &path, &[line], &["streams[0].max_block_read"], &text);
    assert!(out.stderr.contains("at most 1024"), "{out}");
}

/// Issue #14, item 4: a dead-letter stream that the daemon also consumes makes failed
/// entries run again, and with two streams dead-lettering to each other they went round
/// hundreds of times a second. `--check` refuses it, naming the key and both streams.
#[test]
fn check_rejects_a_dlq_that_is_a_consumed_stream() {
    let fx = Fixture::new();
    let text = fx
        .valid()
        .replace("max_attempts = 3", "max_attempts = 3\ndlq = \"payments\"")
        + "dlq = \"orders\"\n";
    let path = fx.write("dlq-cycle.toml", &text);
    let out = run_cli(
        &[Path::new("--config"), &path, Path::new("--check")],
        &[],
        MEDIUM,
    );
    let line = line_of(&text, "dlq = \"payments\"");
    check_config_error(&out, &path, &[line], &["streams[0].dlq"], &text);
    assert!(
        out.stderr.contains("\"orders\"") && out.stderr.contains("\"payments\""),
        "both streams named\n{out}"
    );
}
