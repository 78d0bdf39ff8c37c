//! The validation pass: from the file as written ([`RawConfig`]) to a [`Config`], with
//! the defaults and every rule, each failure an error located at its key. This file has
//! `[daemon]` and the value checks every table uses; `[redis]` is validated in
//! `redis_section` and the `[[streams]]` tables in `streams`.

use std::path::Path;
use std::time::Duration;

use super::locate::{KeyPath, Locator};
use super::raw::{RawConfig, RawDaemon};
use super::{CONSUMER_ENV, Config, ConfigError, DaemonConfig, Overrides};

/// The longest duration any key accepts.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `[daemon] shutdown_timeout`. (The defaults of `[[streams]]` keys are in `streams`.)
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables with this prefix are set by the daemon for every handler run.
const RESERVED_ENV_PREFIX: &str = "REDIS_STREAMD_";

/// Everything validation needs: where keys are in the file, and the process's part.
pub(super) struct Ctx<'a> {
    pub(super) loc: Locator<'a>,
    pub(super) env: &'a Overrides,
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

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        Ok(Config {
            path: self.loc.file.to_path_buf(),
            redis: self.redis(raw.redis.unwrap_or_default(), self.env.redis_url.clone())?,
            daemon: self.daemon(raw.daemon.unwrap_or_default())?,
            streams: self.streams(raw.streams.unwrap_or_default())?,
        })
    }

    fn daemon(&self, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
        let key = KeyPath::new("daemon");
        let consumer = match (self.env.consumer.clone(), raw.consumer) {
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
        self.env
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                self.invalid(
                    key,
                    "not set and the host name cannot be determined: set [daemon] consumer",
                )
            })
    }

    pub(super) fn required(
        &self,
        key: &KeyPath,
        value: Option<String>,
    ) -> Result<String, ConfigError> {
        let value = value.ok_or_else(|| self.invalid(key, "is required"))?;
        self.non_empty(key, value)
    }

    pub(super) fn non_empty(&self, key: &KeyPath, value: String) -> Result<String, ConfigError> {
        if value.is_empty() {
            Err(self.invalid(key, "must not be empty"))
        } else {
            Ok(value)
        }
    }

    pub(super) fn non_empty_or(
        &self,
        key: &KeyPath,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        value.map_or_else(|| Ok(default.to_string()), |v| self.non_empty(key, v))
    }

    pub(super) fn at_least_one(
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

    pub(super) fn duration(
        &self,
        key: &KeyPath,
        value: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value.map_or(Ok(default), |t| self.parse_duration(key, &t))
    }

    pub(super) fn positive_duration(
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
}

pub(super) fn stream_key(i: usize, key: &str) -> KeyPath {
    KeyPath::new("streams").index(i).key(key)
}

pub(super) fn check_env_var(name: &str, value: &str) -> Result<(), String> {
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
    use super::super::{HandlerMode, PayloadMode, StreamConfig};
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn consumer_env_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &with("[daemon]\nconsumer = \"from-file\"\n"));
        let mut o = overrides();
        o.consumer = Some("host-1-a".into());
        let config = Config::load(&path, &o).unwrap();
        assert_eq!(config.daemon.consumer, "host-1-a");
        o.consumer = Some(String::new());
        let (_, key, message) = invalid_from(Config::load(&path, &o));
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
            order: None,
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
        let no_host = Overrides {
            hostname: None,
            ..overrides()
        };
        let text = format!("[daemon]\nshutdown_timeout = \"5s\"\n{MINIMAL}");
        let (line, key, message) = invalid_from(Config::load(&write(&dir, &text), &no_host));
        assert_eq!((line, key.as_str()), (1, "daemon.consumer"));
        assert!(message.contains("set [daemon] consumer"), "{message}");
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
}
