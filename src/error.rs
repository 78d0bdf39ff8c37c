//! The top-level error: every reason the process exits non-zero, its exit code
//! (sysexits.h, as the systemd units expect them) and how it is reported.
//!
//! Exit codes: 0 ok, 2 usage (clap), 69 Redis unavailable, 70 internal error, 78 config
//! error. The units list 78 in `RestartPreventExitStatus=`: restarting cannot fix a config.

use crate::config::ConfigError;
use crate::ops::logging::LoggingError;
use crate::redis::RedisError;
use crate::supervisor::DaemonError;

/// sysexits.h: a configuration error. systemd units use it with RestartPreventExitStatus.
const EX_CONFIG: u8 = 78;
/// sysexits.h: a service we need (Redis) is unavailable.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: an internal error.
const EX_SOFTWARE: u8 = 70;

/// Why the process stops with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file cannot be used (also from `--check`).
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    /// `--log-level` is invalid, or a logger is already installed.
    #[error(transparent)]
    Logging(#[from] LoggingError),
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The daemon started but could not go on.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Logging(_) => EX_CONFIG,
            // A stream name that points at a key of another type: the config is wrong for
            // this Redis, and restarting would fail the same way.
            Error::Daemon(DaemonError::Redis(e)) if e.is_wrongtype() => EX_CONFIG,
            // The [redis] URL or TLS files, checked at load, became unusable since.
            Error::Daemon(DaemonError::Redis(e)) if e.is_config() => EX_CONFIG,
            Error::Daemon(DaemonError::Redis(RedisError::ConnectTimeout { .. })) => EX_UNAVAILABLE,
            Error::Daemon(DaemonError::MetricsListen { .. }) => EX_UNAVAILABLE,
            Error::Runtime(_) | Error::Signals(_) | Error::Daemon(_) => EX_SOFTWARE,
        }
    }

    /// Tells the operator: on stderr before logging is set up (config and logging
    /// errors), otherwise as an ERROR log line whose `error` field is the cause.
    pub fn report(&self) {
        let (message, error): (&str, &dyn std::fmt::Display) = match self {
            Error::Config(_) | Error::Logging(_) => {
                eprintln!("redis-streamd: {self}");
                return;
            }
            Error::Runtime(e) => ("cannot start the async runtime", e),
            Error::Signals(e) => ("cannot install signal handlers", e),
            Error::Daemon(DaemonError::Redis(e)) if e.is_wrongtype() => {
                ("a configured stream name is a key of another type", e)
            }
            Error::Daemon(DaemonError::Redis(e)) if e.is_config() => {
                ("cannot use the [redis] settings", e)
            }
            Error::Daemon(e @ DaemonError::Redis(RedisError::ConnectTimeout { .. })) => {
                ("giving up", e)
            }
            Error::Daemon(e @ DaemonError::MetricsListen { .. }) => ("cannot start", e),
            Error::Daemon(e) => ("fatal", e),
        };
        tracing::error!(%error, "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn redis_error(details: &str) -> RedisError {
        RedisError::Command(fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            details.to_string(),
        ))
    }

    fn io() -> std::io::Error {
        std::io::Error::other("no")
    }

    /// One of every variant (and of every distinction inside `Daemon`), with its code.
    fn every_error() -> Vec<(Error, u8)> {
        let config = ConfigError::Invalid {
            path: PathBuf::from("streamd.toml"),
            line: 3,
            key: "streams[0].name".into(),
            message: "is required".into(),
        };
        let read = ConfigError::Read {
            path: PathBuf::from("missing.toml"),
            source: io(),
        };
        let level = match tracing_subscriber::EnvFilter::try_new("info,[") {
            Err(e) => LoggingError::Level(e),
            Ok(_) => panic!("expected an invalid filter"),
        };
        let timeout = RedisError::ConnectTimeout {
            waited: Duration::from_secs(1),
            last: "refused".into(),
        };
        let listen = DaemonError::MetricsListen {
            addr: ([127, 0, 0, 1], 9187).into(),
            source: io(),
        };
        vec![
            (Error::Config(config), EX_CONFIG),
            (Error::Config(read), EX_CONFIG),
            (Error::Logging(level), EX_CONFIG),
            (Error::Runtime(io()), EX_SOFTWARE),
            (Error::Signals(io()), EX_SOFTWARE),
            (
                Error::Daemon(DaemonError::Redis(redis_error(
                    "WRONGTYPE Operation against a key holding the wrong kind of value",
                ))),
                EX_CONFIG,
            ),
            (Error::Daemon(DaemonError::Redis(timeout)), EX_UNAVAILABLE),
            (Error::Daemon(listen), EX_UNAVAILABLE),
            (
                Error::Daemon(DaemonError::Redis(redis_error("NOPERM no"))),
                EX_SOFTWARE,
            ),
            (
                Error::Daemon(DaemonError::Redis(RedisError::Url("x".into()))),
                EX_CONFIG,
            ),
        ]
    }

    #[test]
    fn exit_codes_follow_sysexits() {
        for (error, code) in every_error() {
            assert_eq!(error.exit_code(), code, "{error:?}");
        }
    }

    #[test]
    fn every_error_can_be_reported() {
        // Without a subscriber the log lines go nowhere; what matters is no panic.
        for (error, _) in every_error() {
            error.report();
        }
    }

    #[test]
    fn config_errors_keep_their_operator_message() {
        let (error, _) = every_error().remove(0);
        assert_eq!(
            error.to_string(),
            "config error: streamd.toml:3: streams[0].name: is required"
        );
        let (error, _) = every_error().remove(2);
        assert!(
            error.to_string().starts_with("invalid log level: "),
            "{error}"
        );
    }
}
