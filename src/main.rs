//! `redis-streamd --config FILE`: parse the command line, load the config, run the daemon,
//! and turn the outcome into an exit code (see [`Error::exit_code`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use redis_streamd::app;
use redis_streamd::config::{Config, Overrides};
use redis_streamd::error::Error;
use redis_streamd::ops::logging::{self, LogFormat};

/// Turns Redis Streams into work for ordinary programs: one consume loop per stream,
/// one handler process per entry, acked on exit 0, retried and dead-lettered on failure.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config file.
    #[arg(
        short,
        long,
        env = "REDIS_STREAMD_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<PathBuf>,

    /// Validate the config, print a summary of the streams and exit (0, or 78 when invalid)
    /// without connecting to Redis.
    #[arg(long)]
    check: bool,

    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "REDIS_STREAMD_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,

    /// Log filter, e.g. `info`, `debug`, `warn,redis_streamd=debug`. Default: RUST_LOG, or info.
    #[arg(long, env = "REDIS_STREAMD_LOG_LEVEL", global = true)]
    log_level: Option<String>,

    /// Operator commands; without one, run the daemon.
    #[command(subcommand)]
    command: Option<redis_streamd::admin::Command>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(config_path) = cli.config.as_deref() else {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config FILE (or REDIS_STREAMD_CONFIG) is required",
            )
            .exit()
    };
    if let Some(command) = cli.command {
        let level = cli.log_level.as_deref();
        return redis_streamd::admin::run(command, config_path, cli.log_format, level);
    }
    let config = match Config::load(config_path, &Overrides::from_process()) {
        Ok(config) => config,
        Err(error) => return exit(error.into()),
    };
    if cli.check {
        println!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    // Held until the end of main, so the last lines (the error too) are written.
    let _log_guard = match logging::init(cli.log_format, cli.log_level.as_deref()) {
        Ok(guard) => guard,
        Err(error) => return exit(error.into()),
    };
    match app::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => exit(error),
    }
}

fn exit(error: Error) -> ExitCode {
    error.report();
    ExitCode::from(error.exit_code())
}
