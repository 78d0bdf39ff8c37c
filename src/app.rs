//! Running the daemon as a process: the runtime, signal handlers, child subreaper and
//! reaper task around [`supervisor::run`]. `main` only parses the command line, loads the
//! config and maps the returned [`Error`] to an exit code.

use crate::config::Config;
use crate::error::Error;
use crate::ops::shutdown::Shutdown;
use crate::ops::{reaper, signals};
use crate::supervisor;
use tokio_util::sync::CancellationToken;

/// Runs the daemon with `config` until it is told to stop (Ok) or cannot go on. Logging
/// must be set up: from here on everything is reported as log lines.
pub fn run(config: Config) -> Result<(), Error> {
    // Each running handler takes descriptors: the soft limit (often 1,024) must not be
    // what makes healthy entries wait.
    match crate::exec::process::raise_nofile_limit() {
        Ok((before, now)) => {
            tracing::info!(
                before,
                now,
                "open file limit (RLIMIT_NOFILE) raised to the hard limit"
            )
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit (RLIMIT_NOFILE)"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        signals::listen(shutdown.clone(), config.daemon.shutdown_timeout, reload_tx)
            .map_err(Error::Signals)?;
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
        Ok(result?)
    })
}
