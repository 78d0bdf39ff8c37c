//! Connecting fred clients, and watching their connections.
//!
//! Two kinds of client exist ([`Role`]): one *reader* per stream, which spends its life
//! inside `XREADGROUP BLOCK` (fred queues any other command sent on a client that is
//! blocked, so a shared one would stall acks for up to `block`), and one shared *commands*
//! client for acks, claims and dead-letter writes. Each is a fred client of the URL's kind:
//! in a Redis Cluster it has a connection to every primary (and one back channel) and
//! sends each command to the node owning its key, following `MOVED`/`ASK`; behind
//! Sentinel it asks the sentinels for the primary at every (re)connect.
//!
//! Failover handling, all in fred's reconnect machinery: a reply that means "this node is
//! no longer the primary" (`READONLY`, `MASTERDOWN`, `LOADING`, `CLUSTERDOWN`, and the
//! `UNBLOCKED force unblock` a blocked read gets when its node is demoted) closes the
//! connection, and the command is sent again after the reconnect, which in Sentinel
//! mode asks the sentinels for the primary again and in Cluster mode refreshes the slot
//! map. Sentinel's `+switch-master` announcements make every client reconnect at once
//! (see [`super::failover`]): the demoted primary stays writable for seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{
    Builder, Client, ClientLike, Config as FredConfig, EventInterface, ReconnectPolicy,
};
use fred::types::config::{ReconnectError, TlsConfig, TlsHostMapping, UnresponsiveConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::url::{Deployment, Target};
use super::{RedisError, failover, tls, url};
use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::ops::metrics::Metrics;

/// Reconnect delays: 100 ms doubling to this, forever. Short, because after a failover
/// the new primary is usually there within seconds.
const RECONNECT_MAX_DELAY_MS: u32 = 2_000;
/// TCP connect + TLS handshake, and the commands fred sends itself (AUTH, SELECT, ROLE,
/// CLUSTER SLOTS): a node that accepts but does not answer (frozen) is given up on
/// after this and the next one tried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A commands connection whose oldest command has waited this long for its reply is
/// treated as dead (reconnect, command sent again). Never applies to a blocked read.
const COMMANDS_UNRESPONSIVE: Duration = Duration::from_secs(10);

/// The same connection error again within this long is not logged again.
const REPEATED_ERROR: Duration = Duration::from_secs(1);
/// A router that ran this long before it ended restarts after the shortest delay.
const ROUTER_STABLE: Duration = Duration::from_secs(30);

/// What a client is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The shared client for everything but blocking reads.
    Commands,
    /// One stream's blocking reads.
    Reader,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Commands => "commands",
            Role::Reader => "reader",
        }
    }
}

/// Makes the daemon's clients for one `[redis]` config. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    cfg: RedisConfig,
    fred: FredConfig,
    deployment: Deployment,
    metrics: Arc<Metrics>,
    /// Sentinel mode: bumped on every `+switch-master` of our primary.
    switches: Option<watch::Receiver<u64>>,
}

impl Connector {
    /// Parses the URL and TLS files again (config validation checked them: an error here
    /// means a file changed since) and, behind Sentinel, starts listening to the sentinels'
    /// `+switch-master` until `stop`.
    pub fn new(
        cfg: &RedisConfig,
        metrics: Arc<Metrics>,
        stop: &CancellationToken,
    ) -> Result<Connector, RedisError> {
        let target = url::parse(&cfg.url).map_err(RedisError::Url)?;
        let fred = fred_config(&target, cfg)?;
        let switches = match (&target.service_name, target.deployment) {
            (Some(service), Deployment::Sentinel) => Some(failover::watch_switches(
                &fred,
                service.clone(),
                metrics.clone(),
                stop.clone(),
            )),
            _ => None,
        };
        Ok(Connector {
            cfg: cfg.clone(),
            fred,
            deployment: target.deployment,
            metrics,
            switches,
        })
    }

    /// A connector for one-off clients (operator commands): no Sentinel subscription, no
    /// metrics anyone reads.
    pub fn plain(cfg: &RedisConfig) -> Result<Connector, RedisError> {
        let target = url::parse(&cfg.url).map_err(RedisError::Url)?;
        Ok(Connector {
            cfg: cfg.clone(),
            fred: fred_config(&target, cfg)?,
            deployment: target.deployment,
            metrics: Metrics::new(),
            switches: None,
        })
    }

