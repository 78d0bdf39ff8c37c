//! Seeing failovers as they happen: Sentinel's `+switch-master` announcements, the
//! primary in use, and Redis Cluster primary changes, for reconnects and metrics.
//!
//! Behind Sentinel a client that only reacts to errors resumes late: a demoted primary
//! stays a writable primary for seconds after the promotion (until Sentinel reconfigures
//! it), and a read blocked there never errors. So the daemon subscribes to
//! `+switch-master` on every sentinel named in the URL (one connection each, re-made with
//! backoff when lost) and, when the announced primary of its service changes, every
//! client reconnects, which asks the sentinels for the primary again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::{
    Builder, Client, ClientLike, Config as FredConfig, EventInterface, PubsubInterface,
    ServerConfig,
};
use fred::types::ClusterStateChange;
use fred::types::config::Server;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::ops::metrics::Metrics;

/// The Pub/Sub channel on which sentinels announce a new primary.
const SWITCH_CHANNEL: &str = "+switch-master";
/// Connecting to a sentinel and subscribing.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribes to `+switch-master` on every sentinel of `fred` (its `ServerConfig::Sentinel`
/// hosts, with the sentinel credentials and the TLS setup) until `stop`. The returned
/// receiver changes whenever the announced primary of `service` changes.
pub(crate) fn watch_switches(
    fred: &FredConfig,
    service: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let ServerConfig::Sentinel {
        hosts,
        username,
        password,
        ..
    } = &fred.server
    else {
        return rx;
    };
    let shared = Arc::new(Switches {
        service,
        last: Mutex::new(None),
        tx,
        metrics,
    });
    for host in hosts {
        let config = FredConfig {
            server: ServerConfig::Centralized {
                server: host.clone(),
            },
            username: username.clone(),
            password: password.clone(),
            tls: fred.tls.clone(),
            ..FredConfig::default()
        };
        tokio::spawn(subscribe_loop(
            config,
            host.to_string(),
            shared.clone(),
            stop.clone(),
        ));
    }
    rx
}

/// What every sentinel subscription reports to.
struct Switches {
    service: String,
    /// The last announced primary, so three sentinels announcing one failover count once.
    last: Mutex<Option<String>>,
    tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Switches {
    /// `<name> <old-ip> <old-port> <new-ip> <new-port>`.
    fn announced(&self, message: &str) {
        let parts: Vec<&str> = message.split_whitespace().collect();
        let [name, old_ip, old_port, new_ip, new_port] = parts[..] else {
            tracing::debug!(message, "ignoring a malformed +switch-master message");
            return;
        };
        if name != self.service {
            return;
        }
        let new = format!("{new_ip}:{new_port}");
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(new.as_str()) {
                return;
            }
            *last = Some(new.clone());
        }
        tracing::warn!(
            service = %self.service,
            from = %format!("{old_ip}:{old_port}"),
            to = %new,
            "sentinels switched the primary; reconnecting to it"
        );
        self.metrics.redis_failover();
        self.tx.send_modify(|epoch| *epoch = epoch.wrapping_add(1));
    }
}

/// One sentinel's subscription, re-made with backoff whenever it is lost.
async fn subscribe_loop(
    config: FredConfig,
    sentinel: String,
    shared: Arc<Switches>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::redis();
    loop {
        let outcome = tokio::select! {
            outcome = subscribe_once(&config, &shared, &mut backoff) => outcome,
            _ = stop.cancelled() => return,
        };
        let delay = backoff.fail();
        tracing::debug!(%sentinel, error = %outcome, retry_in = ?delay, "sentinel subscription lost");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Connects, subscribes and relays messages until the connection ends; returns why.
async fn subscribe_once(config: &FredConfig, shared: &Switches, backoff: &mut Backoff) -> String {
    // No reconnect policy: the router task ends with the connection, and we start over.
    let client = match Builder::from_config(config.clone())
        .with_performance_config(|perf| perf.broadcast_channel_capacity = 16)
        .with_connection_config(|conn| {
            conn.connection_timeout = SETUP_TIMEOUT;
            conn.internal_command_timeout = SETUP_TIMEOUT;
        })
        .build()
    {
        Ok(client) => client,
        Err(error) => return error.to_string(),
    };
    let mut messages = client.message_rx();
    let router = match tokio::time::timeout(SETUP_TIMEOUT, client.init()).await {
        Ok(Ok(router)) => router,
        Ok(Err(error)) => return error.to_string(),
        Err(_) => return "no answer".to_string(),
    };
    let subscribed = tokio::time::timeout(SETUP_TIMEOUT, client.subscribe(SWITCH_CHANNEL)).await;
    match subscribed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return error.to_string(),
        Err(_) => return "no answer to SUBSCRIBE".to_string(),
    }
    backoff.reset();
    let mut router = router;
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => {
                    if let Some(text) = message.value.as_str() {
                        shared.announced(&text);
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return "closed".to_string(),
            },
            ended = &mut router => {
                return match ended {
                    Ok(Ok(())) => "connection closed".to_string(),
                    Ok(Err(error)) => error.to_string(),
                    Err(error) => error.to_string(),
                };
            }
        }
    }
}

/// Keeps `redis_streamd_redis_primary` on the primary `client` (the commands client,
/// behind Sentinel) is connected to, until the client is closed.
pub(crate) fn track_primary(client: &Client, metrics: Arc<Metrics>) {
    if let Some(primary) = client.active_connections().first() {
        metrics.set_redis_primary(&primary.to_string());
    }
    let mut reconnects = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            match reconnects.recv().await {
                Ok(server) => metrics.set_redis_primary(&server.to_string()),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// Counts Redis Cluster primaries added or removed as seen by `client` (the commands
/// client) in `redis_streamd_redis_failovers_total`, until the client is closed.
pub(crate) fn count_cluster_changes(client: &Client, metrics: Arc<Metrics>) {
    let mut changes = client.cluster_change_rx();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(changes) => {
                    let moved: Vec<String> = changes
                        .iter()
                        .filter_map(|change| match change {
                            ClusterStateChange::Add(s) => Some(format!("+{}", addr(s))),
                            ClusterStateChange::Remove(s) => Some(format!("-{}", addr(s))),
                            ClusterStateChange::Rebalance => None,
                        })
                        .collect();
                    if !moved.is_empty() {
                        tracing::info!(primaries = %moved.join(" "), "redis cluster primaries changed");
                        metrics.redis_failover();
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
}

fn addr(server: &Server) -> String {
    format!("{}:{}", server.host, server.port)
}
