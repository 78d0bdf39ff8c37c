//! Connecting fred clients, and watching their connections.
//!
//! Two kinds of client exist: one *reader* per stream, which spends its life inside
//! `XREADGROUP BLOCK` (fred queues any other command sent on a client that is blocked, so
//! a shared one would stall acks for up to `block`), and one shared *command* client for
//! acks, claims and dead-letter writes.

use std::time::Instant;

use fred::prelude::{
    Builder, Client, ClientLike, Config as FredConfig, EventInterface, ReconnectPolicy,
};
use tokio_util::sync::CancellationToken;

use super::RedisError;
use crate::backoff::Backoff;
use crate::config::RedisConfig;

/// Connects a new client, retrying with backoff until it works, `connect_timeout` passes
/// or `stop` is cancelled. Once connected, the client reconnects by itself forever, and
/// commands sent meanwhile wait for the connection to come back.
pub async fn connect(cfg: &RedisConfig, stop: &CancellationToken) -> Result<Client, RedisError> {
    let fred_config = FredConfig::from_url(&cfg.url).map_err(|e| {
        // fred's message may quote the URL; never let the password reach a log line.
        RedisError::Url(format!("{} ({:?})", cfg.redacted_url(), e.kind()))
    })?;
    let started = Instant::now();
    let mut backoff = Backoff::redis();
    loop {
        let client = Builder::from_config(fred_config.clone())
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            // Each client's event channels are allocated up front; we listen to two,
            // and a lagged receiver is handled. With one client per stream this is
            // most of an idle daemon's per-stream memory.
            .with_performance_config(|perf| perf.broadcast_channel_capacity = 4)
            .build()?;
        let attempt = tokio::select! {
            r = client.init() => r,
            _ = stop.cancelled() => return Err(RedisError::Stopped),
        };
        match attempt {
            Ok(_handle) => return Ok(client),
            Err(e) => {
                let waited = started.elapsed();
                // Never sleep past connect_timeout: the last wait is cut to what is left.
                let left = cfg
                    .connect_timeout
                    .map(|limit| limit.saturating_sub(waited));
                if left.is_some_and(|left| left.is_zero()) {
                    return Err(RedisError::ConnectTimeout {
                        waited,
                        last: e.to_string(),
                    });
                }
                let delay = backoff.fail();
                let delay = left.map_or(delay, |left| delay.min(left));
                tracing::warn!(
                    redis = %cfg.redacted_url(),
                    error = %e,
                    retry_in = ?delay,
                    "redis unreachable, retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(RedisError::Stopped),
                }
            }
        }
    }
}

/// Logs connection loss and recovery of `client` until it is dropped, and tells
/// `on_change` (false: lost, true: connected again), e.g. for health and metrics.
pub fn watch_connection(
    client: &Client,
    role: &'static str,
    on_change: impl Fn(bool) + Send + 'static,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                e = errors.recv() => match e {
                    Ok((error, _)) => {
                        tracing::warn!(role, %error, "redis connection lost");
                        on_change(false);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                r = reconnects.recv() => match r {
                    Ok(_) => {
                        tracing::info!(role, "redis connection restored");
                        on_change(true);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
}