    /// Connects a new client, retrying with backoff until it works, `connect_timeout`
    /// passes or `stop` is cancelled. Once connected, the client reconnects by itself
    /// forever, and commands sent meanwhile wait for the connection to come back.
    pub async fn connect(
        &self,
        role: Role,
        stop: &CancellationToken,
    ) -> Result<Client, RedisError> {
        let started = Instant::now();
        let mut backoff = Backoff::redis();
        loop {
            let client = self.build(role)?;
            let attempt = tokio::select! {
                r = client.init() => r,
                _ = stop.cancelled() => return Err(RedisError::Stopped),
            };
            let error = match attempt {
                Ok(router) => {
                    self.follow(&client, role);
                    keep_routing(&client, router, role);
                    return Ok(client);
                }
                Err(e) => RedisError::connect(e),
            };
            let waited = started.elapsed();
            // Never sleep past connect_timeout: the last wait is cut to what is left.
            let left = self
                .cfg
                .connect_timeout
                .map(|limit| limit.saturating_sub(waited));
            if left.is_some_and(|left| left.is_zero()) {
                return Err(RedisError::ConnectTimeout {
                    waited,
                    last: error.to_string(),
                });
            }
            let delay = backoff.fail();
            let delay = left.map_or(delay, |left| delay.min(left));
            tracing::warn!(
                redis = %self.cfg.redacted_url(),
                role = role.as_str(),
                %error,
                retry_in = ?delay,
                "redis unreachable, retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err(RedisError::Stopped),
            }
        }
    }

