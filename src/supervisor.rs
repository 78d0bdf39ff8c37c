//! The daemon: connections, one consume loop per stream, reload, and the order of shutdown.
//!
//! Each stream's loop runs in its own task with a child [`Shutdown`], so a reload can stop
//! one stream (its running handlers finish first) while the others go on.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use fred::prelude::{Client, ClientLike};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides, StreamConfig};
use crate::exec::KILL_GRACE;
use crate::ops::http::{self, Health};
use crate::ops::metrics::Metrics;
use crate::ops::notify::{self, Liveness};
use crate::ops::shutdown::Shutdown;
use crate::redis::{self, RedisError};
use crate::stream::upkeep::FINAL_FLUSH;
use crate::stream::{LoopHooks, StreamLoop};

/// How often the systemd status line (in-flight and settled counts) is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// How long closing the shared connection may take.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("cannot listen on metrics_listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A stream is identified by its key and group: the pair config validation keeps unique.
type StreamKey = (String, String);

fn key_of(cfg: &StreamConfig) -> StreamKey {
    (cfg.name.clone(), cfg.group.clone())
}

/// One stream's loop as the daemon sees it.
struct Running {
    cfg: StreamConfig,
    stop: Shutdown,
    handle: JoinHandle<()>,
}

struct Daemon {
    config: Config,
    connector: redis::Connector,
    commands: Client,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    liveness: Arc<Liveness>,
    loops: HashMap<StreamKey, Running>,
    /// Loops of removed streams, still finishing their handlers.
    retiring: JoinSet<()>,
}

/// Connects, sets up every group, runs the loops until `shutdown`, and drains them.
/// `reloads` delivers SIGHUP requests. Returns `Ok` after a clean shutdown, including
/// one requested while still connecting.
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    mut reloads: mpsc::UnboundedReceiver<()>,
) -> Result<(), DaemonError> {
    tracing::info!(
        redis = %config.redis.redacted_url(),
        consumer = %config.daemon.consumer,
        streams = config.streams.len(),
        "starting"
    );
    let metrics = Metrics::new();
    let health = Health::new(config.streams.len());
    let liveness = Liveness::new();
    // Ends the side services (metrics endpoint, watchdog) at exit, not at the start of
    // shutdown: /healthz and the watchdog stay useful while handlers drain.
    let exiting = CancellationToken::new();
    let _exit_guard = exiting.clone().drop_guard();
    if let Some(addr) = config.daemon.metrics_listen {
        serve_metrics(addr, &metrics, &health, &exiting).await?;
    }
    notify::spawn_watchdog(liveness.clone(), exiting.clone());

    let connector = redis::Connector::new(&config.redis, metrics.clone(), &exiting)?;
    let commands = match connector
        .connect(redis::Role::Commands, shutdown.stop_token())
        .await
    {
        Ok(client) => client,
        Err(RedisError::Stopped) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    health.set_redis_connected(true);
    redis::watch_connection(&commands, "commands", {
        let (health, metrics) = (health.clone(), metrics.clone());
        move |connected| {
            health.set_redis_connected(connected);
            if connected {
                metrics.redis_reconnect();
            }
        }
    });

    let mut daemon = Daemon {
        config,
        connector,
        commands,
        shutdown,
        metrics,
        health,
        liveness,
        loops: HashMap::new(),
        retiring: JoinSet::new(),
    };
    daemon.start_all().await?;
    let mut status_ticks = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            _ = daemon.shutdown.stopping() => break,
            Some(()) = reloads.recv() => daemon.reload().await,
            _ = status_ticks.tick(), if notify::enabled() => {
                notify::status(&daemon.metrics.status_line(daemon.loops.len())).await;
            }
        }
    }
    daemon.stop().await;
    Ok(())
}

/// Binds the metrics listener (before connecting to Redis: a port clash is a start-up
/// error, at once) and serves it until `exiting`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    exiting: &CancellationToken,
) -> Result<(), DaemonError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::MetricsListen { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        exiting.clone(),
    ));
    Ok(())
}

