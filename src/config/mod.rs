//! The configuration file: its schema, defaults and validation.
//!
//! Owns everything between "a path on disk" and a validated [`Config`]. Every error names
//! the file, the line and the key (`streams[1].max_block_read`), because an operator
//! reading a failed unit's log must be able to fix the file without guessing. Nothing here
//! touches Redis: validation is complete before the daemon connects anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest duration any key accepts.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Environment variable whose value replaces `[redis] url`, so passwords can stay out of
/// config files.
pub const REDIS_URL_ENV: &str = "REDIS_STREAMD_REDIS_URL";

/// Environment variable whose value replaces `[daemon] consumer`, so several instances
/// sharing one config file (e.g. a systemd template unit) get distinct consumer names.
pub const CONSUMER_ENV: &str = "REDIS_STREAMD_CONSUMER";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for log lines and `--check`).
    pub path: PathBuf,
    pub redis: RedisConfig,
    pub daemon: DaemonConfig,
    pub streams: Vec<StreamConfig>,
}

/// `[redis]`
#[derive(Clone)]
pub struct RedisConfig {
    /// `url`, or `REDIS_STREAMD_REDIS_URL` when set. May hold a password: never log it,
    /// use [`RedisConfig::redacted_url`].
    pub url: String,
    /// `connect_timeout`: give up (exit non-zero) when Redis is unreachable this long at
    /// start. `None` (the default) retries forever with backoff.
    pub connect_timeout: Option<Duration>,
}

/// `[daemon]`
#[derive(Debug, Clone)]
pub struct DaemonConfig {
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
pub enum PayloadMode {
    /// The raw bytes of `payload_field` go to stdin.
    Field,
    /// The whole entry as one JSON object goes to stdin.
    Entry,
}

/// `mode` of a `[[streams]]` table: how entries reach the handler program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerMode {
    /// A fresh process per entry attempt (the default).
    Exec,
    /// `max_block_read` long-lived processes fed entries over a pipe (see `worker`).
    Worker,
}