    fn build(&self, role: Role) -> Result<Client, RedisError> {
        let client = Builder::from_config(self.fred.clone())
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                100,
                RECONNECT_MAX_DELAY_MS,
                2,
            ))
            // Each client's event channels are allocated up front; we listen to two,
            // and a lagged receiver is handled. With one client per stream this is
            // most of an idle daemon's per-stream memory.
            .with_performance_config(|perf| perf.broadcast_channel_capacity = 4)
            .with_connection_config(|conn| {
                conn.connection_timeout = SETUP_TIMEOUT;
                conn.internal_command_timeout = SETUP_TIMEOUT;
                conn.reconnect_errors = vec![
                    ReconnectError::ReadOnly,
                    ReconnectError::MasterDown,
                    ReconnectError::Loading,
                    ReconnectError::ClusterDown,
                    ReconnectError::Custom("UNBLOCKED force unblock"),
                ];
                if role == Role::Commands {
                    conn.unresponsive = UnresponsiveConfig {
                        max_timeout: Some(COMMANDS_UNRESPONSIVE),
                        interval: Duration::from_secs(1),
                    };
                }
            })
            .build()?;
        Ok(client)
    }

    /// Behind Sentinel: reconnect `client` (asking the sentinels for the primary) at every
    /// `+switch-master`, until the client is closed. The commands client also keeps the
    /// primary gauge up to date.
    fn follow(&self, client: &Client, role: Role) {
        if self.deployment == Deployment::Cluster && role == Role::Commands {
            failover::count_cluster_changes(client, self.metrics.clone());
        }
        let Some(mut switches) = self.switches.clone() else {
            return;
        };
        if role == Role::Commands {
            failover::track_primary(client, self.metrics.clone());
        }
        let client = client.clone();
        // Ends when the client is closed: quit() closes its event channels.
        let mut closed = client.reconnect_rx();
        switches.mark_unchanged();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    changed = switches.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        tracing::info!(role = role.as_str(), "sentinels announced a new primary; reconnecting");
                        if let Err(error) = client.force_reconnection().await {
                            tracing::warn!(role = role.as_str(), %error, "reconnecting to the new primary failed; retrying");
                        }
                    }
                    event = closed.recv() => {
                        if matches!(event, Err(RecvError::Closed)) {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Restarts `client`'s router task whenever it ends with an error, until the client is
/// closed (`quit`, which ends it cleanly).
///
/// With an unlimited reconnect policy the router should never end, but fred 10.1 ends it
/// when a command runs out of attempts while following `ASK`: it sends `ASKING` to the
/// importing node but the command itself to the slot's old owner, which answers `ASK`
/// again, and the error ends the router (`Routing Error: Max attempts reached`). The
/// client then hangs every later command. This happens for every key of a slot being
/// migrated, between MIGRATE and `CLUSTER SETSLOT ... NODE`. Restarting the router
/// (`connect()` again) keeps the commands queued meanwhile; the failed command's caller
/// gets the error and retries.
fn keep_routing(client: &Client, router: fred::types::ConnectHandle, role: Role) {
    let client = client.clone();
    tokio::spawn(async move {
        let mut router = router;
        let mut backoff = Backoff::redis();
        loop {
            let started = Instant::now();
            let ended = router.await;
            if started.elapsed() > ROUTER_STABLE {
                backoff.reset();
            }
            let error = match ended {
                Ok(Ok(())) => return,
                Ok(Err(error)) if error.is_canceled() => return,
                Ok(Err(error)) => error.to_string(),
                Err(join_error) => join_error.to_string(),
            };
            let delay = backoff.fail();
            tracing::warn!(
                role = role.as_str(),
                %error,
                restart_in = ?delay,
                "redis client stopped; restarting it"
            );
            tokio::time::sleep(delay).await;
            router = client.connect();
        }
    });
}

/// One commands client for `cfg`, connected as [`Connector::connect`] does (for operator
/// commands, which need no Sentinel subscription).
pub async fn connect(cfg: &RedisConfig, stop: &CancellationToken) -> Result<Client, RedisError> {
    Connector::plain(cfg)?.connect(Role::Commands, stop).await
}

/// fred's configuration for `target`, with TLS set up from the `[redis]` TLS files.
fn fred_config(target: &Target, cfg: &RedisConfig) -> Result<FredConfig, RedisError> {
    let mut fred = target.fred.clone();
    if target.tls {
        let rustls = tls::client_config(&cfg.tls).map_err(RedisError::Tls)?;
        fred.tls = Some(TlsConfig {
            connector: rustls.into(),
            // Verify each node by the address it is reached at (the cluster's announced
            // addresses, the sentinels' view of the primary).
            hostnames: TlsHostMapping::None,
        });
    }
    Ok(fred)
}

/// Logs connection loss and recovery of `client` until it is closed, and tells
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
        // fred reports an error that closes a connection twice (as the reply, then as the
        // connection's end): one log line is enough.
        let mut last: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                e = errors.recv() => match e {
                    Ok((error, server)) => {
                        let error = RedisError::connect(error);
                        let node = server.map(|s| s.to_string()).unwrap_or_default();
                        let text = format!("{node} {error}");
                        let repeated = last.as_ref().is_some_and(|(previous, at)| {
                            *previous == text && at.elapsed() < REPEATED_ERROR
                        });
                        if !repeated {
                            tracing::warn!(role, %error, node, "redis connection lost");
                        }
                        last = Some((text, Instant::now()));
                        on_change(false);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                r = reconnects.recv() => match r {
                    Ok(server) => {
                        tracing::info!(role, node = %server, "redis connection restored");
                        on_change(true);
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use fred::prelude::KeysInterface;

    use super::*;
    use crate::redis::tls::TlsFiles;
    use crate::redis::tls::test_pki::{self, Pki};
    use crate::test_support::RedisServer as Server;

    /// redis-server with TLS only, on a free port.
    fn start_tls(pki: &Pki, auth_clients: bool) -> Server {
        Server::start_with(|port| tls_args(pki, port, auth_clients))
    }

    fn tls_args(pki: &Pki, port: u16, auth_clients: bool) -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&pki.server_cert),
            "--tls-key-file".into(),
            path(&pki.server_key),
            "--tls-ca-cert-file".into(),
            path(&pki.ca),
            "--tls-auth-clients".into(),
            if auth_clients { "yes" } else { "no" }.into(),
        ]
    }

    fn config(url: String, tls: TlsFiles) -> RedisConfig {
        RedisConfig {
            url,
            connect_timeout: Some(Duration::from_secs(2)),
            tls,
        }
    }

    async fn try_connect(cfg: &RedisConfig) -> Result<(), RedisError> {
        let stop = CancellationToken::new();
        let connector = Connector::new(cfg, Metrics::new(), &stop)?;
        let client = connector.connect(Role::Commands, &stop).await?;
        let _: () = client.set("k", "v", None, None, false).await?;
        let _ = client.quit().await;
        Ok(())
    }

    #[tokio::test]
    async fn tls_with_a_private_ca_and_client_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = test_pki::make(dir.path());
        let other = tempfile::tempdir().expect("tempdir");
        let other_pki = test_pki::make(other.path());
        let ca_only = TlsFiles {
            ca_file: Some(pki.ca.clone()),
            ..TlsFiles::default()
        };
        let with_client = TlsFiles {
            cert_file: Some(pki.client_cert.clone()),
            key_file: Some(pki.client_key.clone()),
            ..ca_only.clone()
        };

        let open = start_tls(&pki, false);
        let url = format!("rediss://127.0.0.1:{}", open.port);
        try_connect(&config(url.clone(), ca_only.clone()))
            .await
            .expect("CA file only, server without client authentication");
        let wrong_ca = TlsFiles {
            ca_file: Some(other_pki.ca.clone()),
            ..TlsFiles::default()
        };
        let error = try_connect(&config(url, wrong_ca))
            .await
            .expect_err("server certificate from another CA");
        assert!(error.to_string().contains("did not verify"), "{error}");

        let strict = start_tls(&pki, true);
        let url = format!("rediss://127.0.0.1:{}", strict.port);
        try_connect(&config(url.clone(), with_client))
            .await
            .expect("client certificate");
        let error = try_connect(&config(url.clone(), ca_only))
            .await
            .expect_err("no client certificate");
        assert!(
            error.to_string().contains("requires a client certificate"),
            "{error}"
        );
        let foreign_client = TlsFiles {
            ca_file: Some(pki.ca.clone()),
            cert_file: Some(other_pki.client_cert.clone()),
            key_file: Some(other_pki.client_key.clone()),
        };
        let error = try_connect(&config(url, foreign_client))
            .await
            .expect_err("client certificate from another CA");
        assert!(
            error.to_string().contains("refused the connection"),
            "{error}"
        );
    }

    /// Every connection of a `rediss-cluster://` client uses TLS with the configured CA
    /// and client certificate: keys on all three primaries of a TLS-only cluster.
    #[tokio::test]
    async fn tls_cluster_reaches_every_primary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = test_pki::make(dir.path());
        let nodes: Vec<Server> = (0..3)
            .map(|_| {
                Server::start_with(|port| {
                    let mut args = tls_args(&pki, port, true);
                    args.extend(
                        ["--cluster-enabled", "yes", "--tls-cluster", "yes"].map(String::from),
                    );
                    args
                })
            })
            .collect();
        let path = |p: &std::path::Path| p.display().to_string();
        let mut create = std::process::Command::new("redis-cli");
        create
            .args(["--tls", "--cacert", &path(&pki.ca)])
            .args([
                "--cert",
                &path(&pki.client_cert),
                "--key",
                &path(&pki.client_key),
            ])
            .arg("--cluster")
            .arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );

        let cfg = RedisConfig {
            url: format!("rediss-cluster://127.0.0.1:{}", nodes[0].port),
            connect_timeout: Some(Duration::from_secs(20)),
            tls: TlsFiles {
                ca_file: Some(pki.ca.clone()),
                cert_file: Some(pki.client_cert.clone()),
                key_file: Some(pki.client_key.clone()),
            },
        };
        let stop = CancellationToken::new();
        let connector = Connector::new(&cfg, Metrics::new(), &stop).expect("connector");
        let client = connector
            .connect(Role::Commands, &stop)
            .await
            .expect("connect");
        // "a", "b" and "c" hash to slots owned by the three primaries.
        for key in ["a", "b", "c"] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                // The cluster may still be agreeing on its slots right after creation.
                match client.set::<(), _, _>(key, "v", None, None, false).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(%e, "cluster not ready yet");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("SET {key}: {e}"),
                }
            }
        }
        assert_eq!(client.active_connections().len(), 3);
        let _ = client.quit().await;
    }
}
