//! The daemon: connections, one consume loop per stream, and the order of shutdown.

use std::time::Duration;

use fred::prelude::{Client, ClientLike};

use crate::config::Config;
use crate::consumer::StreamLoop;
use crate::redis::{self, RedisError};
use crate::shutdown::Shutdown;

/// How long closing the connections may take.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// Connects, sets up every group, runs the loops until `shutdown`, and drains them.
/// Returns `Ok` after a clean shutdown, including one requested while still connecting.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), DaemonError> {
    tracing::info!(
        redis = %config.redis.redacted_url(),
        consumer = %config.daemon.consumer,
        streams = config.streams.len(),
        "starting"
    );
    let commands = match redis::connect(&config.redis, shutdown.stop_token()).await {
        Ok(client) => client,
        Err(RedisError::Stopped) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    redis::log_connection_events(&commands, "commands");

    let mut loops = Vec::with_capacity(config.streams.len());
    let mut readers: Vec<Client> = Vec::with_capacity(config.streams.len());
    for stream in &config.streams {
        let reader = match redis::connect(&config.redis, shutdown.stop_token()).await {
            Ok(client) => client,
            Err(RedisError::Stopped) => break,
            Err(e) => return Err(e.into()),
        };
        redis::log_connection_events(&reader, "reader");
        readers.push(reader.clone());
        let stream_loop = StreamLoop::new(
            stream.clone(),
            &config.daemon.consumer,
            commands.clone(),
            reader,
            &shutdown,
        );
        match stream_loop.prepare(&shutdown).await {
            Ok(()) => loops.push(stream_loop),
            Err(RedisError::Stopped) => break,
            Err(e) => return Err(e.into()),
        }
    }

    let handles: Vec<_> = loops
        .into_iter()
        .map(|l| tokio::spawn(l.run(shutdown.clone())))
        .collect();
    if !shutdown.is_stopping() {
        tracing::info!(streams = handles.len(), "ready");
    }
    for handle in handles {
        if let Err(error) = handle.await {
            tracing::error!(%error, "a consume loop failed");
        }
    }

    for client in readers.iter().chain(std::iter::once(&commands)) {
        if tokio::time::timeout(QUIT_TIMEOUT, client.quit())
            .await
            .is_err()
        {
            tracing::warn!("redis connection did not close in time");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