/// One `[[streams]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
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
    /// Reads, parses and validates `path`. `env_url` is the value of
    /// [`REDIS_URL_ENV`] if set; it wins over `[redis] url`.
    pub fn load(path: &Path, env_url: Option<String>) -> Result<Config, ConfigError> {
        let host = Host {
            path_var: std::env::var_os("PATH"),
            hostname: system_hostname,
            consumer_env: std::env::var(CONSUMER_ENV).ok(),
        };
        load_with(path, env_url, &host)
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
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Defaults (documented on the fields of `StreamConfig` / `DaemonConfig`).

const DEFAULT_MAX_BLOCK_READ: u64 = 10;
/// Reached only by workers that answer in well under a millisecond (the depth follows
/// their speed, see `worker`); measured on 2 cores, 16 gives ~0.8 and 32 ~0.9 of the
/// Redis ceiling with a trivial worker.
const DEFAULT_WORKER_PREFETCH: u64 = 32;
/// More would only hold entries back from other consumers: at this depth a worker already
/// never waits for the daemon.
const MAX_WORKER_PREFETCH: usize = 1000;
const DEFAULT_BLOCK: Duration = Duration::from_secs(5);
const DEFAULT_START_ID: &str = "$";
const DEFAULT_PAYLOAD_FIELD: &str = "payload";
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_ATTEMPTS: u64 = 3;
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(60);
const DEFAULT_CLAIM_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(60);
const DEFAULT_REAP_IDLE: Duration = Duration::from_secs(3600);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Running handlers refresh their entries every `claim_idle / 3`; below this the refresh
/// would come more often than once a second.
const MIN_CLAIM_IDLE: Duration = Duration::from_secs(3);

/// Environment variables with this prefix are set by the daemon for every handler run.
const RESERVED_ENV_PREFIX: &str = "REDIS_STREAMD_";

/// What execvp(3) searches when `PATH` is unset, so `--check` agrees with the spawn.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

// ---------------------------------------------------------------------------------------
// The file as written: every key optional, so that a missing key is reported by
// validation with a line number instead of by serde without one. The `expecting` texts
// appear in type errors ("expected a [[streams]] table"), so they use the operator's words.

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a config file")]
struct RawConfig {
    redis: Option<RawRedis>,
    daemon: Option<RawDaemon>,
    streams: Option<Vec<RawStream>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [redis] table")]
struct RawRedis {
    url: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [daemon] table")]
struct RawDaemon {
    consumer: Option<String>,
    shutdown_timeout: Option<String>,
    metrics_listen: Option<String>,
}

/// Integers are read as `i64` so that 0 and negative values get our own message.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[streams]] table")]
struct RawStream {
    name: Option<String>,
    group: Option<String>,
    handler: Option<Vec<String>>,
    mode: Option<String>,
    max_block_read: Option<i64>,
    worker_prefetch: Option<i64>,
    block: Option<String>,
    start_id: Option<String>,
    payload: Option<String>,
    payload_field: Option<String>,
    handler_timeout: Option<String>,
    max_attempts: Option<i64>,
    retry_backoff: Option<String>,
    retry_backoff_max: Option<String>,
    dlq: Option<String>,
    dlq_exit_codes: Option<Vec<i64>>,
    env: Option<BTreeMap<String, String>>,
    claim_interval: Option<String>,
    claim_idle: Option<String>,
    reap_idle: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Loading.

/// What loading takes from the process rather than the file, passed in so tests control it.
struct Host {
    /// `PATH`, searched for handler programs without a '/'.
    path_var: Option<std::ffi::OsString>,
    /// The default consumer name; `None` when it cannot be determined.
    hostname: fn() -> Option<String>,
    /// [`CONSUMER_ENV`], which wins over `[daemon] consumer`.
    consumer_env: Option<String>,
}

fn system_hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
}

fn load_with(path: &Path, env_url: Option<String>, host: &Host) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // toml_edit keeps the span of every key, which serde's result does not; it is the map
    // from a key path back to a line for every error found after deserializing.
    let doc =
        toml_edit::Document::parse(text.as_str()).map_err(|err| syntax_error(path, &text, &err))?;
    let ctx = Ctx {
        file: path,
        text: &text,
        doc: &doc,
        host,
    };
    let raw: RawConfig = toml::from_str(&text).map_err(|err| ctx.serde_error(&err))?;
    ctx.validate(raw, env_url)
}

fn syntax_error(file: &Path, text: &str, err: &toml_edit::TomlError) -> ConfigError {
    ConfigError::Invalid {
        path: file.to_path_buf(),
        line: err.span().map_or(1, |s| line_at(text, s.start)),
        // A document that does not parse has no key paths to name.
        key: "(syntax)".to_string(),
        message: format!("invalid TOML: {}", err.message().trim()),
    }
}

/// 1-based line of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Everything validation needs to turn a key path into a located error.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    doc: &'a toml_edit::Document<&'a str>,
    host: &'a Host,
}

impl Ctx<'_> {
    fn root(&self) -> Node<'_> {
        Node::from_item(self.doc.as_item())
    }

    /// An error at `key`, or at the nearest enclosing table that exists when the key itself
    /// is missing (so a missing key points at its `[[streams]]` header).
    fn invalid(&self, key: &KeyPath, message: impl Into<String>) -> ConfigError {
        let line = span_of(self.root(), &key.0).map_or(1, |s| line_at(self.text, s.start));
        ConfigError::Invalid {
            path: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Unknown keys and wrong types: serde gives a span, the document gives the key there.
    fn serde_error(&self, err: &toml::de::Error) -> ConfigError {
        let offset = err.span().map(|s| s.start);
        let key = offset
            .and_then(|o| path_at(self.root(), o))
            .map_or_else(|| "(document)".to_string(), |p| KeyPath(p).to_string());
        ConfigError::Invalid {
            path: self.file.to_path_buf(),
            line: offset.map_or(1, |o| line_at(self.text, o)),
            key,
            message: err.message().trim().to_string(),
        }
    }

    fn config_dir(&self) -> &Path {
        // `Path::parent` of a bare file name is "", which means the current directory.
        self.file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    fn validate(&self, raw: RawConfig, env_url: Option<String>) -> Result<Config, ConfigError> {
        Ok(Config {
            path: self.file.to_path_buf(),
            redis: self.redis(raw.redis.unwrap_or_default(), env_url)?,
            daemon: self.daemon(raw.daemon.unwrap_or_default())?,
            streams: self.streams(raw.streams.unwrap_or_default())?,
        })
    }

    fn redis(&self, raw: RawRedis, env_url: Option<String>) -> Result<RedisConfig, ConfigError> {
        let key = KeyPath::new("redis").key("url");
        let from_env = env_url.is_some();
        let url = env_url
            .or(raw.url)
            .ok_or_else(|| self.invalid(&key, format!("is required (or set {REDIS_URL_ENV})")))?;
        check_url(&url).map_err(|why| {
            // The file may be fine; say where the bad value really came from.
            let why = if from_env {
                format!("{REDIS_URL_ENV}: {why}")
            } else {
                why
            };
            self.invalid(&key, why)
        })?;
        let timeout_key = KeyPath::new("redis").key("connect_timeout");
        let connect_timeout = raw
            .connect_timeout
            .map(|t| self.parse_duration(&timeout_key, &t))
            .transpose()?;
        Ok(RedisConfig {
            url,
            connect_timeout,
        })
    }

    fn daemon(&self, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
        let key = KeyPath::new("daemon");
        let consumer = match (self.host.consumer_env.clone(), raw.consumer) {
            (Some(c), _) if c.is_empty() => {
                return Err(self.invalid(
                    &key.key("consumer"),
                    format!("{CONSUMER_ENV} is set but empty"),
                ));
            }
            (Some(c), _) => c,
            (None, Some(c)) => self.non_empty(&key.key("consumer"), c)?,
            (None, None) => self.default_consumer(&key.key("consumer"))?,
        };
        Ok(DaemonConfig {
            consumer,
            shutdown_timeout: self.duration(
                &key.key("shutdown_timeout"),
                raw.shutdown_timeout,
                DEFAULT_SHUTDOWN_TIMEOUT,
            )?,
            metrics_listen: match raw.metrics_listen {
                None => None,
                Some(text) => Some(text.parse().map_err(|_| {
                    self.invalid(
                        &key.key("metrics_listen"),
                        format!(
                            "must be an IP address and port like \"127.0.0.1:9187\", got {text:?}"
                        ),
                    )
                })?),
            },
        })
    }

    fn default_consumer(&self, key: &KeyPath) -> Result<String, ConfigError> {
        (self.host.hostname)()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                self.invalid(
                    key,
                    "not set and the host name cannot be determined: set [daemon] consumer",
                )
            })
    }

    fn streams(&self, raws: Vec<RawStream>) -> Result<Vec<StreamConfig>, ConfigError> {
        if raws.is_empty() {
            return Err(self.invalid(
                &KeyPath::new("streams"),
                "no [[streams]] table: at least one stream is required",
            ));
        }
        let streams = raws
            .into_iter()
            .enumerate()
            .map(|(i, raw)| self.stream(i, raw))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_unique(&streams)?;
        Ok(streams)
    }

    /// Two loops on one (stream, group) would read as the same consumer and race each other.
    fn check_unique(&self, streams: &[StreamConfig]) -> Result<(), ConfigError> {
        for (j, s) in streams.iter().enumerate() {
            let first = streams[..j]
                .iter()
                .position(|f| f.name == s.name && f.group == s.group);
            if let Some(i) = first {
                return Err(self.invalid(
                    &stream_key(j, "name"),
                    format!(
                        "stream {:?} with group {:?} is already configured in streams[{i}]",
                        s.name, s.group
                    ),
                ));
            }
        }
        Ok(())
    }

    fn stream(&self, i: usize, raw: RawStream) -> Result<StreamConfig, ConfigError> {
        let key = |k: &str| stream_key(i, k);
        let name = self.required(&key("name"), raw.name)?;
        let dlq = self.dlq(&key("dlq"), raw.dlq, &name)?;
        let has_backoff_max = raw.retry_backoff_max.is_some();
        let mode = self.mode(&key("mode"), raw.mode)?;
        let retry_backoff = self.duration(
            &key("retry_backoff"),
            raw.retry_backoff,
            DEFAULT_RETRY_BACKOFF,
        )?;
        let retry_backoff_max = self.duration(
            &key("retry_backoff_max"),
            raw.retry_backoff_max,
            DEFAULT_RETRY_BACKOFF_MAX,
        )?;
        if retry_backoff_max < retry_backoff {
            // Blame the key the operator wrote; the other one is a default.
            let blamed = if has_backoff_max {
                key("retry_backoff_max")
            } else {
                key("retry_backoff")
            };
            return Err(self.invalid(
                &blamed,
                format!(
                    "retry_backoff_max ({}) is shorter than retry_backoff ({})",
                    humantime::format_duration(retry_backoff_max),
                    humantime::format_duration(retry_backoff)
                ),
            ));
        }
        Ok(StreamConfig {
            group: self.required(&key("group"), raw.group)?,
            handler: self.handler(&key("handler"), raw.handler)?,
            mode,
            max_block_read: self.max_block_read(&key("max_block_read"), raw.max_block_read)?,
            worker_prefetch: self.worker_prefetch(
                &key("worker_prefetch"),
                raw.worker_prefetch,
                mode,
            )?,
            block: self.positive_duration(&key("block"), raw.block, DEFAULT_BLOCK)?,
            start_id: self.start_id(&key("start_id"), raw.start_id)?,
            payload: self.payload(&key("payload"), raw.payload)?,
            payload_field: self.non_empty_or(
                &key("payload_field"),
                raw.payload_field,
                DEFAULT_PAYLOAD_FIELD,
            )?,
            handler_timeout: self.positive_duration(
                &key("handler_timeout"),
                raw.handler_timeout,
                DEFAULT_HANDLER_TIMEOUT,
            )?,
            max_attempts: self.at_least_one(
                &key("max_attempts"),
                raw.max_attempts,
                DEFAULT_MAX_ATTEMPTS,
            )?,
            retry_backoff,
            retry_backoff_max,
            dlq,
            dlq_exit_codes: self.exit_codes(&key("dlq_exit_codes"), raw.dlq_exit_codes)?,
            env: self.env(&key("env"), raw.env)?,
            claim_interval: self.positive_duration(
                &key("claim_interval"),
                raw.claim_interval,
                DEFAULT_CLAIM_INTERVAL,
            )?,
            claim_idle: self.claim_idle(&key("claim_idle"), raw.claim_idle)?,
            reap_idle: self.duration(&key("reap_idle"), raw.reap_idle, DEFAULT_REAP_IDLE)?,
            name,
        })
    }

    fn required(&self, key: &KeyPath, value: Option<String>) -> Result<String, ConfigError> {
        let value = value.ok_or_else(|| self.invalid(key, "is required"))?;
        self.non_empty(key, value)
    }

    fn non_empty(&self, key: &KeyPath, value: String) -> Result<String, ConfigError> {
        if value.is_empty() {
            Err(self.invalid(key, "must not be empty"))
        } else {
            Ok(value)
        }
    }

    fn non_empty_or(
        &self,
        key: &KeyPath,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        value.map_or_else(|| Ok(default.to_string()), |v| self.non_empty(key, v))
    }

    fn dlq(&self, key: &KeyPath, value: Option<String>, name: &str) -> Result<String, ConfigError> {
        let dlq = self.non_empty_or(key, value, &format!("{name}:dlq"))?;
        if dlq == name {
            return Err(self.invalid(
                key,
                format!("must differ from the stream name {name:?}: failed entries would be read again forever"),
            ));
        }
        Ok(dlq)
    }

    fn at_least_one(
        &self,
        key: &KeyPath,
        value: Option<i64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let Some(n) = value else {
            return Ok(default);
        };
        u64::try_from(n)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| self.invalid(key, format!("must be at least 1 (got {n})")))
    }

    fn max_block_read(&self, key: &KeyPath, value: Option<i64>) -> Result<usize, ConfigError> {
        let n = self.at_least_one(key, value, DEFAULT_MAX_BLOCK_READ)?;
        usize::try_from(n).map_err(|_| self.invalid(key, format!("{n} is too large")))
    }

    fn worker_prefetch(
        &self,
        key: &KeyPath,
        value: Option<i64>,
        mode: HandlerMode,
    ) -> Result<usize, ConfigError> {
        if mode == HandlerMode::Exec {
            return match value {
                None => Ok(1),
                Some(_) => Err(self.invalid(key, "applies only to mode = \"worker\"".to_owned())),
            };
        }
        let n = self.at_least_one(key, value, DEFAULT_WORKER_PREFETCH)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_WORKER_PREFETCH)
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!("must be at most {MAX_WORKER_PREFETCH} (got {n})"),
                )
            })
    }

    fn start_id(&self, key: &KeyPath, value: Option<String>) -> Result<String, ConfigError> {
        match value.as_deref() {
            None => Ok(DEFAULT_START_ID.to_string()),
            Some(id @ ("$" | "0")) => Ok(id.to_string()),
            Some(other) => Err(self.invalid(
                key,
                format!(
                    "must be \"$\" (only new entries) or \"0\" (the whole stream), got {other:?}"
                ),
            )),
        }
    }

    fn mode(&self, key: &KeyPath, value: Option<String>) -> Result<HandlerMode, ConfigError> {
        match value.as_deref() {
            None | Some("exec") => Ok(HandlerMode::Exec),
            Some("worker") => Ok(HandlerMode::Worker),
            Some(other) => Err(self.invalid(
                key,
                format!("must be \"exec\" or \"worker\", got {other:?}"),
            )),
        }
    }

    fn payload(&self, key: &KeyPath, value: Option<String>) -> Result<PayloadMode, ConfigError> {
        match value.as_deref() {
            None | Some("field") => Ok(PayloadMode::Field),
            Some("entry") => Ok(PayloadMode::Entry),
            Some(other) => Err(self.invalid(
                key,
                format!("must be \"field\" or \"entry\", got {other:?}"),
            )),
        }
    }

    fn parse_duration(&self, key: &KeyPath, text: &str) -> Result<Duration, ConfigError> {
        let duration = humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                key,
                format!(
                    "invalid duration {text:?}: {e} (write e.g. \"250ms\", \"5s\", \"2m\", \"1h\")"
                ),
            )
        })?;
        // Deadlines are computed as now + duration; far beyond any real need, that sum
        // would overflow the clock.
        if duration > MAX_DURATION {
            return Err(self.invalid(key, format!("{text:?} is too long (at most 10 years)")));
        }
        Ok(duration)
    }

    fn duration(
        &self,
        key: &KeyPath,
        value: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value.map_or(Ok(default), |t| self.parse_duration(key, &t))
    }

    fn positive_duration(
        &self,
        key: &KeyPath,
        value: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, value, default)?;
        if d.is_zero() {
            return Err(self.invalid(key, "must be longer than 0"));
        }
        Ok(d)
    }

    fn claim_idle(&self, key: &KeyPath, value: Option<String>) -> Result<Duration, ConfigError> {
        let d = self.duration(key, value, DEFAULT_CLAIM_IDLE)?;
        if d < MIN_CLAIM_IDLE {
            return Err(self.invalid(
                key,
                format!(
                    "must be at least {} (got {}): running handlers refresh their entries every \
                     claim_idle/3 so that no other consumer claims them, and that must not be \
                     more often than once a second",
                    humantime::format_duration(MIN_CLAIM_IDLE),
                    humantime::format_duration(d)
                ),
            ));
        }
        Ok(d)
    }

    fn exit_codes(&self, key: &KeyPath, value: Option<Vec<i64>>) -> Result<Vec<i32>, ConfigError> {
        let check = |(i, code): (usize, i64)| match u8::try_from(code) {
            Ok(0) => Err(self.invalid(
                &key.index(i),
                "0 is success, not a failure: exit codes here must be 1..=255",
            )),
            Ok(code) => Ok(i32::from(code)),
            Err(_) => Err(self.invalid(
                &key.index(i),
                format!("{code} is not an exit code: must be 1..=255"),
            )),
        };
        value
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(check)
            .collect()
    }

    fn env(
        &self,
        key: &KeyPath,
        value: Option<BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let env = value.unwrap_or_default();
        for (name, value) in &env {
            check_env_var(name, value).map_err(|why| self.invalid(&key.key(name), why))?;
        }
        Ok(env)
    }

    fn handler(
        &self,
        key: &KeyPath,
        value: Option<Vec<String>>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut argv = value.ok_or_else(|| {
            self.invalid(key, "is required: the program and its arguments, e.g. [\"/usr/local/bin/handle\", \"--verbose\"]")
        })?;
        // A NUL cannot be passed through exec; better to say so now than at every spawn.
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return Err(self.invalid(&key.index(i), "contains a NUL character"));
        }
        let Some(program) = argv.first_mut() else {
            return Err(self.invalid(
                key,
                "must not be empty: the first element is the program to run",
            ));
        };
        *program = resolve_program(program, self.config_dir(), self.host.path_var.as_deref())
            .map_err(|why| self.invalid(key, why))?;
        Ok(argv)
    }
}

