//! `redis-streamd --config FILE`: parse the command line, load the config, run the daemon,
//! and turn the outcome into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use redis_streamd::config::{Config, REDIS_URL_ENV};
use redis_streamd::ops::logging::{self, LogFormat};
use redis_streamd::ops::shutdown::Shutdown;
use redis_streamd::ops::{reaper, signals};
use redis_streamd::redis::RedisError;
use redis_streamd::supervisor::{self, DaemonError};
use tokio_util::sync::CancellationToken;

/// sysexits.h: a configuration error. systemd units use it with RestartPreventExitStatus.
const EX_CONFIG: u8 = 78;
/// sysexits.h: a service we need (Redis) is unavailable.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: an internal error.
const EX_SOFTWARE: u8 = 70;

/// Turns Redis Streams into work for ordinary programs: one consume loop per stream,
/// one handler process per entry, acked on exit 0, retried and dead-lettered on failure.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config file.
    #[arg(short, long, env = "REDIS_STREAMD_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// Validate the config, print a summary of the streams and exit (0, or 78 when invalid)
    /// without connecting to Redis.
    #[arg(long)]
    check: bool,

    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "REDIS_STREAMD_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// Log filter, e.g. `info`, `debug`, `warn,redis_streamd=debug`. Default: RUST_LOG, or info.
    #[arg(long, env = "REDIS_STREAMD_LOG_LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, std::env::var(REDIS_URL_ENV).ok()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("redis-streamd: config error: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if cli.check {
        println!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    let _log_guard = match logging::init(cli.log_format, cli.log_level.as_deref()) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("redis-streamd: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        let listening =
            signals::listen(shutdown.clone(), config.daemon.shutdown_timeout, reload_tx);
        if let Err(error) = listening {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::from(EX_SOFTWARE);
        }
        // Orphans of handlers (double forks) become ours and are reaped, so a container
        // with the daemon as PID 1 does not fill up with zombies.
        if let Err(error) = reaper::become_subreaper() {
            tracing::warn!(%error, "cannot become a child subreaper; orphaned handler descendants go to init");
        }
        let reaper_stop = CancellationToken::new();
        let reaper_task = reaper::spawn_reaper(reaper_stop.clone());
        let result = supervisor::run(config, shutdown, reload_rx).await;
        reaper_stop.cancel();
        let _ = reaper_task.await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            // A stream name that points at a key of another type: the config is wrong for
            // this Redis, and restarting would fail the same way.
            Err(DaemonError::Redis(error)) if error.is_config() => {
                tracing::error!(%error, "cannot use the [redis] settings");
                ExitCode::from(EX_CONFIG)
            }
            Err(DaemonError::Redis(error)) if error.is_wrongtype() => {
                tracing::error!(%error, "a configured stream name is a key of another type");
                ExitCode::from(EX_CONFIG)
            }
            Err(DaemonError::Redis(error @ RedisError::ConnectTimeout { .. })) => {
                tracing::error!(%error, "giving up");
                ExitCode::from(EX_UNAVAILABLE)
            }
            Err(error @ DaemonError::MetricsListen { .. }) => {
                tracing::error!(%error, "cannot start");
                ExitCode::from(EX_UNAVAILABLE)
            }
            Err(error) => {
                tracing::error!(%error, "fatal");
                ExitCode::from(EX_SOFTWARE)
            }
        }
    })
}
