//! The configuration file: its schema, defaults and validation.
//!
//! Owns everything between "a path on disk" and a validated [`Config`]. Every error names
//! the file, the line and the key (`streams[1].max_block_read`), because an operator
//! reading a failed unit's log must be able to fix the file without guessing. Nothing here
//! touches Redis: validation is complete before the daemon connects anywhere.
//!
//! This module holds the schema (the validated types), loading and the `--check` summary;
//! the parts live in submodules: [`raw`] (the file as written, for serde), [`validate`]
//! (the rules and defaults; [`streams`] for the `[[streams]]` tables), [`locate`] (key paths and their lines in the file) and
//! [`program`] (finding and checking handler programs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::redis::tls::TlsFiles;

/// Environment variable whose value replaces `[redis] url`, so passwords can stay out of
/// config files.
pub(crate) const REDIS_URL_ENV: &str = "REDIS_STREAMD_REDIS_URL";

/// Environment variable whose value replaces `[daemon] consumer`, so several instances
/// sharing one config file (e.g. a systemd template unit) get distinct consumer names.
pub(crate) const CONSUMER_ENV: &str = "REDIS_STREAMD_CONSUMER";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for log lines and `--check`).
    pub(crate) path: PathBuf,
    pub(crate) redis: RedisConfig,
    pub(crate) daemon: DaemonConfig,
    pub(crate) streams: Vec<StreamConfig>,
}

/// `[redis]`
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `url`, or `REDIS_STREAMD_REDIS_URL` when set. May hold a password: never log it,
    /// use [`RedisConfig::redacted_url`].
    pub url: String,
    /// `connect_timeout`: give up (exit non-zero) when Redis is unreachable this long at
    /// start. `None` (the default) retries forever with backoff.
    pub connect_timeout: Option<Duration>,
    /// `tls_ca_file`, `tls_cert_file`, `tls_key_file` as absolute paths, read and checked
    /// (only set with a TLS URL).
    pub tls: TlsFiles,
}

/// `[daemon]`
#[derive(Debug, Clone)]
pub(crate) struct DaemonConfig {
    /// `consumer`: consumer name used in every group. Default: the host name.
    pub consumer: String,
    /// `shutdown_timeout`: how long SIGTERM waits for running handlers. Default 30s.
    pub shutdown_timeout: Duration,
    /// `metrics_listen`: address of the HTTP listener for `/metrics`, `/healthz` and
    /// `/readyz`. Default: none (off).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `payload` of a `[[streams]]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadMode {
    /// The raw bytes of `payload_field` go to stdin.
    Field,
    /// The whole entry as one JSON object goes to stdin.
    Entry,
}

/// `mode` of a `[[streams]]` table: how entries reach the handler program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandlerMode {
    /// A fresh process per entry attempt (the default).
    Exec,
    /// `max_block_read` long-lived processes fed entries over a pipe (see `worker`).
    Worker,
}

/// One `[[streams]]` table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamConfig {
    pub name: String,
    pub group: String,
    /// argv; `handler[0]` is the program, executed directly (no shell).
    pub handler: Vec<String>,
    /// Default `Exec`.
    pub mode: HandlerMode,
    /// At most this many handler processes of this stream run at once. >= 1.
    pub max_block_read: usize,
    /// Worker mode: most entries one worker holds at once, the one it is handling
    /// included (the rest are written to its stdin ahead). >= 1; 1 in exec mode.
    pub worker_prefetch: usize,
    /// XREADGROUP BLOCK. Default 5s.
    pub block: Duration,
    /// Where a newly created group starts: "$" (default) or "0".
    pub start_id: String,
    /// Default `Field`.
    pub payload: PayloadMode,
    /// Default "payload".
    pub payload_field: String,
    /// Default 30s; then SIGTERM to the handler's process group, SIGKILL 5s later.
    pub handler_timeout: Duration,
    /// Attempts in all before the DLQ. >= 1. Default 3.
    pub max_attempts: u64,
    /// Delay before attempt 2, doubling each attempt. Default 1s.
    pub retry_backoff: Duration,
    /// Cap on the retry delay. Default 60s.
    pub retry_backoff_max: Duration,
    /// Dead-letter stream. Default "<name>:dlq".
    pub dlq: String,
    /// Exit codes that go straight to the DLQ. Default empty.
    pub dlq_exit_codes: Vec<i32>,
    /// Extra environment for the handler. Default empty.
    pub env: BTreeMap<String, String>,
    /// How often the loop runs XAUTOCLAIM for entries of dead consumers. Default 30s.
    pub claim_interval: Duration,
    /// Entries idle longer than this are taken over from other consumers. Default 60s.
    pub claim_idle: Duration,
    /// Consumers idle this long with no pending entries are removed. Default 1h.
    pub reap_idle: Duration,
    /// `order_by` / `order_by_json`, `order_scope`, `order_waiting_max`: per-key order.
    /// `None`: entries run in any order.
    pub order: Option<OrderConfig>,
}

