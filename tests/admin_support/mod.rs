//! Helpers for tests/admin.rs: a Redis and a config per test, dead-letter entries shaped
//! exactly like the daemon's (`stream::dlq::dlq_fields`: original fields, then the eight
//! `dlq_*` fields in the daemon's order), and the operator commands run as the real binary.
#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::*;

/// A redis-server, a work dir with a handler script and a config naming `streams`.
pub struct Setup {
    pub redis: RedisServer,
    pub work: TempDir,
    pub config: PathBuf,
    pub c: TestClient,
}

impl Setup {
    /// One `[[streams]]` table per (name, group, extra lines); the handler exits 0.
    pub async fn new(streams: &[(&str, &str, &str)]) -> Setup {
        let redis = RedisServer::start();
        let work = workdir();
        let script = write_script(work.path(), "ok.sh", "cat > /dev/null");
        let tables: Vec<String> = streams
            .iter()
            .map(|(name, group, extra)| stream_table(name, group, &script, extra))
            .collect();
        let config = work.path().join("streamd.toml");
        fs::write(&config, common_config(&redis.url(), &tables.join("\n"))).expect("write config");
        let c = TestClient::connect(&redis.url()).await;
        Setup {
            redis,
            work,
            config,
            c,
        }
    }

    /// `redis-streamd <args> --config FILE` (the flag after the subcommand, as operators
    /// type it), 80 columns, no colour, no terminal.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--config".into());
        all.push(self.config.display().to_string());
        run_cli(&all, &[("COLUMNS", "80")], MEDIUM)
    }

    /// Starts `redis-streamd <args> --config FILE` in the background.
    pub fn spawn(&self, args: &[&str]) -> Cli {
        Cli::spawn(args, &self.config)
    }

    /// Adds a daemon-shaped DLQ entry to `dlq`; returns its id.
    pub async fn add_dead(&self, dlq: &str, d: &Dead) -> String {
        let mut fields = d.fields.clone();
        let meta: [(&str, Vec<u8>); 8] = [
            ("dlq_source_stream", d.source.clone().into_bytes()),
            ("dlq_source_id", d.source_id.clone().into_bytes()),
            ("dlq_group", b"g".to_vec()),
            ("dlq_consumer", CONSUMER.as_bytes().to_vec()),
            ("dlq_attempts", d.attempts.to_string().into_bytes()),
            ("dlq_reason", d.reason.clone().into_bytes()),
            ("dlq_stderr", d.stderr.clone()),
            ("dlq_failed_at", d.failed_at.to_string().into_bytes()),
        ];
        fields.extend(meta.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)));
        self.c.xadd_raw(dlq, &fields).await
    }

    /// The entries of `<dlq>:audit`, each as (field name, text) pairs.
    pub async fn audit(&self, dlq: &str) -> Vec<Entry> {
        self.c.xrange_all(&format!("{dlq}:audit")).await
    }
}

fn common_config(url: &str, streams: &str) -> String {
    config(url, streams)
}

/// A dead-lettered entry to add with [`Setup::add_dead`].
#[derive(Debug, Clone)]
pub struct Dead {
    pub source: String,
    pub source_id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub reason: String,
    pub attempts: u64,
    pub stderr: Vec<u8>,
    pub failed_at: u64,
}

/// Entry `n` of `source`: fields `payload = {"n":N}` and `n = N`, failed `ago_ms` ago.
pub fn dead(source: &str, n: u64, reason: &str, ago_ms: u64) -> Dead {
    Dead {
        source: source.to_owned(),
        source_id: format!("{}-{n}", 1_700_000_000_000u64),
        fields: vec![
            (b"payload".to_vec(), format!("{{\"n\":{n}}}").into_bytes()),
            (b"n".to_vec(), n.to_string().into_bytes()),
        ],
        reason: reason.to_owned(),
        attempts: 3,
        stderr: format!("Traceback (most recent call last):\nValueError: bad entry {n}\n")
            .into_bytes(),
        failed_at: now_ms() - ago_ms,
    }
}

impl Dead {
    pub fn with_field(mut self, name: &str, value: &[u8]) -> Dead {
        self.fields.push((name.as_bytes().to_vec(), value.to_vec()));
        self
    }
}

/// stdout parsed as JSON lines.
pub fn json_lines(out: &CliOutput) -> Vec<serde_json::Value> {
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{out}")))
        .collect()
}

/// The `id` of every JSON line.
pub fn ids_of(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Asserts the exit code, printing the whole output otherwise.
#[track_caller]
pub fn assert_code(out: &CliOutput, code: i32) {
    assert_eq!(out.code(), Some(code), "{out}");
}

/// An operator command running in the background, output in files.
pub struct Cli {
    child: Child,
    dir: TempDir,
    started: Instant,
}

impl Cli {
    fn spawn(args: &[&str], config: &Path) -> Cli {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(DAEMON_BIN);
        cmd.args(args).arg("--config").arg(config);
        for var in [
            "REDIS_STREAMD_REDIS_URL",
            "REDIS_STREAMD_CONFIG",
            "REDIS_STREAMD_LOG_LEVEL",
            "REDIS_STREAMD_LOG_FORMAT",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("stdout")).expect("stdout file"))
            .stderr(File::create(dir.path().join("stderr")).expect("stderr file"));
        let child = cmd.spawn().expect("spawn redis-streamd");
        Cli {
            child,
            dir,
            started: Instant::now(),
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("stdout")).unwrap_or_default())
            .into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("stderr")).unwrap_or_default())
            .into_owned()
    }

    /// Waits for the exit; returns the exit code and how long it ran.
    pub fn wait(&mut self, deadline: Duration) -> (Option<i32>, Duration) {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code(), self.started.elapsed());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "operator command still running after {deadline:?}\n---- stdout ----\n{}\n---- stderr ----\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