impl Daemon {
    /// Starts a loop per configured stream and waits until every group exists and every
    /// loop is about to read; then tells systemd we are ready. The first loop that cannot
    /// start (its error) stops them all.
    async fn start_all(&mut self) -> Result<(), DaemonError> {
        let (prepared_tx, mut prepared_rx) = mpsc::unbounded_channel();
        for cfg in self.config.streams.clone() {
            let running = self.start(cfg, None, Some(prepared_tx.clone()));
            self.loops.insert(key_of(&running.cfg), running);
        }
        drop(prepared_tx);
        let mut startup_error = None;
        for _ in 0..self.loops.len() {
            // `None`: a loop task ended without reporting (it panicked); its error is logged.
            let Some(prepared) = prepared_rx.recv().await else {
                break;
            };
            if let Err(error) = prepared {
                startup_error.get_or_insert(error);
                self.shutdown.abort();
            }
        }
        if let Some(error) = startup_error {
            self.wait_all().await;
            return Err(error.into());
        }
        if !self.shutdown.is_stopping() {
            tracing::info!(streams = self.loops.len(), "ready");
            notify::ready().await;
            notify::status(&format!("consuming {} streams", self.loops.len())).await;
        }
        Ok(())
    }

    /// After the stop: waits for every loop to drain, but no longer than the shutdown
    /// budget (`shutdown_timeout`, the handlers' kill grace, the final acks' deadline).
    /// When Redis hangs, the loops still waiting are left: their unsettled entries stay
    /// pending and are recovered as after a crash.
    async fn stop(mut self) {
        notify::stopping().await;
        notify::status("stopping: waiting for running handlers").await;
        let budget = self.config.daemon.shutdown_timeout + KILL_GRACE + FINAL_FLUSH;
        if tokio::time::timeout(budget, self.wait_all()).await.is_err() {
            let left: Vec<String> = self
                .loops
                .values()
                .filter(|running| !running.handle.is_finished())
                .map(|running| running.cfg.name.clone())
                .collect();
            tracing::error!(
                budget = %humantime::format_duration(budget),
                streams = %left.join(","),
                "shutdown budget spent (redis does not answer); exiting with those streams' unsettled entries left pending"
            );
            return;
        }
        if tokio::time::timeout(QUIT_TIMEOUT, self.commands.quit())
            .await
            .is_err()
        {
            tracing::warn!("redis connection did not close in time");
        }
        tracing::info!("stopped");
    }

    /// Starts a loop for `cfg` in a task of its own, after `after` (the loop it replaces)
    /// has finished. `prepared` hears when its group is set up (or why it could not be).
    fn start(
        &self,
        cfg: StreamConfig,
        after: Option<JoinHandle<()>>,
        prepared: Option<mpsc::UnboundedSender<Result<(), RedisError>>>,
    ) -> Running {
        let stop = self.shutdown.child();
        let hooks = LoopHooks {
            metrics: self.metrics.stream(&cfg.name, &cfg.group),
            health: self.health.clone(),
            liveness: self.liveness.clone(),
            sample_group: self.config.daemon.metrics_listen.is_some(),
        };
        let setup = LoopSetup {
            connector: self.connector.clone(),
            consumer: self.config.daemon.consumer.clone(),
            commands: self.commands.clone(),
            metrics: self.metrics.clone(),
            cfg: cfg.clone(),
            hooks,
            prepared,
        };
        let task_stop = stop.clone();
        let handle = tokio::spawn(async move {
            if let Some(previous) = after {
                let _ = previous.await;
            }
            // Boxed and done before the loop runs: the loop's task then holds only the
            // loop, not the connect and group set-up states (memory per idle stream).
            if let Some(stream_loop) = Box::pin(setup.run(&task_stop)).await {
                stream_loop.run(task_stop).await;
            }
        });
        Running { cfg, stop, handle }
    }

