//! The validation pass: from the file as written ([`RawConfig`]) to a [`Config`], with
//! the defaults and every rule, each failure an error located at its key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::locate::{KeyPath, Locator};
use super::program::resolve_program;
use super::raw::{RawConfig, RawDaemon, RawStream};
use super::{
    CONSUMER_ENV, Config, ConfigError, DaemonConfig, HandlerMode, Host, PayloadMode, StreamConfig,
};

/// The longest duration any key accepts.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

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

/// Everything validation needs: where keys are in the file, and the process's part.
pub(super) struct Ctx<'a> {
    pub(super) loc: Locator<'a>,
    pub(super) host: &'a Host,
}

impl Ctx<'_> {
    pub(super) fn invalid(&self, key: &KeyPath, message: impl Into<String>) -> ConfigError {
        self.loc.invalid(key, message)
    }

    pub(super) fn config_dir(&self) -> &Path {
        // `Path::parent` of a bare file name is "", which means the current directory.
        self.loc
            .file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    pub(super) fn validate(
        &self,
        raw: RawConfig,
        env_url: Option<String>,
    ) -> Result<Config, ConfigError> {
        Ok(Config {
            path: self.loc.file.to_path_buf(),
            redis: self.redis(raw.redis.unwrap_or_default(), env_url)?,
            daemon: self.daemon(raw.daemon.unwrap_or_default())?,
            streams: self.streams(raw.streams.unwrap_or_default())?,
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

    pub(super) fn parse_duration(
        &self,
        key: &KeyPath,
        text: &str,
    ) -> Result<Duration, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::{Host, load_with};
    use super::*;

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
}