#[cfg(test)]
impl RedisConfig {
    /// `url` with a 10 s connect timeout, for unit tests.
    pub(crate) fn for_tests(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.to_owned(),
            connect_timeout: Some(Duration::from_secs(10)),
            tls: TlsFiles::default(),
        }
    }
}

#[cfg(test)]
impl StreamConfig {
    /// A stream `s` of group `g` running `handler` with the documented defaults, for unit
    /// tests (struct update syntax changes the rest).
    pub(crate) fn for_tests(handler: &[&str]) -> StreamConfig {
        StreamConfig {
            name: "s".into(),
            group: "g".into(),
            handler: handler.iter().map(|a| a.to_string()).collect(),
            mode: HandlerMode::Exec,
            max_block_read: 10,
            worker_prefetch: 1,
            block: Duration::from_secs(5),
            start_id: "$".into(),
            payload: PayloadMode::Field,
            payload_field: "payload".into(),
            handler_timeout: Duration::from_secs(30),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            dlq: "s:dlq".into(),
            dlq_exit_codes: Vec::new(),
            env: BTreeMap::new(),
            claim_interval: Duration::from_secs(30),
            claim_idle: Duration::from_secs(60),
            reap_idle: Duration::from_secs(3600),
            order: None,
        }
    }
}

/// Per-key ordering of one stream (`order_by` or `order_by_json`).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderConfig {
    pub key: OrderKey,
    pub scope: OrderScope,
    /// `order_waiting_max`: entries that may wait behind busy keys in this daemon.
    pub waiting_max: usize,
}

/// Where an entry's ordering key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderKey {
    /// `order_by`: the value of this field.
    Field(String),
    /// `order_by_json`: this JSON Pointer (RFC 6901) in the payload field's value.
    JsonPointer(String),
}

/// `order_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderScope {
    /// In order within this daemon (the default).
    Consumer,
    /// In order across every consumer of the group.
    Group,
}

/// A configuration that cannot be used. `Display` is the whole operator-facing message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys, wrong types, and failed validation rules alike.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key (or of the table when the key is missing).
        line: usize,
        /// Dotted key path, e.g. `streams[1].max_block_read` or `redis.url`.
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`. Everything it takes from the process rather
    /// than the file comes in `overrides` (see [`Overrides::from_process`]).
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // toml_edit keeps the span of every key, which serde's result does not; it is the
        // map from a key path back to a line for every error found after deserializing.
        let doc = toml_edit::Document::parse(text.as_str())
            .map_err(|err| syntax_error(path, &text, &err))?;
        let ctx = Ctx {
            loc: Locator {
                file: path,
                text: &text,
                doc: &doc,
            },
            env: overrides,
        };
        let raw: RawConfig = toml::from_str(&text).map_err(|err| ctx.loc.serde_error(&err))?;
        ctx.validate(raw)
    }

    /// A short human summary of the streams, printed by `--check`.
    pub fn summary(&self) -> String {
        let count = match self.streams.len() {
            1 => "1 stream".to_string(),
            n => format!("{n} streams"),
        };
        let mut out = format!(
            "config OK: {} ({count}, consumer {:?}, redis {})",
            self.path.display(),
            self.daemon.consumer,
            self.redis.redacted_url()
        );
        for s in &self.streams {
            out.push_str(&format!(
                "\n  {}  group={}  max_block_read={}  handler={}  dlq={}  max_attempts={}",
                s.name,
                s.group,
                s.max_block_read,
                display_argv(&s.handler),
                s.dlq,
                s.max_attempts
            ));
            if s.mode == HandlerMode::Worker {
                out.push_str(&format!(
                    "  mode=worker  worker_prefetch={}",
                    s.worker_prefetch
                ));
            }
        }
        out
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`, safe for logs.
    pub fn redacted_url(&self) -> String {
        crate::redis::url::redact(&self.url)
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

mod locate;
mod program;
mod raw;
mod redis_section;
mod streams;
mod validate;

use locate::{Locator, syntax_error};
use raw::RawConfig;
use validate::Ctx;

/// What loading takes from the process rather than the file. [`Overrides::from_process`]
/// is the one place that reads them; tests build the struct by hand.
#[derive(Clone, Default)]
pub struct Overrides {
    /// [`REDIS_URL_ENV`]: wins over `[redis] url`.
    pub redis_url: Option<String>,
    /// [`CONSUMER_ENV`]: wins over `[daemon] consumer`.
    pub consumer: Option<String>,
    /// `PATH`, searched for handler programs without a '/' (execvp's default when `None`).
    pub path: Option<std::ffi::OsString>,
    /// The host name, the default consumer name; `None` when it cannot be determined.
    pub hostname: Option<String>,
}

impl Overrides {
    /// Reads every override from this process's environment and the host name.
    pub fn from_process() -> Overrides {
        Overrides {
            redis_url: std::env::var(REDIS_URL_ENV).ok(),
            consumer: std::env::var(CONSUMER_ENV).ok(),
            path: std::env::var_os("PATH"),
            hostname: nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned()),
        }
    }
}