fn stream_key(i: usize, key: &str) -> KeyPath {
    KeyPath::new("streams").index(i).key(key)
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"));
    match rest {
        None => Err(format!(
            "must start with redis:// or rediss:// (got {:?})",
            redact_url(url)
        )),
        Some("") => Err("has no host after the scheme".to_string()),
        Some(_) => Ok(()),
    }
}

fn check_env_var(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("environment variable names must not be empty".to_string());
    }
    if name.contains('=') || name.contains('\0') {
        return Err("environment variable names cannot contain '=' or NUL".to_string());
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "names starting with {RESERVED_ENV_PREFIX} are reserved: the daemon sets them itself"
        ));
    }
    if value.contains('\0') {
        return Err("the value contains a NUL character".to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Handler programs.

/// Checks that `program` can be executed and returns what to store as `handler[0]`: a
/// name found in PATH stays as written, a relative path with a '/' becomes absolute,
/// resolved against the config file's directory so that a config does not depend on the
/// daemon's working directory.
fn resolve_program(
    program: &str,
    config_dir: &Path,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<String, String> {
    if program.is_empty() {
        return Err("the handler program (first element) must not be empty".to_string());
    }
    if !program.contains('/') {
        return search_path(program, path_var).map(|()| program.to_string());
    }
    if Path::new(program).is_absolute() {
        return check_executable(Path::new(program))
            .map(|()| program.to_string())
            .map_err(|why| format!("handler program {program:?} {why}"));
    }
    let resolved = std::path::absolute(config_dir.join(program)).map_err(|e| {
        format!(
            "cannot resolve handler program {program:?} against the config file's directory: {e}"
        )
    })?;
    check_executable(&resolved).map_err(|why| {
        format!(
            "handler program {program:?} (relative to the config file: {}) {why}",
            resolved.display()
        )
    })?;
    // Lossy conversion would store a different path than the one just checked.
    resolved.into_os_string().into_string().map_err(|p| {
        format!(
            "handler program {program:?} resolves to {}, which is not valid UTF-8",
            Path::new(&p).display()
        )
    })
}

/// Looks `program` up in each directory of PATH, as execvp(3) will.
fn search_path(program: &str, path_var: Option<&std::ffi::OsStr>) -> Result<(), String> {
    let dirs = path_var.unwrap_or(std::ffi::OsStr::new(DEFAULT_PATH));
    let mut unusable = None;
    for dir in std::env::split_paths(dirs) {
        let candidate = dir.join(program);
        match check_executable(&candidate) {
            Ok(()) => return Ok(()),
            // Keep looking like execvp does, but remember why a match was unusable.
            Err(why) if unusable.is_none() && candidate.exists() => {
                unusable = Some(format!(
                    "handler program {program:?} found in PATH as {}, but it {why}",
                    candidate.display()
                ));
            }
            Err(_) => {}
        }
    }
    Err(unusable.unwrap_or_else(|| format!("handler program {program:?} not found in PATH")))
}

/// `Err` holds the end of a sentence: "does not exist", "is not executable", ...
fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("does not exist".to_string());
        }
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    };
    if !meta.is_file() {
        return Err("is not a regular file".to_string());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("is not executable".to_string());
    }
    Ok(())
}

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