    /// Stops one loop gracefully: no more reads, running handlers get `shutdown_timeout`.
    fn retire(&self, running: &Running) {
        running.stop.stop();
        let stop = running.stop.clone();
        let timeout = self.config.daemon.shutdown_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            stop.abort();
        });
    }

    /// Re-reads the config file. An invalid file is rejected and the running config
    /// stays; otherwise new streams start, removed ones stop gracefully and changed ones
    /// restart (the new loop starts once the old one has finished its handlers, so the
    /// stream never runs more than `max_block_read` handlers).
    async fn reload(&mut self) {
        let path = self.config.path.clone();
        let loaded =
            tokio::task::spawn_blocking(move || Config::load(&path, &Overrides::from_process()))
                .await;
        let new = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(error)) => {
                tracing::error!(%error, "reload rejected: invalid config; keeping the running one");
                return;
            }
            Err(error) => {
                tracing::error!(%error, "reload failed; keeping the running config");
                return;
            }
        };
        if new.redis != self.config.redis || new.daemon.consumer != self.config.daemon.consumer {
            tracing::warn!(
                "[redis] and [daemon] consumer changes take effect on restart only; applying the rest"
            );
        }
        self.config.daemon.shutdown_timeout = new.daemon.shutdown_timeout;

        let mut old = std::mem::take(&mut self.loops);
        let (mut started, mut restarted, mut unchanged) = (0, 0, 0);
        for cfg in new.streams.iter().cloned() {
            let key = key_of(&cfg);
            let running = match old.remove(&key) {
                Some(running) if running.cfg == cfg => {
                    unchanged += 1;
                    running
                }
                Some(previous) => {
                    tracing::info!(stream = %cfg.name, group = %cfg.group, "stream changed; restarting its loop");
                    self.retire(&previous);
                    restarted += 1;
                    self.start(cfg, Some(previous.handle), None)
                }
                None => {
                    tracing::info!(stream = %cfg.name, group = %cfg.group, "new stream; starting its loop");
                    started += 1;
                    self.start(cfg, None, None)
                }
            };
            self.loops.insert(key, running);
        }
        let stopped = old.len();
        for (_, running) in old {
            tracing::info!(stream = %running.cfg.name, group = %running.cfg.group, "stream removed; stopping its loop");
            self.retire(&running);
            self.retiring.spawn(async move {
                let _ = running.handle.await;
            });
        }
        self.health.set_loops_expected(new.streams.len());
        self.config.streams = new.streams;
        tracing::info!(started, restarted, stopped, unchanged, "config reloaded");
    }

    async fn wait_all(&mut self) {
        for running in self.loops.values_mut() {
            if let Err(error) = (&mut running.handle).await {
                tracing::error!(stream = %running.cfg.name, %error, "a consume loop failed");
            }
        }
        self.loops.clear();
        while self.retiring.join_next().await.is_some() {}
    }
}

/// What a stream's task needs before its loop can run.
struct LoopSetup {
    connector: redis::Connector,
    consumer: String,
    commands: Client,
    metrics: Arc<Metrics>,
    cfg: StreamConfig,
    hooks: LoopHooks,
    /// Hears when the group is set up (or why it could not be).
    prepared: Option<mpsc::UnboundedSender<Result<(), RedisError>>>,
}

impl LoopSetup {
    /// Connects the loop's reader, builds the loop and sets up its group. `None` when
    /// shutdown came first or the group cannot be set up (reported to `prepared`).
    async fn run(mut self, stop: &Shutdown) -> Option<StreamLoop> {
        let mut report = |result: Result<(), RedisError>| {
            if let Some(tx) = self.prepared.take() {
                let _ = tx.send(result);
            }
        };
        let reader = match self
            .connector
            .connect(redis::Role::Reader, stop.stop_token())
            .await
        {
            Ok(client) => client,
            Err(RedisError::Stopped) => {
                report(Ok(()));
                return None;
            }
            Err(error) => {
                report(Err(error));
                return None;
            }
        };
        let reconnects = self.metrics;
        redis::watch_connection(&reader, "reader", move |connected| {
            if connected {
                reconnects.redis_reconnect();
            }
        });
        crate::stream::dlq::warn_if_split(&self.commands, &self.cfg.name, &self.cfg.dlq);
        let stream_loop = StreamLoop::new(
            self.cfg,
            &self.consumer,
            self.commands,
            reader,
            stop,
            self.hooks,
        );
        match stream_loop.create_group(stop).await {
            Ok(()) | Err(RedisError::Stopped) => report(Ok(())),
            Err(error) => {
                report(Err(error));
                return None;
            }
        }
        Some(stream_loop)
    }
}