/// The URL may hold a password: shown redacted, as everywhere else.
impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(crate::redis::url::redact),
            )
            .field("consumer", &self.consumer)
            .field("path", &self.path)
            .field("hostname", &self.hostname)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Display.

/// argv for display: arguments that would be ambiguous when joined are quoted.
fn display_argv(argv: &[String]) -> String {
    let word = |a: &String| {
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            format!("{a:?}")
        } else {
            a.clone()
        }
    };
    argv.iter().map(word).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
pub(super) mod tests {
    //! Tests of loading and display, and the helpers every test of the config uses.
    use super::*;

    /// Lines 1-7; a key appended with [`with`] lands on [`EXTRA`].
    pub(super) const MINIMAL: &str = r#"[redis]
url = "redis://127.0.0.1:6379/0"

[[streams]]
name = "orders"
group = "workers"
handler = ["sh", "-c", "cat"]
"#;
    pub(super) const EXTRA: usize = 8;

    pub(super) fn overrides() -> Overrides {
        Overrides {
            redis_url: None,
            consumer: None,
            path: Some("/usr/bin:/bin".into()),
            hostname: Some("testhost".to_string()),
        }
    }

    pub(super) fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    pub(super) fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("streamd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub(super) fn load_text_env(text: &str, env_url: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let overrides = Overrides {
            redis_url: env_url.map(String::from),
            ..overrides()
        };
        Config::load(&write(&dir, text), &overrides)
    }

    pub(super) fn load_text(text: &str) -> Result<Config, ConfigError> {
        load_text_env(text, None)
    }

    pub(super) fn ok(text: &str) -> Config {
        load_text(text).unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
    }

    /// (line, key, message) of the error `text` must produce.
    pub(super) fn invalid(text: &str) -> (usize, String, String) {
        invalid_from(load_text(text))
    }

    pub(super) fn invalid_from(result: Result<Config, ConfigError>) -> (usize, String, String) {
        match result {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            Err(other) => panic!("expected Invalid, got {other}"),
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    /// Asserts the error's line and key, and that its message contains `needle`.
    pub(super) fn assert_invalid(text: &str, line: usize, key: &str, needle: &str) {
        let (got_line, got_key, message) = invalid(text);
        assert_eq!(
            (got_line, got_key.as_str()),
            (line, key),
            "message: {message}\n---\n{text}"
        );
        assert!(
            message.contains(needle),
            "{message:?} should contain {needle:?}"
        );
    }

    #[test]
    fn overrides_from_process_default_consumer_to_the_host_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = MINIMAL.replace("\"sh\"", "\"/bin/sh\"");
        let c = Config::load(&write(&dir, &text), &Overrides::from_process()).expect("valid");
        let hostname = nix::unistd::gethostname().expect("hostname");
        assert_eq!(c.daemon.consumer, hostname.to_string_lossy());
    }

    #[test]
    fn error_display_is_file_line_key_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, &with("max_block_read = 0\n"));
        let err = Config::load(&path, &overrides()).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            format!(
                "{}:{EXTRA}: streams[0].max_block_read: must be at least 1 (got 0)",
                path.display()
            )
        );
    }

    #[test]
    fn unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.toml");
        let err = Config::load(&path, &overrides()).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn overrides_debug_hides_the_password() {
        let o = Overrides {
            redis_url: Some("redis://u:hunter2@h:6379".into()),
            ..overrides()
        };
        let debug = format!("{o:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("u:***@h"),
            "{debug}"
        );
    }

    #[test]
    fn redacted_url_hides_the_password() {
        let redact = |url: &str| {
            RedisConfig {
                url: url.to_string(),
                connect_timeout: None,
                tls: TlsFiles::default(),
            }
            .redacted_url()
        };
        assert_eq!(
            redact("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        // The URL forms and odd inputs are redis::url's tests; here: it is used, and Debug
        // never shows the password either.
        let debug = format!(
            "{:?}",
            ok(&MINIMAL.replace("redis://", "redis://:hunter2@"))
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn summary_lines() {
        let text = MINIMAL.replace("redis://127.0.0.1", "redis://:hunter2@127.0.0.1")
            + "\n[[streams]]\nname = \"mail\"\ngroup = \"g\"\nhandler = [\"/bin/sh\"]\nmax_block_read = 2\n\n[daemon]\nconsumer = \"worker-a\"\n";
        let c = ok(&text);
        let summary = c.summary();
        let lines: Vec<&str> = summary.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "config OK: {} (2 streams, consumer \"worker-a\", redis redis://:***@127.0.0.1:6379/0)",
                c.path.display()
            )
        );
        assert_eq!(
            lines[1],
            "  orders  group=workers  max_block_read=10  handler=sh -c cat  dlq=orders:dlq  max_attempts=3"
        );
        assert_eq!(
            lines[2],
            "  mail  group=g  max_block_read=2  handler=/bin/sh  dlq=mail:dlq  max_attempts=3"
        );
        assert_eq!(lines.len(), 3);
        assert!(!summary.contains("hunter2"));
    }
}
