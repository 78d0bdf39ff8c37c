//! Log output: text for terminals, one JSON object per line for collectors.
//!
//! Lines go to stderr through a non-blocking writer so a slow terminal or journald never
//! stalls the runtime; if the writer falls behind, lines are dropped rather than waited on.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Lines buffered for the writer thread before new ones are dropped.
const LOG_BUFFER_LINES: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `level` (from `--log-level`) wins over `RUST_LOG`;
/// with neither, `info`. Keep the guard alive until exit so buffered lines are written.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<WorkerGuard, String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .map_err(|e| format!("invalid log level: {e}"))?;
    // The default buffer (128,000 lines) is allocated up front: 4 MiB of idle memory for
    // a burst the writer thread drains in microseconds anyway.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|e| format!("cannot install logger: {e}"))?;
    Ok(guard)
}
