//! Operator commands (issue #13): `redis-streamd status` and `redis-streamd dlq
//! ls|show|stats|replay|purge`, run from the daemon's binary with the daemon's config.
//!
//! - [`status`]: streams, groups, consumers (dead ones flagged) and DLQ sizes.
//! - [`dlq`]: reading, selecting and moving dead-letter entries.
//! - [`filter`]: the `--reason`, `--exit-code`, `--since`, ... selection flags.
//! - [`conn`]: the bounded, binary-safe Redis commands they use.
//! - [`output`], [`timefmt`], [`confirm`], [`progress`]: what the operator sees.
//!
//! Exit codes: 0 done, 1 nothing matched (or the confirmation was declined), 2 usage,
//! 69 Redis unreachable, 70 internal error, 78 config error, 130 stopped by Ctrl-C.

mod confirm;
mod conn;
mod dlq;
mod filter;
mod output;
mod progress;
mod status;
mod timefmt;

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Overrides};
use crate::ops::logging::{self, LogFormat};
use crate::redis::RedisError;
use output::note;

pub use dlq::DlqCommand;
pub use status::StatusArgs;

/// The operator subcommands of `redis-streamd`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Per stream and group: length, lag, pending, oldest pending entry, consumers (dead
    /// ones flagged) and the dead-letter stream. Needs no running daemon.
    Status(StatusArgs),
    /// Inspect, replay and purge the dead-letter streams.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// Exit 0.
    Ok,
    /// Exit 1: nothing matched the IDs or filters (for scripts), or the operator
    /// declined the confirmation.
    Nothing,
    /// Exit 130: stopped by SIGINT/SIGTERM after printing what was done.
    Interrupted,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// Exit 2.
    #[error("{0}")]
    Usage(String),
    /// Exit 78.
    #[error("config error: {0}")]
    Config(String),
    /// Exit 69.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Exit 69 (connection trouble), 78 (a key of the wrong type) or 70.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// Exit 70 (stdout gone is not an error: see [`run`]).
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

/// sysexits.h codes, as the daemon uses them.
const EX_USAGE: u8 = 2;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_CONFIG: u8 = 78;
/// 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
const EX_INTERRUPTED: u8 = 130;

impl AdminError {
    fn exit_code(&self) -> u8 {
        match self {
            AdminError::Usage(_) => EX_USAGE,
            AdminError::Config(_) => EX_CONFIG,
            AdminError::Unavailable(_) => EX_UNAVAILABLE,
            AdminError::Redis(e) if e.is_wrongtype() => EX_CONFIG,
            AdminError::Redis(RedisError::Command(e)) => {
                use fred::error::ErrorKind;
                match e.kind() {
                    ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled => EX_UNAVAILABLE,
                    _ if e.details().starts_with("CLUSTERDOWN")
                        || e.details().starts_with("LOADING") =>
                    {
                        EX_UNAVAILABLE
                    }
                    _ => EX_SOFTWARE,
                }
            }
            AdminError::Redis(_) | AdminError::Io(_) => EX_SOFTWARE,
        }
    }

    fn is_broken_pipe(&self) -> bool {
        matches!(self, AdminError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Runs one operator command with the config at `config_path` and returns the exit code.
pub fn run(
    command: Command,
    config_path: &Path,
    log_format: LogFormat,
    log_level: Option<&str>,
) -> ExitCode {
    let config = match Config::load(config_path, &Overrides::from_process()) {
        Ok(config) => config,
        Err(error) => {
            note!("redis-streamd: config error: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let _log_guard = match logging::init(log_format, log_level) {
        Ok(guard) => guard,
        Err(error) => {
            note!("redis-streamd: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            note!("redis-streamd: cannot start the async runtime: {error}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let result = runtime.block_on(dispatch(command, &config));
    match result {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::Nothing) => ExitCode::from(1),
        Ok(Done::Interrupted) => ExitCode::from(EX_INTERRUPTED),
        // `dlq ls | head`: the reader has all it wanted.
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            note!("redis-streamd: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn dispatch(command: Command, config: &Config) -> Result<Done, AdminError> {
    match command {
        Command::Status(args) => status::run(args, config).await,
        Command::Dlq(cmd) => dlq::run(cmd, config).await,
    }
}

/// The configured streams named `--stream` (all without it); a name that is not
/// configured is a usage error.
pub(crate) fn selected_streams<'a>(
    config: &'a Config,
    stream: Option<&str>,
) -> Result<Vec<&'a crate::config::StreamConfig>, AdminError> {
    let streams: Vec<_> = config
        .streams
        .iter()
        .filter(|s| stream.is_none_or(|name| s.name == name))
        .collect();
    if streams.is_empty() {
        let known: Vec<&str> = config.streams.iter().map(|s| s.name.as_str()).collect();
        return Err(AdminError::Usage(format!(
            "no stream {:?} in {} (configured: {})",
            stream.unwrap_or_default(),
            config.path.display(),
            known.join(", ")
        )));
    }
    Ok(streams)
}
