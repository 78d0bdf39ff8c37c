//! Unix signals: SIGTERM and SIGINT drive the two shutdown stages.
//!
//! The first signal stops reading and starts the `shutdown_timeout` clock; when it runs
//! out, or on a second signal, running handlers are terminated. signal-hook-tokio installs
//! real handlers, which also makes the signals reach us when we run as PID 1 in a
//! container (the kernel drops default-action signals to PID 1). SIGHUP asks the daemon
//! to reload its config.

use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ops::shutdown::Shutdown;

/// Starts listening. The returned task ends once shutdown has reached the abort stage.
pub fn listen(
    shutdown: Shutdown,
    shutdown_timeout: Duration,
    reload: mpsc::UnboundedSender<()>,
) -> std::io::Result<JoinHandle<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    Ok(tokio::spawn(async move {
        let mut abort_at: Option<Instant> = None;
        loop {
            let timeout = async move {
                match abort_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = signals.next() => match signal {
                    Some(SIGHUP) => {
                        tracing::info!("SIGHUP received: reloading the config");
                        let _ = reload.send(());
                    }
                    Some(signal) if !shutdown.is_stopping() => {
                        tracing::info!(
                            signal = signal_name(signal),
                            timeout = %humantime::format_duration(shutdown_timeout),
                            "shutting down: no new reads, waiting for running handlers"
                        );
                        shutdown.stop();
                        abort_at = Some(Instant::now() + shutdown_timeout);
                    }
                    Some(signal) => {
                        tracing::warn!(
                            signal = signal_name(signal),
                            "second signal: terminating running handlers now"
                        );
                        shutdown.abort();
                        break;
                    }
                    None => break,
                },
                _ = timeout => {
                    tracing::warn!("shutdown_timeout reached: terminating running handlers");
                    shutdown.abort();
                    break;
                }
                // Shutdown can also begin without a signal (e.g. a fatal error); then the
                // same clock applies.
                _ = shutdown.stopping(), if abort_at.is_none() => {
                    abort_at = Some(Instant::now() + shutdown_timeout);
                }
            }
        }
        handle.close();
    }))
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