/// Replaces the password of `scheme://user:password@host...` with `***`.
fn redact_url(url: &str) -> String {
    // A string without "://" is scanned whole: a mistyped URL can carry a password too.
    let rest_start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(rest_start);
    // The last '@' ends the user info. Cutting at the first '/' instead would leak a
    // password containing an unencoded '/' or '@'; mangling an odd query is the lesser harm.
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{head}{user}:***{host}"),
        None => url.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Key paths and their place in the file.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `streams[1].env.FOO`.
#[derive(Debug, Clone)]
struct KeyPath(Vec<Seg>);

impl KeyPath {
    fn new(key: &str) -> KeyPath {
        KeyPath(vec![Seg::Key(key.to_string())])
    }

    fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Key(key.to_string()));
        path
    }

    fn index(&self, i: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Seg::Index(i));
        path
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) => {
                    if n > 0 {
                        f.write_str(".")?;
                    }
                    // Quote keys that TOML would need quoted, so `env."A=B"` reads right.
                    if is_bare_key(k) {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A node of the parsed document, with tables, inline tables and arrays seen alike.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Inline(&'a toml_edit::InlineTable),
    Tables(&'a toml_edit::ArrayOfTables),
    Array(&'a toml_edit::Array),
    Leaf(&'a toml_edit::Value),
    Empty,
}

type Span = Option<std::ops::Range<usize>>;

impl<'a> Node<'a> {
    fn from_item(item: &'a toml_edit::Item) -> Node<'a> {
        match item {
            toml_edit::Item::None => Node::Empty,
            toml_edit::Item::Value(v) => Node::from_value(v),
            toml_edit::Item::Table(t) => Node::Table(t),
            toml_edit::Item::ArrayOfTables(a) => Node::Tables(a),
        }
    }

    fn from_value(value: &'a toml_edit::Value) -> Node<'a> {
        match value {
            toml_edit::Value::InlineTable(t) => Node::Inline(t),
            toml_edit::Value::Array(a) => Node::Array(a),
            other => Node::Leaf(other),
        }
    }

    fn span(self) -> Span {
        match self {
            Node::Table(t) => t.span(),
            Node::Inline(t) => t.span(),
            Node::Tables(a) => a.span(),
            Node::Array(a) => a.span(),
            Node::Leaf(v) => v.span(),
            Node::Empty => None,
        }
    }

    /// Each child with the span that marks it in the file: its key as written, or for an
    /// array element the element itself (a `[[table]]` header for an array of tables).
    fn children(self) -> Vec<(Seg, Span, Node<'a>)> {
        match self {
            Node::Table(t) => t
                .iter()
                .map(|(k, item)| {
                    let span = t.key(k).and_then(toml_edit::Key::span);
                    (Seg::Key(k.to_string()), span, Node::from_item(item))
                })
                .collect(),
            Node::Inline(t) => t
                .iter()
                .map(|(k, v)| {
                    let span = t.key(k).and_then(toml_edit::Key::span);
                    (Seg::Key(k.to_string()), span, Node::from_value(v))
                })
                .collect(),
            Node::Tables(a) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (Seg::Index(i), t.span(), Node::Table(t)))
                .collect(),
            Node::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Seg::Index(i), v.span(), Node::from_value(v)))
                .collect(),
            Node::Leaf(_) | Node::Empty => Vec::new(),
        }
    }
}

/// The span of the deepest segment of `path` present in the document: the key itself, or
/// the nearest enclosing table when the key is missing.
fn span_of(root: Node<'_>, path: &[Seg]) -> Span {
    let mut node = root;
    let mut best = None;
    for seg in path {
        let Some((_, span, child)) = node.children().into_iter().find(|(s, ..)| s == seg) else {
            break;
        };
        // Implicit tables (`[a.b]` without `[a]`) have no span of their own.
        best = span.or_else(|| child.span()).or(best);
        node = child;
    }
    best
}

/// The key path of the innermost key or value that covers byte `offset`.
fn path_at(node: Node<'_>, offset: usize) -> Option<Vec<Seg>> {
    for (seg, span, child) in node.children() {
        if covers(&span, offset) {
            return Some(vec![seg]);
        }
        if let Some(mut sub) = path_at(child, offset) {
            sub.insert(0, seg);
            return Some(sub);
        }
        if covers(&child.span(), offset) {
            return Some(vec![seg]);
        }
    }
    None
}

fn covers(span: &Span, offset: usize) -> bool {
    span.as_ref()
        .is_some_and(|s| s.contains(&offset) || s.start == offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Lines 1-7; a key appended with [`with`] lands on [`EXTRA`].
    const MINIMAL: &str = r#"[redis]
url = "redis://127.0.0.1:6379/0"

[[streams]]
name = "orders"
group = "workers"
handler = ["sh", "-c", "cat"]
"#;
    const EXTRA: usize = 8;

    fn host() -> Host {
        Host {
            path_var: Some("/usr/bin:/bin".into()),
            hostname: || Some("testhost".to_string()),
            consumer_env: None,
        }
    }

    #[test]
    fn consumer_env_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &with("[daemon]\nconsumer = \"from-file\"\n"));
        let mut h = host();
        h.consumer_env = Some("host-1-a".into());
        let config = load_with(&path, None, &h).unwrap();
        assert_eq!(config.daemon.consumer, "host-1-a");
        h.consumer_env = Some(String::new());
        let (_, key, message) = invalid_from(load_with(&path, None, &h));
        assert_eq!(key, "daemon.consumer");
        assert!(message.contains("REDIS_STREAMD_CONSUMER"), "{message}");
    }

    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("streamd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn load_text_env(text: &str, env_url: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        load_with(&write(&dir, text), env_url.map(String::from), &host())
    }

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        load_text_env(text, None)
    }

    fn ok(text: &str) -> Config {
        load_text(text).unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
    }

    /// (line, key, message) of the error `text` must produce.
    fn invalid(text: &str) -> (usize, String, String) {
        invalid_from(load_text(text))
    }

    fn invalid_from(result: Result<Config, ConfigError>) -> (usize, String, String) {
        match result {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            Err(other) => panic!("expected Invalid, got {other}"),
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    /// Asserts the error's line and key, and that its message contains `needle`.
    fn assert_invalid(text: &str, line: usize, key: &str, needle: &str) {
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

    fn executable(dir: &Path, rel: &str, mode: u32) -> PathBuf {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, "#!/bin/sh\n").expect("write handler");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn full_config_with_every_key() {
        let text = r#"
[redis]
url = "rediss://worker:s3cret@redis.example:6380/2"
connect_timeout = "10s"

[daemon]
consumer = "worker-a"
shutdown_timeout = "45s"
metrics_listen = "127.0.0.1:9187"

[[streams]]
name = "orders"
group = "order-workers"
handler = ["/bin/sh", "-c", "cat >/dev/null"]
mode = "worker"
max_block_read = 4
worker_prefetch = 2
block = "250ms"
start_id = "0"
payload = "entry"
payload_field = "body"
handler_timeout = "2m"
max_attempts = 5
retry_backoff = "2s"
retry_backoff_max = "30s"
dlq = "orders:dead"
dlq_exit_codes = [65, 255]
env = { LOG_LEVEL = "info", MODE = "fast" }
claim_interval = "10s"
claim_idle = "3s"
reap_idle = "2h"
"#;
        let c = ok(text);
        assert_eq!(c.redis.url, "rediss://worker:s3cret@redis.example:6380/2");
        assert_eq!(c.redis.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.daemon.consumer, "worker-a");
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(45));
        assert_eq!(c.daemon.metrics_listen, Some(([127, 0, 0, 1], 9187).into()));
        let expected = StreamConfig {
            name: "orders".into(),
            group: "order-workers".into(),
            handler: vec!["/bin/sh".into(), "-c".into(), "cat >/dev/null".into()],
            mode: HandlerMode::Worker,
            max_block_read: 4,
            worker_prefetch: 2,
            block: Duration::from_millis(250),
            start_id: "0".into(),
            payload: PayloadMode::Entry,
            payload_field: "body".into(),
            handler_timeout: Duration::from_secs(120),
            max_attempts: 5,
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(30),
            dlq: "orders:dead".into(),
            dlq_exit_codes: vec![65, 255],
            env: BTreeMap::from([
                ("LOG_LEVEL".into(), "info".into()),
                ("MODE".into(), "fast".into()),
            ]),
            claim_interval: Duration::from_secs(10),
            claim_idle: Duration::from_secs(3),
            reap_idle: Duration::from_secs(7200),
        };
        assert_eq!(c.streams, vec![expected]);
    }

    #[test]
    fn metrics_listen_must_be_a_socket_address() {
        assert_eq!(ok(MINIMAL).daemon.metrics_listen, None);
        let text = format!("{MINIMAL}\n[daemon]\nmetrics_listen = \"localhost\"\n");
        let (_, key, message) = invalid(&text);
        assert_eq!(key, "daemon.metrics_listen");
        assert!(message.contains("127.0.0.1:9187"), "{message}");
    }

    #[test]
    fn absurdly_long_durations_are_rejected() {
        assert_invalid(
            &with("handler_timeout = \"500000000years\"\n"),
            EXTRA,
            "streams[0].handler_timeout",
            "too long",
        );
        assert_eq!(
            ok(&with("handler_timeout = \"9years\"\n")).streams[0].handler_timeout,
            humantime::parse_duration("9years").unwrap()
        );
    }

    #[test]
    fn worker_prefetch_is_for_worker_mode_only() {
        assert_eq!(ok(MINIMAL).streams[0].worker_prefetch, 1);
        assert_eq!(
            ok(&with("mode = \"worker\"\n")).streams[0].worker_prefetch,
            DEFAULT_WORKER_PREFETCH as usize
        );
        assert_eq!(
            ok(&with("mode = \"worker\"\nworker_prefetch = 1\n")).streams[0].worker_prefetch,
            1
        );
        assert_invalid(
            &with("worker_prefetch = 4\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "applies only to mode = \"worker\"",
        );
        assert_invalid(
            &with("worker_prefetch = 0\nmode = \"worker\"\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "must be at least 1 (got 0)",
        );
        assert_invalid(
            &with("worker_prefetch = 1001\nmode = \"worker\"\n"),
            EXTRA,
            "streams[0].worker_prefetch",
            "must be at most 1000 (got 1001)",
        );
    }

    #[test]
    fn mode_must_be_exec_or_worker() {
        assert_eq!(ok(MINIMAL).streams[0].mode, HandlerMode::Exec);
        assert_invalid(
            &with("mode = \"daemon\"\n"),
            EXTRA,
            "streams[0].mode",
            "\"exec\" or \"worker\"",
        );
    }

    #[test]
    fn defaults() {
        let c = ok(MINIMAL);
        assert_eq!(c.redis.connect_timeout, None);
        assert_eq!(c.daemon.consumer, "testhost");
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(30));
        let s = &c.streams[0];
        // A PATH-looked-up program stays as written.
        assert_eq!(s.handler, vec!["sh", "-c", "cat"]);
        assert_eq!(s.max_block_read, 10);
        assert_eq!(s.block, Duration::from_secs(5));
        assert_eq!(s.start_id, "$");
        assert_eq!(s.payload, PayloadMode::Field);
        assert_eq!(s.payload_field, "payload");
        assert_eq!(s.handler_timeout, Duration::from_secs(30));
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.retry_backoff, Duration::from_secs(1));
        assert_eq!(s.retry_backoff_max, Duration::from_secs(60));
        assert_eq!(s.dlq, "orders:dlq");
        assert!(s.dlq_exit_codes.is_empty());
        assert!(s.env.is_empty());
        assert_eq!(s.claim_interval, Duration::from_secs(30));
        assert_eq!(s.claim_idle, Duration::from_secs(60));
        assert_eq!(s.reap_idle, Duration::from_secs(3600));
    }

    #[test]
    fn public_load_defaults_consumer_to_the_host_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = MINIMAL.replace("\"sh\"", "\"/bin/sh\"");
        let c = Config::load(&write(&dir, &text), None).expect("valid");
        let hostname = nix::unistd::gethostname().expect("hostname");
        assert_eq!(c.daemon.consumer, hostname.to_string_lossy());
    }

    #[test]
    fn unknown_hostname_asks_for_consumer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let no_host = Host {
            hostname: || None,
            ..host()
        };
        let text = format!("[daemon]\nshutdown_timeout = \"5s\"\n{MINIMAL}");
        let (line, key, message) = invalid_from(load_with(&write(&dir, &text), None, &no_host));
        assert_eq!((line, key.as_str()), (1, "daemon.consumer"));
        assert!(message.contains("set [daemon] consumer"), "{message}");
    }

    #[test]
    fn error_display_is_file_line_key_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, &with("max_block_read = 0\n"));
        let err = load_with(&path, None, &host()).expect_err("invalid");
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
        let err = load_with(&path, None, &host()).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn at_least_one_stream() {
        assert_invalid(
            "[redis]\nurl = \"redis://h\"\n",
            1,
            "streams",
            "at least one stream",
        );
        assert_invalid(
            "streams = []\n[redis]\nurl = \"redis://h\"\n",
            1,
            "streams",
            "at least one stream",
        );
    }

    #[test]
    fn redis_url_required() {
        let text = "# comment\n\n[redis]\nconnect_timeout = \"5s\"\n\n[[streams]]\nname = \"a\"\ngroup = \"g\"\nhandler = [\"sh\"]\n";
        assert_invalid(text, 3, "redis.url", REDIS_URL_ENV);
        let no_table = "[[streams]]\nname = \"a\"\ngroup = \"g\"\nhandler = [\"sh\"]\n";
        assert_invalid(no_table, 1, "redis.url", "is required");
    }

    #[test]
    fn redis_url_scheme() {
        let text = MINIMAL.replace("redis://127.0.0.1", "http://user:hunter2@127.0.0.1");
        assert_invalid(
            &text,
            2,
            "redis.url",
            "must start with redis:// or rediss://",
        );
        let (_, _, message) = invalid(&text);
        assert!(!message.contains("hunter2"), "{message}");
        assert_invalid(
            &MINIMAL.replace("redis://127.0.0.1:6379/0", "redis://"),
            2,
            "redis.url",
            "no host",
        );
    }

    #[test]
    fn env_url_overrides_and_permits_missing_url() {
        let c = load_text_env(MINIMAL, Some("rediss://:pw@env-host:6379")).expect("valid");
        assert_eq!(c.redis.url, "rediss://:pw@env-host:6379");

        let without_url = MINIMAL.replace("url = \"redis://127.0.0.1:6379/0\"\n", "");
        let c = load_text_env(&without_url, Some("redis://env-host")).expect("valid");
        assert_eq!(c.redis.url, "redis://env-host");

        let (line, key, message) =
            invalid_from(load_text_env(MINIMAL, Some("tcp://user:pw@env-host")));
        assert_eq!((line, key.as_str()), (2, "redis.url"));
        assert!(message.starts_with(REDIS_URL_ENV), "{message}");
        assert!(!message.contains(":pw@"), "{message}");
    }

    #[test]
    fn duplicate_name_and_group() {
        let text = with(
            "\n[[streams]]\nname = \"other\"\ngroup = \"workers\"\nhandler = [\"sh\"]\n\n[[streams]]\nname = \"orders\"\ngroup = \"workers\"\nhandler = [\"sh\"]\n",
        );
        assert_invalid(&text, EXTRA + 7, "streams[2].name", "streams[0]");
        // Same stream, another group: fine.
        ok(&with(
            "\n[[streams]]\nname = \"orders\"\ngroup = \"auditors\"\nhandler = [\"sh\"]\n",
        ));
    }

    #[test]
    fn missing_required_stream_keys_point_at_the_header() {
        let text = with("\n[[streams]]\nname = \"b\"\nhandler = [\"sh\"]\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].group", "is required");
        let text = with("\n[[streams]]\ngroup = \"g\"\nhandler = [\"sh\"]\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].name", "is required");
        let text = with("\n[[streams]]\nname = \"b\"\ngroup = \"g\"\n");
        assert_invalid(&text, EXTRA + 1, "streams[1].handler", "is required");
    }

    #[test]
    fn empty_strings() {
        let empty_name = MINIMAL.replace("name = \"orders\"", "name = \"\"");
        assert_invalid(&empty_name, 5, "streams[0].name", "must not be empty");
        let empty_group = MINIMAL.replace("group = \"workers\"", "group = \"\"");
        assert_invalid(&empty_group, 6, "streams[0].group", "must not be empty");
        assert_invalid(
            &with("payload_field = \"\"\n"),
            EXTRA,
            "streams[0].payload_field",
            "must not be empty",
        );
        assert_invalid(
            &with("dlq = \"\"\n"),
            EXTRA,
            "streams[0].dlq",
            "must not be empty",
        );
        let empty_consumer = format!("{MINIMAL}\n[daemon]\nconsumer = \"\"\n");
        assert_invalid(
            &empty_consumer,
            EXTRA + 2,
            "daemon.consumer",
            "must not be empty",
        );
    }

    #[test]
    fn counts_must_be_positive() {
        for (extra, key) in [
            ("max_block_read = 0", "streams[0].max_block_read"),
            ("max_block_read = -3", "streams[0].max_block_read"),
            ("max_attempts = 0", "streams[0].max_attempts"),
            ("max_attempts = -1", "streams[0].max_attempts"),
        ] {
            assert_invalid(&with(&format!("{extra}\n")), EXTRA, key, "at least 1");
        }
    }

    #[test]
    fn handler_argv_checks() {
        let h = |argv: &str| MINIMAL.replace(r#"["sh", "-c", "cat"]"#, argv);
        assert_invalid(&h("[]"), 7, "streams[0].handler", "must not be empty");
        assert_invalid(&h(r#"[""]"#), 7, "streams[0].handler", "must not be empty");
        assert_invalid(
            &h(r#"["no-such-handler-xyz"]"#),
            7,
            "streams[0].handler",
            "handler program \"no-such-handler-xyz\" not found in PATH",
        );
        assert_invalid(
            &h(r#"["/nonexistent/handler"]"#),
            7,
            "streams[0].handler",
            "does not exist",
        );
        assert_invalid(
            &h(r#"["sh", "a\u0000b"]"#),
            7,
            "streams[0].handler[1]",
            "NUL",
        );
    }

    #[test]
    fn handler_must_be_an_executable_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = executable(dir.path(), "plain.sh", 0o644);
        let text = MINIMAL.replace(
            r#"["sh", "-c", "cat"]"#,
            &format!("[{:?}]", plain.display().to_string()),
        );
        assert_invalid(&text, 7, "streams[0].handler", "is not executable");
        let text = MINIMAL.replace(
            r#"["sh", "-c", "cat"]"#,
            &format!("[{:?}]", dir.path().display().to_string()),
        );
        assert_invalid(&text, 7, "streams[0].handler", "is not a regular file");
    }

    #[test]
    fn handler_in_path_must_be_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        executable(dir.path(), "only-plain", 0o644);
        let found = executable(&dir.path().join("bin"), "runner", 0o755);
        let path_var = std::env::join_paths([dir.path().to_path_buf(), dir.path().join("bin")])
            .expect("join PATH");
        let host = Host {
            path_var: Some(path_var),
            ..host()
        };
        let load = |program: &str| {
            let text = MINIMAL.replace(r#"["sh", "-c", "cat"]"#, &format!("[{program:?}]"));
            load_with(&write(&dir, &text), None, &host)
        };
        let (line, key, message) = invalid_from(load("only-plain"));
        assert_eq!((line, key.as_str()), (7, "streams[0].handler"));
        assert!(message.contains("is not executable"), "{message}");
        let c = load("runner").expect("valid");
        assert_eq!(c.streams[0].handler, vec!["runner"]);
        assert!(found.exists());
    }

    #[test]
    fn relative_handler_is_resolved_against_the_config_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = executable(dir.path(), "bin/handle.sh", 0o755);
        for written in ["bin/handle.sh", "./bin/handle.sh"] {
            let text = MINIMAL.replace(
                r#"["sh", "-c", "cat"]"#,
                &format!("[{written:?}, \"--flag\"]"),
            );
            let c = load_with(&write(&dir, &text), None, &host()).expect("valid");
            assert_eq!(
                c.streams[0].handler,
                vec![script.display().to_string(), "--flag".to_string()]
            );
        }
        let text = MINIMAL.replace(r#"["sh", "-c", "cat"]"#, r#"["bin/missing.sh"]"#);
        let (line, key, message) = invalid_from(load_with(&write(&dir, &text), None, &host()));
        assert_eq!((line, key.as_str()), (7, "streams[0].handler"));
        assert!(message.contains("does not exist"), "{message}");
    }

    #[test]
    fn start_id_and_payload() {
        assert_invalid(
            &with("start_id = \"0-0\"\n"),
            EXTRA,
            "streams[0].start_id",
            "\"$\"",
        );
        assert_invalid(
            &with("payload = \"json\"\n"),
            EXTRA,
            "streams[0].payload",
            "\"field\" or \"entry\"",
        );
    }

    #[test]
    fn durations() {
        for key in ["block", "handler_timeout", "claim_interval"] {
            assert_invalid(
                &with(&format!("{key} = \"0s\"\n")),
                EXTRA,
                &format!("streams[0].{key}"),
                "longer than 0",
            );
        }
        assert_invalid(
            &with("reap_idle = \"5 parsecs\"\n"),
            EXTRA,
            "streams[0].reap_idle",
            "invalid duration \"5 parsecs\"",
        );
        assert_invalid(
            &format!("{MINIMAL}[daemon]\nshutdown_timeout = \"soon\"\n"),
            EXTRA + 1,
            "daemon.shutdown_timeout",
            "invalid duration",
        );
        assert_invalid(
            &MINIMAL.replace("[redis]\n", "[redis]\nconnect_timeout = \"-1s\"\n"),
            2,
            "redis.connect_timeout",
            "invalid duration",
        );
    }

    #[test]
    fn retry_backoff_max_not_below_backoff() {
        assert_invalid(
            &with("retry_backoff = \"10s\"\nretry_backoff_max = \"5s\"\n"),
            EXTRA + 1,
            "streams[0].retry_backoff_max",
            "shorter than retry_backoff",
        );
        // Only retry_backoff written: blame it, not the default.
        assert_invalid(
            &with("retry_backoff = \"2m\"\n"),
            EXTRA,
            "streams[0].retry_backoff",
            "shorter than retry_backoff",
        );
        ok(&with(
            "retry_backoff = \"5s\"\nretry_backoff_max = \"5s\"\n",
        ));
    }

    #[test]
    fn claim_idle_allows_the_refresh_period() {
        for bad in ["0s", "2s", "2999ms"] {
            assert_invalid(
                &with(&format!("claim_idle = \"{bad}\"\n")),
                EXTRA,
                "streams[0].claim_idle",
                "claim_idle/3",
            );
        }
        ok(&with("claim_idle = \"3s\"\n"));
    }

    #[test]
    fn dlq_must_differ_from_the_stream() {
        assert_invalid(
            &with("dlq = \"orders\"\n"),
            EXTRA,
            "streams[0].dlq",
            "must differ",
        );
    }

    #[test]
    fn dlq_exit_codes_range() {
        assert_invalid(
            &with("dlq_exit_codes = [0]\n"),
            EXTRA,
            "streams[0].dlq_exit_codes[0]",
            "0 is success",
        );
        assert_invalid(
            &with("dlq_exit_codes = [\n  65,\n  256,\n]\n"),
            EXTRA + 2,
            "streams[0].dlq_exit_codes[1]",
            "1..=255",
        );
        assert_invalid(
            &with("dlq_exit_codes = [-1]\n"),
            EXTRA,
            "streams[0].dlq_exit_codes[0]",
            "1..=255",
        );
    }

    #[test]
    fn env_names() {
        let sub = |entries: &str| format!("{MINIMAL}\n[streams.env]\nGOOD = \"1\"\n{entries}\n");
        assert_invalid(
            &sub("\"\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"\"",
            "must not be empty",
        );
        assert_invalid(
            &sub("\"A=B\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"A=B\"",
            "'='",
        );
        assert_invalid(
            &sub("\"A\\u0000B\" = \"x\""),
            EXTRA + 3,
            "streams[0].env.\"A\\0B\"",
            "NUL",
        );
        assert_invalid(
            &sub("REDIS_STREAMD_ID = \"x\""),
            EXTRA + 3,
            "streams[0].env.REDIS_STREAMD_ID",
            "reserved",
        );
        assert_invalid(
            &with("env = { COUNT = 1 }\n"),
            EXTRA,
            "streams[0].env.COUNT",
            "expected a string",
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_name() {
        let text = with(
            "\n[[streams]]\nname = \"b\"\ngroup = \"g\"\nhandler = [\"sh\"]\nmax_block_reed = 3\n",
        );
        assert_invalid(
            &text,
            EXTRA + 5,
            "streams[1].max_block_reed",
            "unknown field `max_block_reed`",
        );
        assert_invalid(
            &format!("{MINIMAL}\n[redsi]\nurl = \"x\"\n"),
            EXTRA + 1,
            "redsi",
            "unknown field `redsi`",
        );
        assert_invalid(
            &format!("{MINIMAL}\n[daemon]\nconsumr = \"x\"\n"),
            EXTRA + 2,
            "daemon.consumr",
            "unknown field `consumr`",
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        assert_invalid(
            &with("max_block_read = \"10\"\n"),
            EXTRA,
            "streams[0].max_block_read",
            "invalid type",
        );
        assert_invalid(
            &MINIMAL.replace("[[streams]]", "[streams]"),
            4,
            "streams",
            "invalid type",
        );
        assert_invalid(
            "streams = [1]\n",
            1,
            "streams[0]",
            "expected a [[streams]] table",
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let (line, key, _) = invalid(&with("block = \"5s\n"));
        assert_eq!((line, key.as_str()), (EXTRA, "(syntax)"));
        let (line, _, message) = invalid(&with("name = \"again\"\n"));
        assert_eq!(line, EXTRA);
        assert!(message.contains("duplicate key"), "{message}");
    }

    #[test]
    fn inline_and_dotted_forms_are_located() {
        let text = "redis.url = \"redis://h\"\nstreams = [\n  { name = \"a\", group = \"g\", handler = [\"sh\"] },\n  { name = \"b\", group = \"g\", handler = [\"sh\"], max_attempts = 0 },\n]\n";
        assert_invalid(text, 4, "streams[1].max_attempts", "at least 1");
        let text = "redis.url = \"http://h\"\nstreams = [{ name = \"a\", group = \"g\", handler = [\"sh\"] }]\n";
        assert_invalid(text, 1, "redis.url", "redis://");
        let text =
            "redis.url = \"redis://h\"\nstreams = [\n  { name = \"a\", group = \"g\" },\n]\n";
        assert_invalid(text, 3, "streams[0].handler", "is required");
    }

    #[test]
    fn redacted_url_hides_the_password() {
        let redact = |url: &str| {
            RedisConfig {
                url: url.to_string(),
                connect_timeout: None,
            }
            .redacted_url()
        };
        assert_eq!(
            redact("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("rediss://:hunter2@host"), "rediss://:***@host");
        assert_eq!(redact("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(redact("user:hunter2@host"), "user:***@host");
        for odd in [
            "",
            "@",
            ":@",
            "://",
            "redis://",
            "redis://:",
            "é:ü@ß",
            "redis://@@",
        ] {
            let _ = redact(odd);
        }
        for url in [
            "redis://u:hunter2@h",
            "redis://:hunter2@h/0",
            "redis://u:hun/ter2@h",
            "redis://u:hunter2@h@h2",
            "redis://u:hu:nter2@h",
        ] {
            let r = redact(url);
            assert!(
                !r.contains("hunter2") && !r.contains("nter2"),
                "{url} -> {r}"
            );
        }
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

    #[test]
    fn key_paths_display() {
        let p = KeyPath::new("streams").index(2).key("env").key("FOO");
        assert_eq!(p.to_string(), "streams[2].env.FOO");
        assert_eq!(KeyPath::new("a").key("b c").to_string(), "a.\"b c\"");
    }
}
